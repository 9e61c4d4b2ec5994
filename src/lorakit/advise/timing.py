"""Time: seconds per optimizer step, as FLOPs per token over rates measured on this machine.

Forward 2·P over the matmul weights P (decoder linears + lm_head) + 4·T·dq per layer for attention
scores and values; backward 2·P for input gradients (frozen weights too) + 2·P weight gradients when
training in full, attention ×2.5 (flash backward recomputes the scores); + the forward again under
checkpointing; LoRA 6·r·(in+out) per target; QLoRA adds two (three with checkpointing) dequantizations
of every 4-bit weight per micro-batch; DoRA adds its norm ‖W + s·BA‖_row once per optimizer step (2·r·in·out per
target, + a dequantization of each 4-bit target; reused by the step's other micro-batches), a few (N, out)
elementwise passes per target, and with dropout one more frozen matmul per target (x_d Wᵀ, forward and ∂x).
`init_seconds` prices lora.init pissa | olora | loftq, once before the first step. Matmuls use the calibrated GEMM rate at their smaller dimension,
attention the calibrated SDPA rate; elementwise work by memory traffic; the loss, dropout masks,
dequantization, AdamW and op dispatch by their calibrated per-element costs. The calibration
(`calibrate`, a few seconds) is measured once per device, dtype and torch version and cached in
~/.cache/lorakit/calibration.json; a GPU that is not on this machine gets datasheet rates (GPUS).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.advise.memory import layer_activation_bytes, trainable_parameter_count
from lorakit.advise.shapes import ModelShape
from lorakit.advise.units import GiB, MiB, fmt_seconds
from lorakit.advise.workload import Workload
from lorakit.config import RunConfig
from lorakit.quant.linear import dequantize_scratch
from lorakit.quant.nf4 import quantize_nf4
from lorakit.runtime.cache import cache_dir
from lorakit.runtime.devices import pick_dtype

log = logging.getLogger(__name__)

GPUS: dict[str, tuple[float, float, float]] = {
    # name: (memory bytes, dense bf16 tensor FLOP/s, memory bandwidth B/s) -- datasheet peaks
    "RTX 4090": (24 * GiB, 165e12, 1008e9),
    "RTX 3090": (24 * GiB, 71e12, 936e9),
    "RTX A6000": (48 * GiB, 155e12, 768e9),
    "L4": (24 * GiB, 121e12, 300e9),
    "A10G": (24 * GiB, 70e12, 600e9),
    "T4": (16 * GiB, 65e12, 320e9),
    "L40S": (48 * GiB, 362e12, 864e9),
    "A100-40GB": (40 * GiB, 312e12, 1555e9),
    "A100-80GB": (80 * GiB, 312e12, 2039e9),
    "H100": (80 * GiB, 989e12, 3350e9),
}
GPU_MATMUL_EFFICIENCY = 0.55
"""Share of a datasheet peak that eager-mode training matmuls reach, used only for a GPU that is not on
this machine (a GPU that is gets measured)."""


# --------------------------------------------------------------------------- calibration


def _cache_path() -> Path:
    return cache_dir() / "calibration.json"


RATES_VERSION = 2  # what the rates measure changed (2: the NF4 decode the matmuls run, lorakit.quant.native)


def _device_key(device: str, dtype: str) -> str:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name() + f" x{torch.get_num_threads()} threads"
    return f"{device}|{name}|{dtype}|torch {torch.__version__.split('+')[0]}|rates {RATES_VERSION}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MATMUL_SIZES = (32, 128, 512, 2048)


def calibrate(device: str = "cpu", dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Measured rates of this machine, cached per (device, dtype, torch version):

    matmul_flops   {k: FLOP/s of (1024×k)@(k×k)} (×8 rows and k on CUDA) -- interpolated in log k
    attention_flops  FLOP/s of scaled_dot_product_attention forward + backward with a float mask
    lora_flops     FLOP/s of a rank-16 adapter's skinny matmuls, forward + backward
    bandwidth      B/s of an elementwise multiply over 64 MiB tensors (read 2, write 1)
    bernoulli_s    seconds per element of a dropout mask (CPU draws random numbers one by one)
    softmax_s      seconds per logit of the loss: fp32 upcast, log-softmax, nll and their backward
    dequant_s      seconds per weight of lorakit's NF4 dequantization
    adamw_s        seconds per parameter of torch's AdamW step (+ gradient clipping)
    op_s           seconds per small autograd op (dispatch overhead)
    svd_s, qr_s    seconds per m·n·min(m, n) of torch.linalg.svd / qr on a 256×512 fp32 matrix (lora.init)
    """
    key = _device_key(device, dtype)
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache and not force:
        return cache[key]
    busy = _OtherLoad()
    result = _measure(device, dtype)
    result["other_load"] = busy.share()
    if result["other_load"] > 0.1:
        log.warning("calibrated while other processes used %.0f%% of the CPUs: the rates (and so the time "
                    "predictions) are low; calibrate again on a quiet machine", 100 * result["other_load"])
    cache[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=2))
    tmp.replace(path)
    return result


