"""Device and compute-dtype choice.

Why fp32 on CPU by default: on CPUs without native bf16 matrix units (AVX2-only machines, most
laptops) a bf16 matmul is ~100x slower than fp32 -- a bf16 default there silently turns an
hour-long run into days. bf16 is chosen only where it is fast: CUDA, or CPUs with AMX/AVX512-BF16.
"""

from __future__ import annotations

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


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "AMX" in capability or "AVX512_BF16" in capability


def pick_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 on CUDA with bf16 support (else fp16), fp32 on CPU/MPS unless bf16 is fast."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


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
