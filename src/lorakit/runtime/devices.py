"""Device and compute-dtype choice.

Two dtypes, chosen apart:
- the model's compute dtype (`train.dtype: auto`): bf16 on CUDA, fp32 on a CPU. The trainable LoRA
  factors, norms and activations live in it; on a CPU they stay fp32 (AdamW on bf16 factors loses small
  steps, and on CPUs without native bf16 matrix units -- AVX2-only machines, most laptops -- a bf16
  matmul is ~100x slower than fp32).
- the 4-bit base's matmul dtype (`quant.compute_dtype: auto`): what an NF4 weight is decoded to for its
  matmul. bf16 wherever bf16 matmuls are fast -- CUDA, and CPUs with AVX512-BF16 or AMX (measured on
  such a CPU: a 64 x 2048 x 5632 matmul 8.8 ms in bf16 vs 28.9 ms in fp32, one thread) -- else the model's
  compute dtype. The frozen base has no fp32 master to protect, and NF4 holds 4 bits of it anyway.
"""

from __future__ import annotations

import functools

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; otherwise the named device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16).

    Read from the kernel's CPU flags: torch's capability string names the vector ISA it dispatches to
    ("AVX512"), not the bf16 extensions, so it says nothing here. Elsewhere than Linux: the string."""
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "AMX" in capability or "AVX512_BF16" in capability


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's `flags` line of /proc/cpuinfo as a set, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def pick_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """train.dtype: 'auto' -> bf16 on CUDA with bf16 support (else fp16), fp32 on CPU/MPS."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_matmul_dtype(name: str, device: torch.device | str, compute: torch.dtype) -> torch.dtype:
    """quant.compute_dtype, the dtype NF4 weights are decoded to for their matmuls: 'auto' -> bf16 on CUDA
    with bf16 support and on CPUs with AVX512-BF16/AMX, else `compute` (the model's compute dtype)."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return compute


def proc_kib(path: str, key: str) -> int | None:
    """The `key:` line of a /proc file such as /proc/meminfo or /proc/self/status, in bytes (the kernel
    writes KiB); None where the file or the key is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
