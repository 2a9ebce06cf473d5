"""ModelManager logic with stand-in engines: name rules, leases, one load per model, idle-only
eviction, keep_alive, per-model defaults files."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from backends.base import EngineStats, LoadOptions, ModelInfo
from common.errors import (
    BadRequestError,
    ModelNotFoundError,
    ModelNotLoadedError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from common.models.files import parse_keep_alive, read_defaults
from common.models.manager import ModelManager
from common.models.options import ManagerSettings

ROOT = Path(__file__).resolve().parent.parent.parent


class FakeEngine:
    """Just enough of an Engine: info, stats (busy when told) and close."""

    def __init__(self, name: str, options: LoadOptions) -> None:
        self.info = ModelInfo(
            name=name, path=name, backend="fake", n_ctx=options.max_seq_len or 128, n_ctx_train=128, n_vocab=10,
            bos_token="", eos_token="", bos_token_id=0, eos_token_id=1, add_bos_token=False, chat_template=None,
            load_options=options.as_dict(),
        )
        self.options = options
        self.closed = False
        self.running = 0  # requests the engine runs outside any lease

    def stats(self) -> EngineStats:
        return EngineStats(slots_total=1, slots_active=self.running, queue_depth=0, kv_cells_total=1, kv_cells_used=0)

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


class Loads:
    """Counts loads; each waits for `gate` (a threading.Event) when one is set."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.gate: threading.Event | None = None
        self.engines: list[FakeEngine] = []

    def __call__(self, kind: str, path: Path, name: str, options: LoadOptions, progress: Any = None) -> FakeEngine:
        self.names.append(name)
        if self.gate is not None:
            assert self.gate.wait(10)
        engine = FakeEngine(name, options)
        self.engines.append(engine)
        return engine


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Loads:
    counter = Loads()
    monkeypatch.setattr("common.models.catalog.load_engine", counter)
    return counter


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (d / f"{name}.gguf").write_bytes(b"GGUF")
    return d


def manager(model_dir: Path, *, on_loaded: Any = None, prepare: Any = None, **kw: Any) -> ModelManager:
    kw.setdefault("max_loaded", 2)
    settings = ManagerSettings(
        model_dir, ROOT / "templates", LoadOptions(max_seq_len=64), preset_dir=ROOT / "sampler_overrides", **kw
    )
    return ModelManager(settings, on_loaded=on_loaded, prepare=prepare)


# -- which model a name means ------------------------------------------------------
async def test_inline_loading_off_single_model_answers_any_name(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, dummy_names=("gpt-3.5-turbo",))
    await m.load("alpha")
    for name in (None, "", "default", "gpt-3.5-turbo", "beta", "no-such-model", "alpha.gguf"):
        lease = await m.acquire(name)
        assert lease.model.name == "alpha", name
        lease.release()
    assert loads.names == ["alpha"]
    await m.close()


async def test_inline_loading_off_several_loaded_never_falls_back(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, dummy_names=("gpt-3.5-turbo",))
    await m.load("alpha")
    await m.load("beta")
    assert (await m.acquire("beta")).model.name == "beta"
    assert (await m.acquire("gpt-3.5-turbo")).model.name == "alpha"  # dummy names: the default model
    with pytest.raises(ModelNotFoundError, match="in the model directory but not loaded"):
        await m.acquire("gamma")
    with pytest.raises(ModelNotFoundError, match="neither loaded nor in the model directory"):
        await m.acquire("nope")
    assert loads.names == ["alpha", "beta"]
    await m.close()


async def test_inline_loading_rules(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=True)
    await m.load("alpha")
    with pytest.raises(ModelNotFoundError, match="Available: alpha, beta, gamma"):
        await m.acquire("nope")  # an unknown name never goes to another model when loading is on
    with pytest.raises(PermissionDeniedError, match="admin key"):
        await m.acquire("beta", admin=False)
    assert "beta" not in m.loaded
    lease = await m.acquire("beta", admin=True)
    assert lease.model.name == "beta" and lease.model.active == 1
    lease.release()
    assert lease.model.active == 0
    lease.release()  # idempotent
    assert lease.model.active == 0
    # Ollama-style requests load whatever they name, admin or not.
    assert (await m.acquire("gamma", always_load=True)).model.name == "gamma"
    with pytest.raises(BadRequestError):
        await m.acquire("../etc")
    await m.close()


