"""A bad remote-model config stops start-up with a message naming the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.remote_fleet import start_front_door_expecting_failure


def _model(**kw: object) -> dict[str, object]:
    return {"name": "m", "kind": "openai", "replicas": ["http://127.0.0.1:9"], "health_interval": 0, **kw}


@pytest.mark.parametrize(
    ("models", "env", "named"),
    [
        ([_model(kind="grpc")], {}, "remote.remote_models.0.kind"),
        ([_model(), _model()], {}, "'m' is used twice"),
        ([_model(api_key_env="PARLEY_TEST_MISSING_KEY")], {}, "remote.remote_models[0].api_key_env"),
        ([_model(replicas=["http://127.0.0.1:PORT"])], {}, "remote.remote_models[0].replicas[0]"),
    ],
    ids=["unknown-kind", "duplicate-name", "missing-key-variable", "unreachable-url"],
)
def test_bad_config_stops_startup_naming_the_key(tmp_path: Path, models: list[dict[str, object]],
                                                 env: dict[str, str], named: str) -> None:
    for m in models:
        m["replicas"] = [str(u).replace("PORT", str(free_port())) for u in m["replicas"]]  # type: ignore[union-attr]
    output = start_front_door_expecting_failure(tmp_path, models, env)
    assert named in output, output[-2000:]
    assert "Configuration error" in output or "Invalid configuration" in output
