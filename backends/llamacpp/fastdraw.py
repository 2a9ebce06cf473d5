"""The compiled per-token draw (fastdraw.c): building it with the system's C compiler, loading and checking it.

`DirectSampler` (sampler.py) draws plain temperature and greedy tokens through
it when it is built, and through numpy when it is not: the C draw takes ~90 us
a token on a 49k vocabulary right after a decode, against ~260 us for numpy,
and it runs without the GIL, so the event loop streams meanwhile.

    python -m backends.llamacpp.fastdraw        # build (start.sh does), or say why not

The library's name carries a hash of the source, so an edited source is never
served by a stale build. It is compiled for the machine's own C library with
one variant per instruction set (AVX-512, AVX2, baseline), picked at load.
Where no compiler is found the build reports that and the numpy draw is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("fastdraw.c")
BUILD_DIR = Path(__file__).with_name("_build")
BLOCK = 256  # tokens per block sum (fastdraw.c's BLOCK)


class BuildError(Exception):
    pass


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return BUILD_DIR / f"libparley_draw-{digest}.so"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(out: Path | None = None) -> Path:
    """Compile fastdraw.c into `out` (default: library_path()); raises BuildError saying what to do."""
    out = out or library_path()
    if platform.system() != "Linux":
        raise BuildError("the compiled draw is built on Linux only; the numpy draw is used elsewhere")
    cc = _compiler()
    if cc is None:
        raise BuildError("no C compiler found (cc, gcc or clang; or set CC): install one, e.g. "
                         "`apt-get install build-essential`, and run `python -m backends.llamacpp.fastdraw`")
    libs = ["-lmvec", "-lm"] if platform.machine() == "x86_64" else ["-lm"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [cc, "-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
               "-o", str(partial), str(SOURCE), *libs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
        os.replace(partial, out)  # whole or not at all: a reader never sees half a library
    return out


class DrawKernel:
    """The loaded `parley_draw`; `draw` takes a float32 row, returns a token id (-1: nothing has weight)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fn = ctypes.CDLL(str(path)).parley_draw  # CDLL: the GIL is released for every call
        fn.restype = ctypes.c_int64
        vp = ctypes.c_void_p
        fn.argtypes = [vp, ctypes.c_int64, ctypes.c_float, vp, vp, vp, ctypes.c_int64, vp, ctypes.c_double]
        self._fn = fn

    def draw(self, row: np.ndarray, inv_temp: float, bias: DrawBias, sums: np.ndarray, u: float) -> int:
        """One token from `row` (float32; a C-contiguous one is modified during the call and restored)."""
        if row.dtype != np.float32 or not row.flags.c_contiguous:
            row = np.ascontiguousarray(row, dtype=np.float32)
        return self._fn(row.__array_interface__["data"][0], row.shape[0], inv_temp, bias.ids_ptr, bias.vals_ptr,
                        bias.saved_ptr, bias.n, sums.__array_interface__["data"][0], u)


class DrawBias:
    """A request's fixed logit bias as the C draw takes it: ids, values and room for the originals."""

    __slots__ = ("ids", "vals", "saved", "n", "ids_ptr", "vals_ptr", "saved_ptr")

    def __init__(self, ids: np.ndarray, vals: np.ndarray, n_vocab: int) -> None:
        if ids.size and not (0 <= int(ids.min()) and int(ids.max()) < n_vocab):
            raise ValueError(f"a logit-bias token id is outside the vocabulary (0..{n_vocab - 1})")
        self.ids = np.ascontiguousarray(ids, dtype=np.int32)
        self.vals = np.ascontiguousarray(vals, dtype=np.float32)
        self.saved = np.empty(max(1, ids.size), dtype=np.float32)
        self.n = int(ids.size)
        self.ids_ptr = self.ids.ctypes.data if self.n else None
        self.vals_ptr = self.vals.ctypes.data if self.n else None
        self.saved_ptr = self.saved.ctypes.data


def block_sums(n_vocab: int) -> np.ndarray:
    """The scratch the C draw writes its block sums to."""
    return np.zeros(-(-n_vocab // BLOCK), dtype=np.float64)


def _self_check(kernel: DrawKernel) -> bool:
    """A build that loads but answers wrong (a broken compiler or libm) must never draw tokens."""
    n = 1000
    row = np.full(n, -np.inf, dtype=np.float32)
    row[[10, 700]] = [1.0, 1.0 + np.log(3.0)]  # weights 1 : 3
    none = DrawBias(np.empty(0, np.int64), np.empty(0, np.float32), n)
    sums = block_sums(n)
    draws = [kernel.draw(row, 1.0, none, sums, u) for u in (0.0, 0.24, 0.26, 0.99)]
    greedy = kernel.draw(row, 0.0, none, sums, 0.5)
    banned = DrawBias(np.array([700]), np.array([-np.inf], dtype=np.float32), n)
    after_ban = kernel.draw(row, 1.0, banned, sums, 0.99)
    return draws == [10, 10, 700, 700] and greedy == 700 and after_ban == 10 and row[700] > 2.0


def load(path: Path | None = None) -> DrawKernel | None:
    """The built kernel, or None (not built, or failed its check: the numpy draw is used)."""
    path = path or library_path()
    if not path.is_file():
        return None
    try:
        kernel = DrawKernel(path)
    except (OSError, AttributeError):
        return None
    return kernel if _self_check(kernel) else None


def main() -> int:
    if load() is not None:
        print(f"The compiled sampler is built: {library_path()}")
        return 0
    try:
        path = build()
    except BuildError as exc:
        print(f"The compiled sampler was not built ({exc}); Parley samples with numpy instead.", file=sys.stderr)
        return 0  # optional: never fails a setup
    if load(path) is None:
        print(f"{path} was built but failed its self-check; Parley samples with numpy instead. "
              "Report your compiler version.", file=sys.stderr)
        path.unlink(missing_ok=True)
        return 0
    for old in BUILD_DIR.glob("libparley_draw-*.so"):  # earlier sources' builds
        if old != path:
            old.unlink(missing_ok=True)
    print(f"Built the compiled sampler: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
