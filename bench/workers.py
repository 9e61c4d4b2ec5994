"""One measurement per process, for bench_train.py: training steps, generation, quantization, the fp32 matmul ceiling.

    python bench/workers.py '{"kind": "train", "stack": "lorakit", "method": "lora", "gc": false, ...}'

prints one line `RESULT {json}`. Each runs in a fresh process so that its peak RSS is its own
(`ru_maxrss`; the training peak is taken after resetting the high-water mark once the model is
loaded, through /proc/self/clear_refs). Both stacks load the same saved random-init model directory,
see the same token ids, and run the same optimizer (AdamW, lr 1e-4, no weight decay, clip at 1.0).

  lorakit   lorakit.train.prepare_model / build_optimizer / loss_sum: the code `lorakit train` runs
  peft      transformers `from_pretrained` (+ BitsAndBytesConfig NF4, double quant, fp32 compute, and
            `prepare_model_for_kbit_training` for QLoRA) + `peft.get_peft_model`, loss = model(labels=...).loss
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

LORA = dict(r=16, alpha=32)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the high-water mark (Linux >= 4.0), so the next peak_rss() covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def token_batches(spec: dict, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)  # (B, T)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


# --------------------------------------------------------------------------- training


def lorakit_trainer(spec: dict) -> tuple[torch.nn.Module, Any, Any]:
    from lorakit.config import load_run_config
    from lorakit.train import build_optimizer, loss_sum, prepare_model

    config = load_run_config(None, [
        f"base_model={spec['model_dir']}", f"method={spec['method']}", f"lora.r={LORA['r']}",
        f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0", "lora.target_modules=all-linear",
        "quant.compute_dtype=float32", f"train.gradient_checkpointing={str(spec['gc']).lower()}",
        "train.dtype=float32", "train.device=cpu", "train.lr=1e-4", "train.weight_decay=0.0",
        f"train.micro_batch_size={spec['batch']}", "train.grad_accum=1", "output_dir=/tmp/unused",
    ])
    model, _ = prepare_model(config, torch.device("cpu"), torch.float32)
    model.train()
    optimizer = build_optimizer(model, config)

    def loss_fn(batch):  # Loop.step: Σ CE over the micro-batch / supervised tokens
        return loss_sum(model, batch) / int((batch["labels"][:, 1:] != -100).sum())

    return model, optimizer, loss_fn


def peft_trainer(spec: dict) -> tuple[torch.nn.Module, Any, Any]:
    import peft
    import transformers as tf

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if spec["method"] == "qlora":
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    model = tf.AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    if spec["method"] == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gc"])
    if spec["method"] == "full":
        model.requires_grad_(True)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear"))
    if spec["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def loss_fn(batch):
        return model(**batch).loss

    return model, optimizer, loss_fn


def train(spec: dict) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    model, optimizer, loss_fn = (lorakit_trainer if spec["stack"] == "lorakit" else peft_trainer)(spec)
    setup_s, load_peak = time.perf_counter() - start, peak_rss()
    reset_ok = reset_peak_rss()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = token_batches(spec, spec["warmup"] + spec["steps"])
    times, losses = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    train_peak = peak_rss()
    forward_s = None
    if not spec["gc"]:  # the forward alone, the unit of recompute cost (no_grad: lorakit's loss would
        t0 = time.perf_counter()  # otherwise count the head's backward, which it makes in its forward)
        with torch.no_grad():
            loss_fn(batches[-1])
        forward_s = time.perf_counter() - t0
    step_s = statistics.median(times)
    return {
        "step_s": step_s, "step_times": times, "tokens_per_s": spec["batch"] * spec["seq"] / step_s,
        "forward_s": forward_s, "setup_s": setup_s, "losses": losses,
        "peak_rss": train_peak if reset_ok else None, "load_peak_rss": load_peak,
        "trainable": sum(p.numel() for p in params),
    }


# --------------------------------------------------------------------------- generation


def _fill_lora_b(model: torch.nn.Module) -> None:
    """Non-zero B factors (same values for both stacks: same module order), so the adapter does something."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)