async def test_nothing_loaded(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir)
    with pytest.raises(ModelNotLoadedError, match="No model is loaded") as err:
        await m.acquire(None)
    assert err.value.status == 503 and err.value.headers["Retry-After"]


# -- one load per model --------------------------------------------------------------
async def test_concurrent_requests_share_one_load(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False)
    loads.gate = threading.Event()
    tasks = [asyncio.create_task(m.acquire("beta")) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert m.loading == ["beta"]
    loads.gate.set()
    leases = await asyncio.gather(*tasks)
    assert loads.names == ["beta"]
    assert {id(lease.model) for lease in leases} == {id(m.loaded["beta"])}
    assert m.loaded["beta"].active == 5  # every waiter got its lease with the load
    for lease in leases:
        lease.release()
    assert m.loaded["beta"].active == 0
    await m.close()


async def test_a_waiter_that_leaves_does_not_cancel_the_load(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False)
    loads.gate = threading.Event()
    leaving = asyncio.create_task(m.acquire("beta"))
    staying = asyncio.create_task(m.acquire("beta"))
    await asyncio.sleep(0.05)
    leaving.cancel()
    loads.gate.set()
    lease = await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert lease.model.active == 1  # the cancelled waiter holds nothing
    assert loads.names == ["beta"]
    await m.close()


async def test_failed_load_reaches_every_waiter_and_a_retry_loads_again(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False)
    (model_dir / "beta.parley.yml").write_text("model:\n  max_seq_len: 4\n")
    results = await asyncio.gather(m.acquire("beta"), m.acquire("beta"), return_exceptions=True)
    assert all(isinstance(r, BadRequestError) for r in results)
    assert "beta.parley.yml" in str(results[0]) and "model.max_seq_len" in str(results[0])
    (model_dir / "beta.parley.yml").write_text("model:\n  max_seq_len: 32\n")
    lease = await m.acquire("beta")
    assert lease.model.options is not None and lease.model.options.max_seq_len == 32
    await m.close()


# -- eviction ---------------------------------------------------------------------
async def test_lru_evicts_the_least_recently_used_idle_model(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False, max_loaded=2)
    (await m.acquire("alpha")).release()
    (await m.acquire("beta")).release()
    (await m.acquire("alpha")).release()  # alpha is now the more recent
    (await m.acquire("gamma")).release()
    assert sorted(m.loaded) == ["alpha", "gamma"]
    assert loads.engines[1].closed  # beta's engine was freed
    await m.close()


async def test_a_busy_model_is_never_evicted(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False, max_loaded=1, load_wait_timeout=5)
    running = await m.acquire("alpha")
    waiting = asyncio.create_task(m.acquire("beta"))
    await asyncio.sleep(0.3)
    assert not waiting.done() and not loads.engines[0].closed  # waits for alpha's request
    running.release()
    lease = await waiting
    assert lease.model.name == "beta" and loads.engines[0].closed
    assert list(m.loaded) == ["beta"]
    await m.close()


async def test_busy_engine_without_lease_is_not_evicted_either(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False, max_loaded=1, load_wait_timeout=0.3)
    (await m.acquire("alpha")).release()
    loads.engines[0].running = 1
    with pytest.raises(ServiceUnavailableError) as err:
        await m.acquire("beta")
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "5"
    assert "alpha" in err.value.message and "max_loaded_models" in err.value.message
    assert list(m.loaded) == ["alpha"] and not loads.engines[0].closed
    await m.close()


async def test_admin_unload_makes_room_for_a_waiting_load(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False, max_loaded=1, load_wait_timeout=5)
    running = await m.acquire("alpha")
    waiting = asyncio.create_task(m.acquire("beta"))
    await asyncio.sleep(0.1)
    assert await m.unload("alpha") == ["alpha"]
    assert (await waiting).model.name == "beta"
    running.release()  # a lease on an unloaded model releases harmlessly
    await m.close()


# -- keep_alive --------------------------------------------------------------------
async def test_idle_models_unload_and_come_back_with_their_options(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir, keep_alive=0.2)
    await m.load("alpha", {"max_seq_len": 48})
    lease = await m.acquire(None)
    await asyncio.sleep(0.4)
    assert "alpha" in m.loaded  # busy: kept
    lease.release()
    for _ in range(100):
        if not m.loaded:
            break
        await asyncio.sleep(0.05)
    assert m.loaded == {} and m.idle_unloaded == ["alpha"]
    with pytest.raises(ModelNotLoadedError, match="idle"):
        m.get()
    again = await m.acquire(None)  # the default model comes back, with the options it had
    assert again.model.name == "alpha" and again.model.options.max_seq_len == 48  # type: ignore[union-attr]
    assert loads.names == ["alpha", "alpha"]
    again.release()
    await m.unload()
    assert m.idle_unloaded == []  # an explicit unload is not undone by requests
    await m.close()


async def test_unload_when_idle_waits_for_running_requests(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir)
    await m.load("alpha")
    lease = await m.acquire("alpha")
    assert await m.unload_when_idle("alpha") is False
    assert "alpha" in m.loaded
    lease.release()
    for _ in range(100):
        if not m.loaded:
            break
        await asyncio.sleep(0.05)
    assert m.loaded == {} and loads.engines[0].closed
    await m.close()


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (300, 300.0), (1.5, 1.5), ("300", 300.0), ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0),
    ("500ms", 0.5), ("0", 0.0), ("0s", 0.0), (-1, None), ("-5m", None),
])
def test_parse_keep_alive(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "10 minutes", "5x", True, ""])
def test_parse_keep_alive_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="duration|number"):
        parse_keep_alive(value)