class _OtherLoad:
    """Share of this machine's CPU time that other processes use from construction to `share()`
    (Linux /proc/stat; 0.0 elsewhere): a busy machine makes every measured rate too low."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        mine = resource.getrusage(resource.RUSAGE_SELF)
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        return busy, mine.ru_utime + mine.ru_stime, time.monotonic()

    def share(self) -> float:
        end = self._now()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return 0.0
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(0.0, others / ((end[2] - self.start[2]) * (os.cpu_count() or 1))), 3)


def _timed(fn, budget: float = 0.1, sync=lambda: None, rounds: int = 3) -> float:
    """Seconds per call of `fn`: the median over a small time budget (after one warm-up call), the best
    of `rounds` such medians. The median, not the best call, because training sustains typical rates;
    the best of a few medians so that a burst of other work on the machine does not become the rate."""
    fn()
    sync()
    medians = []
    for _ in range(rounds):
        times: list[float] = []
        while sum(times) < budget or len(times) < 3:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        medians.append(sorted(times)[len(times) // 2])
    return min(medians)


def _measure(device: str, dtype: str) -> dict[str, Any]:
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    scale = 8 if device == "cuda" else 1
    rates = {}
    for k in MATMUL_SIZES:
        a = torch.randn(1024 * scale, k * scale, device=device, dtype=dt)
        b = torch.randn(k * scale, k * scale, device=device, dtype=dt)
        rates[str(k * scale)] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / _timed(lambda a=a, b=b: a @ b, sync=sync)
    x = torch.randn(64 * MiB // 4, device=device)  # 2×64 MiB: larger than a CPU's last-level cache
    y = torch.empty_like(x)
    bandwidth = 3 * x.numel() * 4 / _timed(lambda: torch.mul(x, x, out=y), sync=sync)
    mask = torch.empty(1024 * 1024, device=device)
    bernoulli = _timed(lambda: mask.bernoulli_(0.95), sync=sync) / mask.numel()
    state = quantize_nf4(torch.randn(1024, 1024, device=device))
    dequant = _timed(lambda: dequantize_scratch(state, dt), sync=sync) / (1024 * 1024)  # as the matmuls decode
    p = torch.nn.Parameter(torch.randn(1024, 1024, device=device))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4)

    def adam():
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()

    adamw = _timed(adam, sync=sync) / p.numel()
    logits = torch.randn(1024, 8000, device=device, dtype=dt, requires_grad=True)
    labels = torch.randint(0, 8000, (1024,), device=device)

    def loss():
        torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()

    softmax = _timed(loss, sync=sync) / logits.numel()
    s = torch.randn(8, 8, device=device, requires_grad=True)
    op = _timed(lambda: (s * 2).sum().backward(), sync=sync) / 4  # 2 ops forward, 2 backward
    return {"matmul_flops": rates, "attention_flops": _attention_rate(device, dt, sync),
            "lora_flops": _lora_rate(device, dt, sync), "bandwidth": bandwidth, **_factorization_rates(device, sync),
            "dequant_s": dequant, "adamw_s": adamw, "op_s": op, "bernoulli_s": bernoulli, "softmax_s": softmax,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def _lora_rate(device: str, dt: Any, sync) -> float:
    """FLOP/s of a rank-16 adapter path forward + backward, x (M, 512) -> A (16, 512) -> B (512, 16):
    skinny matmuls, bound by reading x rather than by arithmetic. 6·r·(in + out) FLOPs per row."""
    import torch

    rows = 8192 if device == "cuda" else 2048
    x = torch.randn(rows, 512, device=device, dtype=dt, requires_grad=True)
    a = torch.randn(16, 512, device=device, dtype=dt, requires_grad=True)
    b = torch.randn(512, 16, device=device, dtype=dt, requires_grad=True)

    def lora():
        torch.nn.functional.linear(torch.nn.functional.linear(x, a), b).sum().backward()

    return 6 * rows * 16 * (512 + 512) / _timed(lora, sync=sync)


def _factorization_rates(device: str, sync) -> dict[str, float]:
    """svd_s and qr_s: one timed call each (after a warm-up) on a 256×512 fp32 matrix, per m·n·min(m, n).
    NOTE: CPU LAPACK's SVD is ~2× cheaper per unit on 2048-wide matrices than on this small one (measured),
    so the estimate errs long; it only has to tell seconds from hours."""
    import torch

    W = torch.randn(256, 512, device=device)
    units = 256 * 512 * 256
    out = {}
    for name, fn in (("svd_s", lambda: torch.linalg.svd(W, full_matrices=False)), ("qr_s", lambda: torch.linalg.qr(W))):
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out[name] = (time.perf_counter() - start) / units
    return out


def _attention_rate(device: str, dt: Any, sync) -> float:
    """FLOP/s of SDPA forward + backward with a float mask (as with padded or packed rows): 4·T²·hd per
    head forward, ×2.5 backward. Head dim 64 (128 on CUDA), T = 256 (1024 on CUDA)."""
    import torch

    hd, t = (128, 1024) if device == "cuda" else (64, 256)
    q, k, v = (torch.randn(2, 8, t, hd, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, t, t, device=device, dtype=dt)

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    return 2 * 8 * 4 * t * t * hd * 3.5 / _timed(attention, sync=sync)


def assumed_gpu_rates(gpu: str) -> dict[str, Any]:
    """Rates of a GPU that is not on this machine: datasheet peaks × GPU_MATMUL_EFFICIENCY (assumed)."""
    _, flops, bw = GPUS[gpu]
    rate = flops * GPU_MATMUL_EFFICIENCY
    return {"matmul_flops": {"256": rate / 4, "1024": rate * 0.8, "4096": rate, "16384": rate},
            "attention_flops": 0.5 * rate,  # memory-efficient/flash kernels with a mask: about half the GEMM rate
            "lora_flops": 8 * 0.8 * bw,  # rank 16, fp32 adapters: bound by memory, 6r FLOPs per 12 bytes moved
            "bandwidth": 0.8 * bw, "dequant_s": 24 / (0.8 * bw), "adamw_s": 64 / (0.8 * bw), "op_s": 8e-6,
            "bernoulli_s": 9 / (0.8 * bw), "softmax_s": 40 / (0.8 * bw),
            "measured": f"assumed: {gpu} datasheet × {GPU_MATMUL_EFFICIENCY}"}


def matmul_rate(rates: dict[str, Any], k: float) -> float:
    """FLOP/s for a matmul whose smaller weight dimension is k: log-linear between calibrated sizes."""
    table = sorted((int(s), r) for s, r in rates["matmul_flops"].items())
    if k <= table[0][0]:
        return table[0][1] * k / table[0][0]  # below the smallest size: proportionally slower
    for (k0, r0), (k1, r1) in zip(table, table[1:], strict=False):
        if k <= k1:
            t = math.log(k / k0) / math.log(k1 / k0)
            return r0 + t * (r1 - r0)
    return table[-1][1]


def rates_for(dev: str, config: RunConfig, gpu: str | None, calibrate_now: bool) -> dict[str, Any]:
    """The rates to predict `config` on `dev` with: a named GPU's datasheet, this machine's cached
    calibration, a fresh one (`calibrate_now`), or assumed ones when neither is allowed."""
    import torch

    on_machine = dev == "cpu" or (gpu is None and torch.cuda.is_available())
    if not on_machine:
        return assumed_gpu_rates(gpu or "A100-80GB")
    dtype = config.train.dtype
    if dtype == "auto":
        dtype = str(pick_dtype("auto", dev)).removeprefix("torch.")
    if config.method == "full" and dev == "cpu":
        dtype = "float32"
    key = _device_key(dev, dtype)
    path = _cache_path()
    cached = json.loads(path.read_text()).get(key) if path.is_file() else None
    if cached or calibrate_now:
        return cached or calibrate(dev, dtype)
    return assumed_gpu_rates("A100-80GB") if dev == "cuda" else {
        "matmul_flops": {"32": 2e9, "128": 2e10, "512": 5e10, "2048": 6e10}, "bandwidth": 1e10,
        "dequant_s": 5e-9, "adamw_s": 5e-9, "op_s": 1e-5, "bernoulli_s": 6e-9, "softmax_s": 3e-9, "measured": "assumed (no calibration yet)"}


# --------------------------------------------------------------------------- the time model


@dataclass
class TimeModel:
    flops_per_token: float
    step_time_s: float
    parts: dict[str, float]  # seconds per optimizer step, by cause
    tokens_per_step: int
    rates_source: str


def time_model(w: Workload, shape: ModelShape, rates: dict[str, Any]) -> TimeModel:
    """Seconds per optimizer step = grad_accum × (matmuls + attention + elementwise + dequant + dispatch)
    + AdamW; see the module docstring for the FLOP counts."""
    n, r, gc = w.tokens, w.lora.r, w.checkpointing
    passes_frozen = 2 + (1 if gc else 0) if w.method != "full" else 3 + (1 if gc else 0)  # fwd, bwd-x(, bwd-w), recompute
    mm = 0.0
    flops = 0.0
    for lin in shape.layer_linears:
        f = 2 * n * lin.numel * passes_frozen * shape.layers
        mm += f / matmul_rate(rates, min(lin.in_features, lin.out_features))
        flops += f
    head_passes = 3 if w.method == "full" else 2
    f_head = 2 * n * shape.head_matmul * head_passes
    mm += f_head / matmul_rate(rates, shape.hidden)
    flops += f_head
    lora_f = shape.layers * sum(2 * n * r * (t.in_features + t.out_features) for t in w.lora_targets)
    lora_f *= 3 + (1 if gc else 0)
    mm += lora_f / (rates.get("lora_flops") or matmul_rate(rates, max(r, 32)))
    flops += lora_f
    causal = 1.0 if w.masked else 0.5
    attn_f = shape.layers * 4 * n * w.seq_len * shape.q_dim * causal * (1 + 2.5 + (1 if gc else 0))
    attn = attn_f / (rates.get("attention_flops") or matmul_rate(rates, shape.head_dim))
    flops += attn_f
    elementwise = _elementwise_bytes(w, shape) / rates["bandwidth"]
    loss = shape.vocab * w.tokens * rates.get("softmax_s", 0.0) if w.task == "causal_lm" else 0.0
    dequant = 0.0
    if w.method == "qlora":
        n_q = shape.layers * shape.layer_linear_params
        dequant = n_q * rates["dequant_s"] * (2 + (1 if gc else 0))
    ops = shape.layers * (60 + 14 * len(w.lora_targets)) * (1.5 if gc else 1.0)
    dispatch = ops * rates["op_s"]
    dora = _dora_seconds(w, shape, rates) if w.method != "full" and w.lora.use_dora else (0.0, 0.0)
    dropout = 0.0
    if w.method != "full" and w.lora.dropout > 0:  # one mask per target input, redrawn in the recompute
        masks = shape.layers * sum(t.in_features for t in w.lora_targets) * n * (2 if gc else 1)
        dropout = masks * rates.get("bernoulli_s", 0.0)
    micro = mm + attn + elementwise + loss + dequant + dispatch + dropout + dora[0]
    opt = trainable_parameter_count(w, shape) * rates["adamw_s"]
    parts = {"matmul": mm * w.grad_accum, "attention": attn * w.grad_accum, "elementwise": elementwise * w.grad_accum,
             "loss": loss * w.grad_accum,
             "dequantize": dequant * w.grad_accum, "dropout_masks": dropout * w.grad_accum,
             "dispatch": dispatch * w.grad_accum, "dora": dora[0] * w.grad_accum + dora[1], "optimizer": opt}
    return TimeModel(flops / n, micro * w.grad_accum + opt + dora[1], parts, n * w.grad_accum, rates.get("measured", ""))


def _dora_seconds(w: Workload, shape: ModelShape, rates: dict[str, Any]) -> tuple[float, float]:
    """(per micro-batch, per optimizer step) seconds DoRA adds: (the extra frozen matmul x_d Wᵀ with dropout,
    forward + ∂x (+ recompute), and (N, out) elementwise passes; the norm once per step)."""
    n, gc, targets = w.tokens, w.checkpointing, w.lora_targets
    extra_mm = 0.0
    if w.lora.dropout > 0:
        extra_mm = sum(2 * n * t.numel * (2 + (1 if gc else 0)) / matmul_rate(rates, min(t.in_features, t.out_features))
                       for t in targets)
    passes = DORA_ELEMENTWISE_PASSES * (1.5 if gc else 1.0)
    elementwise = sum(passes * w.compute_bytes * t.out_features * n for t in targets) / rates["bandwidth"]
    norm = sum(2 * w.lora.r * t.numel / (rates.get("lora_flops") or matmul_rate(rates, 32)) for t in targets)
    if w.method == "qlora":
        norm += sum(t.numel for t in targets) * rates["dequant_s"]
    return shape.layers * (extra_mm + elementwise), shape.layers * norm


DORA_ELEMENTWISE_PASSES = 6.0
"""(N, out) passes DoRA adds per target: z = base + lora, m/n ⊙ z, + b, and their gradients (assumed)."""

SVD_UNIT_S_ASSUMED = {"cpu": 1e-8, "cuda": 2e-11}
"""Seconds per m·n·min(m, n) of an fp32 SVD when no calibration has svd_s: this machine's CPU measured
~0.9-1.8e-8 (2 cores, 256-2048 wide); a datacenter GPU's cuSOLVER assumed ~2e-11 (4096² in ~1.5 s)."""