def generate(spec: dict) -> dict:
    """Decode tokens/s with the adapter unmerged, then merged into the base (same process, same prompts)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, spec["vocab"], (spec["gen_batch"], spec["prompt"]), generator=g)  # (B, P)
    mask = torch.ones_like(ids)
    model, run, merge = _lorakit_decoder(spec) if spec["stack"] == "lorakit" else _peft_decoder(spec)
    out = {}
    for state in ("unmerged", "merged"):
        if state == "merged":
            model = merge(model)
        run(model, ids, mask, 4)  # warm-up
        t0 = time.perf_counter()
        n_new = run(model, ids, mask, spec["new_tokens"])
        out[f"{state}_tokens_per_s"] = ids.shape[0] * n_new / (time.perf_counter() - t0)
    return out


def _lorakit_decoder(spec: dict):
    from lorakit.config import LoraConfig
    from lorakit.generate import GenerationConfig, decode
    from lorakit.lora import inject_lora, merge_lora_weights
    from lorakit.models import load_model

    model = load_model(spec["model_dir"], dtype=torch.float32)
    inject_lora(model, LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, target_modules="all-linear"))
    _fill_lora_b(model)

    def run(model, ids, mask, n):
        out = decode(model.eval(), ids, mask, GenerationConfig(max_new_tokens=n), stop_ids=set(), pad_id=0)
        assert all(len(o.token_ids) == n for o in out)
        return n

    return model, run, merge_lora_weights


def _peft_decoder(spec: dict):
    import peft
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear"))
    _fill_lora_b(model)

    @torch.no_grad()
    def run(model, ids, mask, n):
        out = model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0)
        return out.shape[1] - ids.shape[1]

    return model, run, lambda model: model.merge_and_unload()


# --------------------------------------------------------------------------- quantization


def quantize(spec: dict) -> dict:
    """Whole-model NF4 (blocksize 64, double quant): the kernel over every linear weight (lm_head kept),
    and end to end from the saved fp32 checkpoint to a 4-bit model in memory."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    weights = [m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    if spec["stack"] == "lorakit":
        from lorakit.quant import quantize_nf4

        kernel = lambda w: quantize_nf4(w, 64, True)  # noqa: E731
    else:
        import bitsandbytes.functional as bnbf

        kernel = lambda w: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
    kernel(weights[0])  # warm-up (lookup tables, library load)
    t0 = time.perf_counter()
    for w in weights:
        kernel(w)
    kernel_s = time.perf_counter() - t0
    del model, weights
    t0 = time.perf_counter()
    if spec["stack"] == "lorakit":
        from lorakit.config import QuantConfig
        from lorakit.models import load_model
        from lorakit.quant import quantize_model

        quantize_model(load_model(spec["model_dir"], dtype=torch.float32), QuantConfig(), torch.float32, progress=False)
    else:
        tf.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, device_map="cpu",
                                                quantization_config=tf.BitsAndBytesConfig(
                                                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    return {"kernel_s": kernel_s, "end_to_end_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the fp32 matmul ceiling


def ceiling(spec: dict) -> dict:
    """Best sustained fp32 torch.mm rate on the training's own shapes, in both layouts F.linear meets
    (x Wᵀ in forward, g W in backward); M = batch · seq rows."""
    m, d, i, v = spec["batch"] * spec["seq"], spec["hidden"], spec["intermediate"], spec["vocab"]
    rates = {}
    for k, n in ((d, d), (d, i), (i, d), (d, v)):
        w = torch.randn(n, k)  # (out, in), as nn.Linear stores it
        rates[f"({m}x{k}) @ ({n}x{k})ᵀ"] = _mm_rate(torch.randn(m, k), w.t(), spec["ceiling_s"])
        rates[f"({m}x{n}) @ ({n}x{k})"] = _mm_rate(torch.randn(m, n), w, spec["ceiling_s"])
    return {"flops": max(rates.values()), "rates": rates}


def _mm_rate(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * reps / (time.perf_counter() - t0)


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    load_before = os.getloadavg()[0]
    result = {"train": train, "generate": generate, "quantize": quantize, "ceiling": ceiling}[spec["kind"]](spec)
    result.update(load_1min=[load_before, os.getloadavg()[0]], threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