# -- per-model defaults ---------------------------------------------------------------
def test_defaults_file_precedence(tmp_path: Path) -> None:
    path = tmp_path / "m.parley.yml"
    path.write_text(
        "model:\n  max_seq_len: 1024\n  max_batch_size: 2\n  cache_mode: Q8_0\n  keep_alive: 10m\n"
        "sampling:\n  temperature: 0.5\n  min_p: {override: 0.1, force: true}\nsampling_preset: precise\n"
    )
    d = read_defaults(path, ROOT / "sampler_overrides")
    base = LoadOptions(max_seq_len=2048, max_batch_size=16, chunk_size=256)
    opts = d.options(base, {"max_batch_size": 8, "cache_size": None})
    assert (opts.max_seq_len, opts.max_batch_size, opts.chunk_size, opts.cache_mode) == (1024, 8, 256, "Q8_0")
    assert d.keep_alive_set and d.keep_alive == 600.0
    assert d.sampling is not None
    entries = d.sampling.entries
    assert entries["temperature"].value == 0.5 and entries["min_p"].force
    assert len(entries) > 2  # the preset's fields are there too, under the file's own


@pytest.mark.parametrize(("text", "words"), [
    ("model:\n  max_seqlen: 10\n", ["unknown key 'model.max_seqlen'", "max_seq_len"]),
    ("model:\n  max_seq_len: 8\n", ["'model.max_seq_len'", "greater than or equal to 16"]),
    ("model:\n  cache_mode: Q2\n", ["'model.cache_mode'"]),
    ("model:\n  keep_alive: soon\n", ["'model.keep_alive'", "duration"]),
    ("model: [1]\n", ["'model' must be a mapping"]),
    ("modle:\n  max_seq_len: 10\n", ["unknown section modle"]),
    ("sampling:\n  temprature: 1\n", ["unknown sampler field 'temprature'"]),
    ("sampling_preset: nope\n", ["sampling_preset", "not found"]),
    ("model: {max_seq_len: [\n", ["not valid YAML"]),
])
def test_defaults_file_errors_name_file_and_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "m.parley.yml"
    path.write_text(text)
    with pytest.raises(BadRequestError) as err:
        read_defaults(path, ROOT / "sampler_overrides")
    assert str(path) in err.value.message
    for word in words:
        assert word in err.value.message


