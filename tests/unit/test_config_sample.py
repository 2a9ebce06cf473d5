"""config_sample.yml is generated from the config models and must stay in sync."""

from pathlib import Path

from common.config.loader import render_sample_config

ROOT = Path(__file__).resolve().parents[2]


def test_committed_sample_matches_the_models() -> None:
    committed = (ROOT / "config_sample.yml").read_text(encoding="utf-8")
    assert committed == render_sample_config(), (
        "config_sample.yml is out of date: run `python main.py export-config` and commit the result."
    )