def init_seconds(w: Workload, shape: ModelShape, rates: dict[str, Any]) -> float:
    """Seconds lora.init takes before the first step, over every target weight (m, n), k = min(m, n):

        pissa          svd_s · m·n·k                   (torch.linalg.svd, fp32)
        pissa_niter_N  (2N + 2) · 2·m·n·r FLOPs          (torch.svd_lowrank: N power iterations; matmul rate)
        olora          qr_s · m·n·k                    (torch.linalg.qr)
        loftq          loftq_iter · (svd_s · m·n·k + 3·m·n · dequant_s)   (SVD + NF4 round trip per round)
    """
    init = w.lora.init
    if w.method == "full" or not init.startswith(("pissa", "olora", "loftq")):
        return 0.0
    svd = rates.get("svd_s") or SVD_UNIT_S_ASSUMED.get(w.device, SVD_UNIT_S_ASSUMED["cpu"])
    qr = rates.get("qr_s") or svd / 10
    total = 0.0
    for t in list(w.lora_targets) * shape.layers + list(w.extra_targets):
        units = t.numel * min(t.in_features, t.out_features)  # m·n·k
        if init.startswith("pissa_niter_"):
            niter = int(init.removeprefix("pissa_niter_"))
            total += (2 * niter + 2) * 2 * t.numel * w.lora.r / matmul_rate(rates, max(32, w.lora.r))
        elif init == "pissa":
            total += svd * units
        elif init == "olora":
            total += qr * units
        else:
            total += w.lora.loftq_iter * (svd * units + 3 * t.numel * rates["dequant_s"])
    return total