def test_tabby_config_reads_the_model_section_only(tmp_path: Path) -> None:
    path = tmp_path / "tabby_config.yml"
    path.write_text("model:\n  max_seq_len: 4096\n  gpu_split: [10, 10]\n  rope_alpha: 1.0\ndraft_model:\n  x: 1\n")
    d = read_defaults(path)
    assert dict(d.load) == {"max_seq_len": 4096}


async def test_defaults_file_beside_a_gguf_and_in_a_folder(model_dir: Path, loads: Loads) -> None:
    (model_dir / "alpha.parley.yml").write_text("model:\n  max_seq_len: 96\n  keep_alive: 3600\n")
    folder = model_dir / "delta"
    folder.mkdir()
    (folder / "delta-q4.gguf").write_bytes(b"GGUF")
    (folder / "parley.yml").write_text("model:\n  max_batch_size: 3\n")
    m = manager(model_dir, max_loaded=3)
    files = {f.name: f for f in m.available()}
    assert "alpha.parley" not in files  # the defaults file is not a model
    assert files["alpha"].defaults_path == model_dir / "alpha.parley.yml"
    assert files["delta"].defaults_path == folder / "parley.yml"
    alpha = await m.load("alpha")
    assert alpha.options.max_seq_len == 96 and alpha.keep_alive == 3600.0  # type: ignore[union-attr]
    assert (await m.load("delta")).options.max_batch_size == 3  # type: ignore[union-attr]
    # A load request's fields win over the file.
    reloaded = await m.load("alpha", {"max_seq_len": 80}, reload=True)
    assert reloaded.options.max_seq_len == 80  # type: ignore[union-attr]
    assert m.default_name == "alpha"  # a reload keeps the default model
    await m.close()


async def test_an_admin_load_with_options_during_an_inline_load_gets_its_options(
    model_dir: Path, loads: Loads
) -> None:
    m = manager(model_dir, inline_loading=True, inline_admin_only=False)
    loads.gate = threading.Event()
    inline = asyncio.create_task(m.acquire("beta"))
    await asyncio.sleep(0.05)
    admin = asyncio.create_task(m.load("beta", {"max_seq_len": 40}, reload=True))
    await asyncio.sleep(0.05)
    loads.gate.set()
    lease = await inline
    lease.release()
    model = await admin
    assert model.options is not None and model.options.max_seq_len == 40
    assert loads.names == ["beta", "beta"] and loads.engines[0].closed
    assert m.loaded["beta"] is model
    await m.close()


# -- hooks given at construction ---------------------------------------------------------
async def test_hooks_hear_each_load_and_prepare_runs_before_requests(model_dir: Path, loads: Loads) -> None:
    heard: list[tuple[str, float]] = []
    prepared: list[tuple[str, int]] = []

    async def prepare(model: Any) -> None:
        await asyncio.sleep(0)
        prepared.append((model.name, model.active))

    m = manager(model_dir, on_loaded=lambda name, seconds: heard.append((name, seconds)), prepare=prepare,
                inline_loading=True, inline_admin_only=False)
    await m.load("alpha")
    lease = await m.acquire("beta")
    assert [name for name, _ in heard] == ["alpha", "beta"] and all(s >= 0 for _, s in heard)
    assert prepared == [("alpha", 0), ("beta", 0)]  # before the waiting request got its lease
    lease.release()
    await m.load("alpha", {"max_seq_len": 32}, reload=True)
    assert prepared[-1] == ("alpha", 0)  # a reload is prepared again
    await m.close()


async def test_a_failing_prepare_does_not_fail_the_load(model_dir: Path, loads: Loads) -> None:
    async def prepare(model: Any) -> None:
        raise RuntimeError("adapter trouble")

    m = manager(model_dir, prepare=prepare)
    model = await m.load("alpha")
    assert m.loaded == {"alpha": model}
    await m.close()


async def test_a_lease_releases_once(model_dir: Path, loads: Loads) -> None:
    m = manager(model_dir)
    await m.load("alpha")
    first, second = await m.acquire("alpha"), await m.acquire("alpha")
    assert first.model.active == 2
    first.release()
    first.release()  # idempotent
    assert first.model.active == 1
    with second:
        pass
    assert second.model.active == 0
    await m.close()
