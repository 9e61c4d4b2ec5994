"""The NF4 decode as a small C kernel (`nf4_decode.c` beside this file), called through ctypes.

    out[i] = NF4[code_i] · scale[i // blocksize]      fp32 product, stored as fp32 or rounded once to bf16

Bit for bit `dequantize_nf4` (same table, same fp32 multiply, bf16 rounded to nearest even as torch rounds).
With AVX-512 it decodes 32 weights per step (vpermps looks both nibbles up in a register-held table): ~0.17 ns
per weight on one core of this machine, against ~1.2 ns for the torch.compile'd decode it replaced and ~1.1 ns
for the eager one (bench/RESULTS.md) -- at batch-1 training the decode is what a 4-bit matmul costs beyond
the bf16 matmul, so this sets how close QLoRA gets to reading 4 bits instead of 32.

Built on first use with the system's C compiler (`cc -O3 -march=native -fopenmp`, about a second) into
`$LORAKIT_CACHE/kernels/`, keyed by the source and the CPU's flags (a cache shared by two machines never
loads a build for the wrong CPU); written to a temp name and renamed, so concurrent processes are safe. No
compiler, or a build that fails: `decode` returns False once with a warning and the caller's eager path
runs (the same bits, ~6x slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from lorakit.runtime.cache import cache_dir
from lorakit.runtime.devices import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _build(source: Path, out_dir: Path) -> Path:
    """The compiled library for `source` on this CPU, built once into `out_dir`."""
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + " ".join(sorted(cpu_flags() or ())).encode())
    target = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH; install one (Debian: apt-get install gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build(SOURCE, cache_dir() / "kernels")))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the native NF4 decode is unavailable (%s); using the eager decode, ~6x slower at small batch",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    lib.lorakit_nf4_decode.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                               ctypes.c_int]
    lib.lorakit_nf4_decode.restype = None
    return lib


def available() -> bool:
    """True when the kernel is built and loaded (building it on first call)."""
    return _library() is not None


def decode(packed: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, blocksize: int,
           out: torch.Tensor) -> bool:
    """Decode into `out` ((2·len(packed),) fp32 or bf16, contiguous): packed (n/2,) uint8, scales (n/B,) fp32,
    table (16,) fp32, all contiguous CPU tensors. False (nothing written) where the kernel cannot run."""
    if out.dtype not in (torch.float32, torch.bfloat16) or out.device.type != "cpu":
        return False
    lib = _library()
    if lib is None:
        return False
    if packed.dtype != torch.uint8 or scales.dtype != torch.float32 or table.dtype != torch.float32 \
            or not packed.device == scales.device == table.device == out.device:
        raise ValueError("native NF4 decode: packed (uint8), scales and table (float32) on the output's device")
    if not (packed.is_contiguous() and scales.is_contiguous() and out.is_contiguous()):
        raise ValueError("native NF4 decode: packed, scales and out must be contiguous")
    if out.numel() != 2 * packed.numel() or scales.numel() * blocksize < out.numel():
        raise ValueError(f"native NF4 decode: {packed.numel()} bytes, {scales.numel()} scales of {blocksize} "
                         f"and an output of {out.numel()} do not match")
    lib.lorakit_nf4_decode(packed.data_ptr(), scales.data_ptr(), table.data_ptr(), out.data_ptr(), packed.numel(),
                           blocksize, int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return True
