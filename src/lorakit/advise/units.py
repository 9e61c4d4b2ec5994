"""Units: byte sizes as people write them ('24GB', '24GiB'), sizes and durations as the report prints
them, and how much memory this machine has for a new process."""

from __future__ import annotations

import os
import re

from lorakit.errors import AdviceError
from lorakit.runtime.devices import proc_kib

GiB, MiB = 2**30, 2**20


def parse_bytes(text: int | float | str) -> int:
    """'24GB' -> 24·10⁹, '24GiB' -> 24·2³⁰, '512MiB', '1.5TB', or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m or not m.group(1).replace(".", "", 1).isdigit():
        raise AdviceError(f"memory {text!r} is not a size; write e.g. 24GB, 24GiB, 512MiB or a byte count")
    power = " kmgt".index(m.group(2) or " ")
    value = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if value <= 0:
        raise AdviceError(f"memory {text!r} must be more than 0 bytes; write e.g. 24GB")
    return value


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 2 else f"{n / MiB:.1f} MiB"


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def available_memory(device: str) -> int:
    """GPU total memory on cuda, else MemAvailable (what a new process can use without swapping)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AdviceError("no CUDA device here: pass memory (e.g. memory='24GB') or gpu (e.g. gpu='RTX 4090')")
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    available = proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
