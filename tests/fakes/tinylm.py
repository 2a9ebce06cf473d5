"""A tiny deterministic language model and model folder, shared by the fake exllamav2 and exllamav3 modules.

`write_model_folder` writes what an EXL2/EXL3 folder holds apart from weights:
config.json (with `quantization_config.quant_method`), a byte-level BPE
tokenizer.json (3 special tokens, then the 256 bytes), tokenizer_config.json
with a ChatML template, generation_config.json.

`TinyLM.logits(context)` depends on the context only (so batching never
changes an output): the next character of `PHRASE` after as many generated
positions as the context is long, a clear favourite (+8) over seeded noise,
and end-of-text once the phrase is spent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOT, IM_START, IM_END = 0, 1, 2
N_SPECIAL = len(SPECIALS)
N_VOCAB = N_SPECIAL + 256
PHRASE = "Hello world! The quick brown fox jumps over the lazy dog, then naps in the sun. "
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_token(b: int) -> int:
    return N_SPECIAL + b


def write_model_folder(folder: Path, quant_method: str | None) -> Path:
    """The folder's files; `quant_method` None leaves out quantization_config (a plain Hugging Face folder)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: byte_token(b) for b, c in enumerate(_byte_chars())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": N_VOCAB,
        "max_position_embeddings": 512,
        "bos_token_id": IM_START,
        "eos_token_id": IM_END,
    }
    if quant_method is not None:
        config["quantization_config"] = {"quant_method": quant_method, "bits": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": CHATML,
    }))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, EOT]}))
    if quant_method is not None:
        (folder / "model.safetensors").write_bytes(b"")  # stands for the quantized weights
    return folder


class TinyLM:
    def __init__(self, n_vocab: int = N_VOCAB) -> None:
        self.n_vocab = n_vocab
        self._phrase = [byte_token(b) for b in PHRASE.encode("utf-8")]

    def logits(self, context: list[int]) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(np.asarray(context[-4:], dtype=np.int64).tobytes(), digest_size=8).digest(),
                              "little")
        out = np.random.default_rng(seed).normal(0.0, 1.0, self.n_vocab).astype(np.float32)
        position = len(context) % (2 * len(self._phrase))
        favourite = self._phrase[position] if position < len(self._phrase) else IM_END
        out[favourite] += 8.0
        out[IM_START] -= 20.0  # never opens a turn
        return out
