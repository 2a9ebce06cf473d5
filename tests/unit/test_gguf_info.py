"""GGUF header reading: the direct parser against gguf's own reader, broken files, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.models.gguf_info import GGUFInfo, read_gguf_info


def write_gguf(path: Path, *, n_tokens: int = 300, file_type: int | None = 2) -> Path:
    """A tiny GGUF: a few scalars, short and long arrays, a vocabulary and two tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Test")
    writer.add_context_length(4096)
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("general.languages", ["en", "fr"])
    writer.add_array("llama.some_floats", [0.1, 0.25])
    writer.add_array("llama.long_ints", list(range(1000)))  # too long to list
    writer.add_token_list([f"tok{i}" for i in range(n_tokens)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.add_string("general.license", "mit")
    writer.add_string("general.size_label", "1K")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("a.weight", np.zeros((8, 16), dtype=np.float32))
    writer.add_tensor("b.bias", np.zeros((16,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_what_gguf_wrote(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "tiny.gguf"))
    assert info.error is None
    assert info.architecture == "llama"
    assert info.context_length == 4096
    assert info.parameter_count == 8 * 16 + 16
    assert info.file_type == "Q4_0"  # LlamaFileType 2
    assert info.size_label == "1K" and info.license == "mit"
    assert info.bos_token == "tok1" and info.eos_token == "tok2"
    assert info.chat_template == "{{ messages[0]['content'] }}"
    md = info.metadata
    assert md["llama.block_count"] == 2
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-05
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["general.languages"] == ["en", "fr"]
    assert md["llama.some_floats"] == [float(np.float32(0.1)), 0.25]
    assert "llama.long_ints" not in md and "tokenizer.ggml.tokens" not in md
    assert "tokenizer.chat_template" not in md


def test_matches_the_gguf_package_reader(tmp_path: Path) -> None:
    """The same keys and values as gguf.GGUFReader gives (short arrays included)."""
    from gguf import GGUFReader, GGUFValueType

    path = write_gguf(tmp_path / "tiny.gguf")
    reader = GGUFReader(str(path), "r")
    info = read_gguf_info(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.long_ints"):
            continue
        if field.types[0] == GGUFValueType.STRING:
            expected = bytes(field.parts[field.data[0]]).decode()
        elif field.types[0] == GGUFValueType.ARRAY:
            items = [field.parts[i] for i in field.data]
            if field.types[-1] == GGUFValueType.STRING:
                expected = [bytes(p).decode() for p in items]
            else:
                expected = [p.tolist()[0] for p in items]
        else:
            expected = field.parts[field.data[0]].tolist()[0]
            if field.types[0] == GGUFValueType.FLOAT32:
                expected = float(str(field.parts[field.data[0]][0]))
        assert info.metadata[key] == expected, key
    assert info.parameter_count == sum(int(t.n_elements) for t in reader.tensors)


def test_quantization_from_tensor_types_without_file_type(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "nofiletype.gguf", file_type=None))
    assert info.file_type == "F32"


def test_broken_files_report_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_bytes(b"hello world, not a model" * 10)
    good = write_gguf(tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:200])
    for path in (empty, not_gguf, truncated, tmp_path / "missing.gguf"):
        info = read_gguf_info(path)
        assert isinstance(info, GGUFInfo) and info.error, path
        assert info.architecture == ""


def test_cache_follows_the_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    first = read_gguf_info(path)
    assert read_gguf_info(path) is first  # cached: same signature
    write_gguf(path, n_tokens=400, file_type=1)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = read_gguf_info(path)
    assert again is not first and again.file_type == "F16"


def test_real_model(model_path: Path) -> None:
    info = read_gguf_info(model_path)
    assert (info.architecture, info.file_type, info.context_length) == ("llama", "Q4_1", 8192)
    assert info.parameter_count == 134_515_008
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "im_start" in (info.chat_template or "")
