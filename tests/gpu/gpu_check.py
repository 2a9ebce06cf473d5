"""The GPU proof's steps after installation (tests/gpu/run.sh calls this on an NVIDIA machine).

1. Build a tiny Llama with transformers on the GPU (tests/fakes/tinylm's byte vocabulary) and fit it
   for a few seconds to answer every prompt with one sentence, so its greedy output is words.
2. Quantize it with exllamav3's converter (EXL3) and exllamav2's (EXL2).
3. Run the engine contract (tests/api/test_engines.py) against exllamav2, exllamav3 and the transformers
   engine on CUDA, each model loaded through Parley's registry.
Every step appends to the report; a failed step is reported and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
)


def log(report: Path, text: str) -> None:
    with report.open("a", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")
    print(text, flush=True)


def build_model(folder: Path, report: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fakes.tinylm import IM_END, PHRASE, byte_token, write_model_folder

    write_model_folder(folder, None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=IM_END, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).cuda()
    specials = {"<|im_start|>": 1, "<|im_end|>": 2}

    def encode(text: str) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(text):
            for s, t in specials.items():
                if text.startswith(s, i):
                    out.append(t)
                    i += len(s)
                    break
            else:
                out += [byte_token(b) for b in text[i].encode()]
                i += 1
        return out

    answer = [byte_token(b) for b in PHRASE.encode()] + [IM_END]
    rows = [encode(p) + answer for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [IM_END] * (width - len(r)) for r in rows], device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    started = time.time()
    for step in range(400):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    log(report, f"fitted a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama in "
                f"{time.time() - started:.1f}s, final loss {loss.item():.4f}")
    model.half().save_pretrained(folder, safe_serialization=True)
    config_json = json.loads((folder / "config.json").read_text())
    config_json.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config_json))


def run(report: Path, title: str, cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> bool:
    log(report, f"\n### {title}\n\n`{' '.join(cmd)}`\n")
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMED OUT after {timeout}s", -1
    log(report, "```\n" + out[-6000:] + f"\n```\nexit code {rc} after {time.time() - started:.0f}s")
    return rc == 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    work: Path = args.work
    report: Path = args.report
    hf, exl3, exl2 = work / "tiny-hf", work / "tiny-exl3", work / "tiny-exl2"
    build_model(hf, report)
    py = sys.executable
    v3 = ("from exllamav3.conversion.convert_model import parser, main, prepare\n"
          f"a = parser.parse_args(['-i', {str(hf)!r}, '-o', {str(exl3)!r}, '-w', {str(work / 'w3')!r}, "
          "'-b', '4.0', '-cr', '8', '-cc', '256'])\n"
          "i, j, ok, err = prepare(a)\nassert ok, err\nmain(i, j)\n")
    ok3 = run(report, "exllamav3: quantize to EXL3 (4.0 bpw)", [py, "-c", v3], 150)
    ok2 = run(report, "exllamav2: quantize to EXL2 (4.0 bpw)",
              [py, "-m", "exllamav2.conversion.convert_exl2", "-i", str(hf), "-o", str(work / "w2"), "-cf", str(exl2),
               "-b", "4.0", "-r", "4", "-mr", "4", "-l", "256", "-ml", "256"], 150)
    engines = {"transformers": str(hf)}
    if ok3:
        engines["exllamav3"] = str(exl3)
    if ok2:
        engines["exllamav2"] = str(exl2)
    passed = run(report, f"engine contract against {', '.join(engines)} (real libraries, CUDA)",
                 [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/api/test_engines.py", "-rA"], 200,
                 env={"PARLEY_TEST_ENGINES": json.dumps(engines)})
    log(report, f"\nSUMMARY: exl3 quantized={ok3}, exl2 quantized={ok2}, contract passed={passed}")
    return 0 if (ok3 and ok2 and passed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
