"""Sampler presets: override / force / additive semantics, validation, and path confinement."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.models.presets import (
    Preset,
    PresetEntry,
    PresetError,
    apply_preset,
    list_presets,
    load_preset,
)
from backends.sampling import SamplingParams

SHIPPED = Path(__file__).resolve().parents[2] / "sampler_overrides"


def _preset(**entries: PresetEntry) -> Preset:
    return Preset("t", entries)


def test_override_fills_only_unsent_fields() -> None:
    preset = _preset(temperature=PresetEntry(0.5), top_p=PresetEntry(0.9))
    assert apply_preset(preset, {"temperature": 1.2}) == {"temperature": 1.2, "top_p": 0.9}
    assert apply_preset(preset, {}) == {"temperature": 0.5, "top_p": 0.9}


def test_none_counts_as_not_sent() -> None:
    preset = _preset(max_tokens=PresetEntry(64))
    assert apply_preset(preset, {"max_tokens": None}) == {"max_tokens": 64}


def test_force_wins_over_request() -> None:
    preset = _preset(temperature=PresetEntry(0.5, force=True))
    assert apply_preset(preset, {"temperature": 1.2}) == {"temperature": 0.5}
    assert apply_preset(preset, {}) == {"temperature": 0.5}


def test_additive_combines_lists() -> None:
    preset = _preset(stop=PresetEntry(("###", "User:"), additive=True))
    assert apply_preset(preset, {"stop": ["User:", "\n\n"]}) == {"stop": ("User:", "\n\n", "###")}
    assert apply_preset(preset, {}) == {"stop": ("###", "User:")}
    forced = _preset(banned_tokens=PresetEntry((1, 2), force=True, additive=True))
    assert apply_preset(forced, {"banned_tokens": (3,)}) == {"banned_tokens": (3, 1, 2)}


def test_apply_is_pure_and_builds_params() -> None:
    sent = {"temperature": 0.9, "stop": ["x"]}
    preset = _preset(stop=PresetEntry(("y",), additive=True), min_p=PresetEntry(0.1, force=True))
    merged = apply_preset(preset, sent)
    assert sent == {"temperature": 0.9, "stop": ["x"]}
    params = SamplingParams(**merged)
    assert params.stop == ("x", "y") and params.min_p == 0.1 and params.temperature == 0.9
    assert apply_preset(None, sent) == sent


def test_load_yaml_with_entries_and_shorthand(tmp_path: Path) -> None:
    (tmp_path / "mine.yml").write_text(
        "temperature:\n  override: 0.3\n  force: true\n"
        "stop:\n  override: ['END']\n  additive: true\n"
        "top_k: 40\n"
        "logit_bias:\n  override: {'15': -100}\n",
        encoding="utf-8",
    )
    preset = load_preset(tmp_path, "mine")
    assert preset.name == "mine" and preset.path == tmp_path / "mine.yml"
    assert preset.entries["temperature"] == PresetEntry(0.3, force=True)
    assert preset.entries["stop"] == PresetEntry(("END",), additive=True)
    assert preset.entries["top_k"] == PresetEntry(40)
    assert preset.entries["logit_bias"].value == {15: -100.0}
    assert load_preset(tmp_path, "mine.yml").entries == preset.entries
    assert preset.describe()["stop"] == {"override": ["END"], "force": False, "additive": True}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("temprature: 0.5\n", "temprature"),
        ("temperature:\n  override: 0.5\n  forse: true\n", "forse"),
        ("temperature:\n  override: hot\n", "temperature"),
        ("top_p:\n  override: 3.0\n", "top_p"),
        ("temperature:\n  override: 0.5\n  additive: true\n", "additive"),
        ("top_k: true\n", "top_k"),
        ("- just a list\n", "preset must map"),
    ],
)
def test_bad_preset_files_name_field_and_file(tmp_path: Path, body: str, needle: str) -> None:
    (tmp_path / "bad.yml").write_text(body, encoding="utf-8")
    with pytest.raises(PresetError) as info:
        load_preset(tmp_path, "bad")
    assert needle in str(info.value)
    assert "bad.yml" in str(info.value)


@pytest.mark.parametrize("name", ["../secrets", "a/b", "/etc/passwd", "..", "", "C:\\x", "a\\b"])
def test_path_like_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        load_preset(tmp_path, name)


def test_missing_preset_lists_available(tmp_path: Path) -> None:
    (tmp_path / "one.yml").write_text("temperature: 0.5\n", encoding="utf-8")
    (tmp_path / "two.yaml").write_text("top_k: 5\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    assert list_presets(tmp_path) == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="one, two"):
        load_preset(tmp_path, "three")
    assert list_presets(tmp_path / "missing") == []


def test_shipped_presets_load() -> None:
    names = list_presets(SHIPPED)
    assert {"sample_preset", "precise", "creative"} <= set(names)
    for name in names:
        preset = load_preset(SHIPPED, name)
        SamplingParams(**apply_preset(preset, {}))
    assert load_preset(SHIPPED, "precise").entries["temperature"].value < 0.5