ELEMENTWISE_PASSES = 4.0
"""Times each saved activation byte crosses memory in the non-matmul ops of forward + backward (norms,
RoPE, activation, residual adds, dtype copies, their gradients); +50% under checkpointing."""


def _elementwise_bytes(w: Workload, shape: ModelShape) -> float:
    """Memory traffic of the elementwise work per micro-batch, ~ELEMENTWISE_PASSES × saved activations."""
    per_layer = layer_activation_bytes(w, shape) * w.tokens
    return shape.layers * per_layer * ELEMENTWISE_PASSES * (1.5 if w.checkpointing else 1.0)


INIT_WARN_S = 600.0
"""lora.init estimates above this get a warning (before any weight loads) with a faster alternative."""


def init_note(w: Workload, shape: ModelShape, rates: dict[str, Any]) -> list[str]:
    """The advisor's line on lora.init's one-off cost; a warning with the alternative when it is long."""
    seconds = init_seconds(w, shape, rates)
    if seconds <= 0:
        return []
    n = shape.layers * len(w.lora_targets) + len(w.extra_targets)
    note = (f"lora.init: {w.lora.init} factors {n} weights on {w.device} before the first step: ~{fmt_seconds(seconds)} "
            "(once)")
    gpu = ", or train on a GPU" if w.device == "cpu" else ""
    if seconds > INIT_WARN_S and w.lora.init == "pissa":
        fast = dataclasses.replace(w, lora=dataclasses.replace(w.lora, init="pissa_niter_4"))
        note += (f". WARNING: that is long; lora.init: pissa_niter_4 (randomized SVD, PEFT's fast PiSSA) takes "
                 f"~{fmt_seconds(init_seconds(fast, shape, rates))}{gpu}")
    elif seconds > INIT_WARN_S and w.lora.init == "loftq":
        note += f". WARNING: that is long; each of the {w.lora.loftq_iter} rounds is one SVD per weight: lower lora.loftq_iter{gpu}"
    return [note]
