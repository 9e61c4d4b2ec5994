"""lorakit.advise.memory: every byte count against real tensors on tiny models (NF4 buffers, LoRA
parameters, what autograd saves), and the terms and phases as a whole."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from advise_tiny import (  # noqa: F401
    TINY,
    B,
    T,
    fixed_rates_fixture,
    llama3_8b_by_hand,
    nf4_by_hand,
    predicted,
    real_model,
    run_config,
    tiny_dir_fixture,
)
from torch import nn

from lorakit.advise import (
    CPU_BASELINE_BYTES,
    activation_bytes,
    layer_activation_bytes,
    lora_parameter_count,
    memory_model,
    model_shape,
    nf4_bytes,
    optimizer_state_bytes,
    resolve_workload,
    weight_bytes,
)
from lorakit.advise.memory import (
    QUANTIZE_WORKSPACE_BYTES,
    load_bytes,
    qlora_load_parts,
    qlora_weight_bytes,
    quantize_workspace_bytes,
)
from lorakit.config import RunConfig, TrainConfig
from lorakit.loss import causal_lm_loss_sum
from lorakit.quant import NF4Linear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("out_f", "in_f"), [(7, 9), (64, 64), (96, 200), (1000, 1000)])
def test_nf4_bytes_match_a_quantized_layers_buffers(out_f, in_f, double_quant):
    layer = NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=False), blocksize=64, double_quant=double_quant)
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert nf4_bytes(out_f * in_f, 64, double_quant) == stored


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_match_the_real_model(tmp_path, tied):
    path = tmp_path / "m"
    tf.LlamaConfig(**TINY, tie_word_embeddings=tied).save_pretrained(path)
    for method in ("lora", "qlora"):
        config = run_config(str(path), method)
        model = real_model(config, tied)
        w, shape = predicted(config, masked=False)
        frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        nf4 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                  for b in m.buffers())
        assert weight_bytes(w, shape)[0] == frozen + nf4
        if method == "lora":
            assert shape.n_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("targets", ["all-linear", "attention", "minimal", ["q_proj", "down_proj"]])
def test_lora_parameter_count_matches_inject_lora(tiny_dir, targets):
    config = run_config(tiny_dir, targets=targets)
    model = real_model(config)
    w, shape = predicted(config, masked=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameter_count(w, shape) == trainable
    assert optimizer_state_bytes(w, shape) == (4 * trainable, 8 * trainable)


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (parameters and `exclude` left out)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def batch(masked: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if masked:
        mask[-1, -4:] = 0  # a padded row: transformers materializes the (B, 1, T, T) mask
    return {"input_ids": ids, "attention_mask": mask}


def layer_call(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """Capture layer 1's arguments from a forward, then return a call of that layer alone."""
    layer, captured = model.model.layers[1], {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    hook.remove()
    x = captured["args"][0].detach().requires_grad_(True)  # (B, T, d), as the previous layer's output
    kwargs = {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    shared = [v for v in kwargs.values() if torch.is_tensor(v)] + list(kwargs["position_embeddings"])
    return (lambda: layer(x, **kwargs)), shared


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("lora", 0.05), ("qlora", 0.05), ("full", 0.0)])
def test_layer_activation_bytes_match_saved_tensors(tiny_dir, method, dropout, masked):
    """Tensor by tensor: what one decoder layer saves for backward = layer_activation_bytes × tokens
    (rotary cos/sin and the attention mask are shared by all layers, counted once elsewhere)."""
    config = run_config(tiny_dir, method, dropout=dropout)
    model = real_model(config)
    call, shared = layer_call(model, batch(masked))
    measured = saved_bytes(call, [*model.parameters(), *model.buffers(), *shared])
    w, shape = predicted(config, masked)
    assert layer_activation_bytes(w, shape) * B * T == measured


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_activation_bytes_match_saved_tensors(tiny_dir, method, gc):
    """The whole forward + loss as lorakit trains (lorakit.loss: no logits): the layers, the first layer's
    frozen input, the final norm (+ for full its x̂, the head's input and the embedding's ids), and what
    the loss saves: ∂L/∂h (B·(T-1), d), its row index and, when the head trains, ∂L/∂W (V, d). Under checkpointing autograd saves only
    each layer's input; rotary cos/sin and the bool mask are then held by the checkpoints, not saved."""
    config = run_config(tiny_dir, method, gc=gc)
    model = real_model(config)
    inputs = batch(masked=True)
    measured = saved_bytes(lambda: causal_lm_loss_sum(model, inputs, inputs["input_ids"]),
                           [*model.parameters(), *model.buffers()])
    w, shape = predicted(config, masked=True)
    assert w.loss == "linear_ce"
    loss_saved = (4 * shape.hidden + 8) * B * (T - 1) + (4 * shape.vocab * shape.hidden if method == "full" else 0)
    not_saved = B * T * T + (2 * 4 * shape.head_dim * T if gc else 0)
    assert activation_bytes(w, shape) + loss_saved == measured + not_saved


