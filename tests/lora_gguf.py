"""Build real LoRA adapter GGUFs for a base GGUF with the `gguf` package (test data, not mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_lora(
    out: Path,
    base: Path,
    *,
    layers: tuple[int, ...] = (0, 1, 2, 3),
    targets: tuple[str, ...] = ("attn_q", "attn_v", "ffn_up"),
    rank: int = 32,
    alpha: float = 32.0,
    magnitude: float = 0.05,
    seed: int = 0,
    quantized: bool = True,
) -> Path:
    """A LoRA with random, nonzero A and B on `targets` of `layers`, shaped for `base`.

    Quantized (Q8_0, as llama.cpp's converter can write) adapters multiply through the same integer
    dot products as the quantized base model, so results do not depend on how requests are batched;
    F32 adapters are exact too but their float matmuls round differently for different batch sizes.
    Q8_0 needs the rank to be a multiple of 32.
    """
    import gguf

    reader = gguf.GGUFReader(str(base))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for layer in layers:
        for target in targets:
            name = f"blk.{layer}.{target}.weight"
            n_in, n_out = shapes[name]  # ggml order: ne0 = input features, ne1 = output features
            a = rng.normal(0.0, magnitude, size=(rank, n_in)).astype(np.float32)
            b = rng.normal(0.0, magnitude, size=(n_out, rank)).astype(np.float32)
            for suffix, data in (("lora_a", a), ("lora_b", b)):
                if quantized:
                    q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(f"{name}.{suffix}", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(f"{name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
