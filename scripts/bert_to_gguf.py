"""Write a BERT model folder (sentence-transformers or Hugging Face) as a GGUF file llama.cpp loads.

    python scripts/bert_to_gguf.py MODEL_FOLDER OUT.gguf [--f16] [--pooling mean|cls|rank]

Reads `config.json`, `vocab.txt` and `model.safetensors` with numpy only (no
torch, no transformers), and writes the tensor names and metadata llama.cpp's
BERT graph expects: WordPiece vocabulary in llama.cpp's "phantom space" form,
CLS/SEP/UNK/PAD/MASK ids, mean pooling (or the pooling the folder's
`1_Pooling/config.json` names). `--pooling rank` writes a cross-encoder: a
`BertForSequenceClassification` folder whose pooler and one-label classifier
become llama.cpp's `cls` and `cls.output` tensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_TOP = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
    "pooler.dense": "cls",
    "classifier": "cls.output",
}


def folder_pooling(folder: Path) -> str:
    """The pooling a sentence-transformers folder declares (mean when it says nothing)."""
    try:
        cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    return "mean"


def _tensor_name(key: str) -> str | None:
    key = key.removeprefix("bert.")
    stem, _, kind = key.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    if stem.startswith("encoder.layer."):
        index, _, rest = stem.removeprefix("encoder.layer.").partition(".")
        if rest in _LAYER:
            return f"blk.{index}.{_LAYER[rest]}.{kind}"
    return None


def _phantom(token: str) -> str:
    # llama.cpp's WordPiece vocabulary marks word starts with U+2581 instead of marking continuations with ##.
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def convert(folder: Path, out: Path, *, pooling: str | None = None, f16: bool = False) -> Path:
    """Write `folder` (a BERT model) to `out` as GGUF; returns `out`."""
    config = json.loads((folder / "config.json").read_text())
    pooling = pooling or folder_pooling(folder)
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tensors = load_file(str(folder / "model.safetensors"))

    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(folder.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(POOLING[pooling]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    writer.add_token_type_count(int(config.get("type_vocab_size", 2)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([_phantom(t) for t in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in vocab])
    ids = {t: i for i, t in enumerate(vocab)}
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)

    for key, value in tensors.items():
        name = _tensor_name(key)
        if name is None or (name.startswith("cls") and pooling != "rank"):
            continue
        data = np.ascontiguousarray(value, dtype=np.float32)
        if f16 and data.ndim == 2 and not name.startswith(("token_types", "cls")):
            data = data.astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--f16", action="store_true", help="store matrices as F16 (default: F32)")
    parser.add_argument("--pooling", choices=sorted(POOLING), default=None)
    args = parser.parse_args()
    convert(args.folder, args.out, pooling=args.pooling, f16=args.f16)
    print(args.out)


if __name__ == "__main__":
    main()