def test_memory_terms_add_up_and_respond_to_settings(tiny_dir):
    base = memory_model(*predicted(run_config(tiny_dir), masked=True))
    assert base.peak_bytes == max(base.phases.values()) and base.peak_bytes > CPU_BASELINE_BYTES
    longer = run_config(tiny_dir)
    longer.data.max_seq_len = 4 * T
    assert memory_model(*predicted(longer, True)).term("activations") > 4 * base.term("activations")
    gc = memory_model(*predicted(run_config(tiny_dir, gc=True), True))
    assert gc.term("activations") < base.term("activations") and gc.term("recompute") > 0


# --------------------------------------------------------------------------- QLoRA: storage dtype and streamed load


def test_qlora_8b_weights_and_streamed_load_by_hand():
    """Llama-3-8B, bf16 checkpoint: NF4 for the 224 decoder linears (~3.35 GiB) + embedding, head and norms
    kept in bf16 (~1.96 GiB, not 4 B/weight); the load holds that + the largest weight (gate/up/down,
    4096 × 14336) in bf16 + quantize_nf4's working set, one tensor at a time."""
    hand = llama3_8b_by_hand()
    config = RunConfig(base_model="8B", method="qlora",
                       train=TrainConfig(device="cpu", dtype="float32", micro_batch_size=1, grad_accum=1))
    shape = model_shape("8B")
    w = resolve_workload(config, shape, "cpu")
    assert shape.n_params == hand["params"] and w.storage_bytes == 2 and w.compute_bytes == 4
    assert qlora_weight_bytes(w, shape) == (hand["nf4"], hand["unquantized"])
    assert weight_bytes(w, shape)[0] == hand["nf4"] + hand["unquantized"]
    assert 3.3 < hand["nf4"] / 2**30 < 3.4 and 1.9 < hand["unquantized"] / 2**30 < 2.0
    parts = qlora_load_parts(w, shape)
    assert parts == {"nf4": hand["nf4"], "unquantized": hand["unquantized"], "tensor": 2 * hand["largest"],
                     "workspace": quantize_workspace_bytes(hand["largest"])}
    mem = memory_model(w, shape)
    assert mem.phases["load"] == sum(parts.values()) + CPU_BASELINE_BYTES  # no heap slack while loading
    assert mem.term("load_transient") == 2 * hand["largest"] + quantize_workspace_bytes(hand["largest"])


@pytest.mark.parametrize(("dtype", "stored"), [(None, 4), ("bfloat16", 2), ("float16", 2), ("float32", 4)])
def test_qlora_keeps_unquantized_weights_in_the_checkpoints_dtype(tmp_path, dtype, stored):
    """Tiny Llama by hand: 2 layers of q 64×64, k and v 64×32 (2 KV heads of 16), o 64×64, gate and up
    64×176, down 176×64 in NF4; embedding and head 97×64, 5 norms of 64 in the checkpoint's dtype (a
    config.json without one: the load dtype, fp32 here)."""
    path = tmp_path / "m"
    tf.LlamaConfig(**TINY, **({"dtype": dtype} if dtype else {})).save_pretrained(path)
    w, shape = predicted(run_config(str(path), "qlora"), masked=False)
    linears = [64 * 64, 64 * 32, 64 * 32, 64 * 64, 64 * 176, 64 * 176, 176 * 64]
    nf4 = 2 * sum(nf4_by_hand(n) for n in linears)
    kept = 2 * 97 * 64 + 5 * 64
    assert qlora_weight_bytes(w, shape) == (nf4, stored * kept)
    assert load_bytes(w, shape) == nf4 + stored * kept + (stored + QUANTIZE_WORKSPACE_BYTES) * 64 * 176
    lora = dataclasses.replace(w, method="lora")
    assert load_bytes(lora, shape) == shape.n_params * 4  # LoRA loads the whole model in the load dtype


@pytest.mark.parametrize("n", [2**21, 4096 * 4096])
def test_quantize_workspace_is_what_quantize_nf4_allocates(tmp_path, n):
    """quantize_workspace_bytes against the real thing: the RSS high-water mark of a fresh process while
    quantize_nf4 runs on a bf16 weight, above the weight itself (glibc's mmap threshold pinned low so
    that freed tensors leave RSS at once); one chunk and eight chunks."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT.replace("n = 2048 * 2048", f"n = {n}"))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    measured = float(out.stdout.split()[-1]) * n
    assert 0.85 <= measured / quantize_workspace_bytes(n) <= 1.15


PEAK_SCRIPT = """
import torch
from lorakit.quant.nf4 import quantize_nf4

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

n = 2048 * 2048
w = torch.randn(n).to(torch.bfloat16)
quantize_nf4(torch.randn(64 * 64))  # the lookup tables, built once
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark
quantize_nf4(w)
print((status("VmHWM") - base) / n)
"""
