"""The compose files say what the README's Deployment table says: services, ports, volumes, healthchecks, GPUs.

There is no Docker engine on the development machines, so this reads the files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent.parent


def readme_rows() -> dict[tuple[str, str], dict[str, str]]:
    """Rows of the Deployment table, keyed by (compose file name, service)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Deployment"):]
    section = section[: section.index("\n## ", 5)]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`"):
            name = re.match(r"`([^`]+)`", cells[0]).group(1)  # type: ignore[union-attr]
            row = dict(zip(("service", "file", "dockerfile", "port", "volumes", "health", "gpu"), cells, strict=True))
            rows[(row["file"].strip("`").removeprefix("docker/"), name)] = row
    return rows


def compose_files() -> list[Path]:
    return sorted((ROOT / "docker").glob("*compose*.y*ml"))


def services(path: Path) -> dict[str, Any]:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))["services"]


def test_every_compose_service_is_in_the_readme() -> None:
    rows = readme_rows()
    assert compose_files()
    for path in compose_files():
        for name in services(path):
            assert (path.name, name) in rows, f"{path.name}: service {name!r} is missing from the README's Deployment table"


def test_each_service_matches_its_row() -> None:
    rows = readme_rows()
    for path in compose_files():
        for name, svc in services(path).items():
            row = rows[(path.name, name)]
            if "build" in svc:  # Parley's own images
                assert f"`{svc['build']['dockerfile']}`" == row["dockerfile"]
                assert (ROOT / svc["build"]["dockerfile"]).is_file()
            else:  # a peer's published image
                assert row["dockerfile"] == f"image `{svc['image']}`"
            assert [str(p) for p in svc.get("ports", [])] == ([] if row["port"] == "none" else [row["port"]])
            want_volumes = [] if row["volumes"] == "none" else [v.strip() for v in row["volumes"].split(",")]
            assert [f"`{v}`" for v in svc.get("volumes", [])] == want_volumes
            health = svc["healthcheck"]
            probe = "/health" if "/health" in " ".join(health["test"]) else " ".join(health["test"][1:])
            assert f"`{probe}` every {health['interval']}" == row["health"] or (
                probe == "/health" and row["health"] == f"`/health` every {health['interval']}")
            devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            if row["gpu"] == "none":
                assert not devices
            else:
                assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_the_cuda_image_installs_the_gpu_engines() -> None:
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text(encoding="utf-8")
    assert text.startswith("#") and "FROM nvidia/cuda:" in text
    assert "torch==2.13.0" in text
    assert re.search(r"\.\[[^\]]*exllamav2[^\]]*exllamav3[^\]]*\]", text) and "transformers" in text
