"""The registry picks an engine from what a model path holds, and names the extra to install when its library is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from backends.registry import detect_backend, sniff_backend
from common.errors import BadRequestError

FAKES = Path(__file__).resolve().parent.parent / "fakes"


def folder(tmp: Path, name: str, config: dict | None, files: tuple[str, ...]) -> Path:
    d = tmp / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    for f in files:
        (d / f).write_bytes(b"")
    return d


def test_auto_reads_the_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert sniff_backend(gguf) == "llamacpp"
    assert sniff_backend(folder(tmp_path, "g", None, ("a.gguf",))) == "llamacpp"
    exl2 = {"quantization_config": {"quant_method": "exl2"}}
    exl3 = {"quantization_config": {"quant_method": "EXL3"}}
    assert sniff_backend(folder(tmp_path, "e2", exl2, ("m.safetensors",))) == "exllamav2"
    assert sniff_backend(folder(tmp_path, "e3", exl3, ("m.safetensors",))) == "exllamav3"
    assert sniff_backend(folder(tmp_path, "hf", {"model_type": "llama"}, ("model.safetensors",))) == "transformers"
    awq = {"quantization_config": {"quant_method": "awq"}}
    assert sniff_backend(folder(tmp_path, "awq", awq, ("model.safetensors",))) == "transformers"
    assert sniff_backend(folder(tmp_path, "empty", None, ())) is None


def test_unknown_contents_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError) as err:
        detect_backend(folder(tmp_path, "empty", None, ("notes.txt",)))
    assert err.value.param == "backend" and "backend" in err.value.message


def test_a_missing_library_names_its_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide the exllama libraries (real ones on a CUDA machine, fakes another test imported).
    for name in [m for m in sys.modules if m.split(".")[0] in ("exllamav2", "exllamav3")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "exllamav2").is_dir()
                                      and not (Path(p) / "exllamav3").is_dir()])
    if importlib.util.find_spec("exllamav2") or importlib.util.find_spec("exllamav3"):
        pytest.skip("an exllama library is installed here")
    exl2 = folder(tmp_path, "e2", {"quantization_config": {"quant_method": "exl2"}}, ("m.safetensors",))
    with pytest.raises(BadRequestError) as err:
        detect_backend(exl2)
    assert err.value.status == 400 and err.value.param == "backend"
    assert "pip install '.[exllamav2]'" in err.value.message
    with pytest.raises(BadRequestError) as err:
        detect_backend(exl2, "exllamav3")
    assert "pip install '.[exllamav3]'" in err.value.message


def test_the_fake_libraries_satisfy_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FAKES))
    exl3 = folder(tmp_path, "e3", {"quantization_config": {"quant_method": "exl3"}}, ("m.safetensors",))
    assert detect_backend(exl3) == "exllamav3"


def test_unknown_backend_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError) as err:
        detect_backend(tmp_path, "vllm")
    assert "llamacpp, transformers, exllamav2, exllamav3" in err.value.message
