"""Memory: the peak over the phases of a run (load, forward, backward, optimizer step, eval, save), from
these terms, each in bytes (N = B·T tokens per micro-batch, N' = B·(T-1), b = compute-dtype bytes,
a = adapter bytes: 4, lorakit's LoRA factors are fp32):

    weights        Σ storage: fp32/bf16 = 4/2 bytes per weight; NF4 = n/2 + 4·⌈n/64⌉ (absmax) or with
                   double quant n/2 + ⌈n/64⌉ + 4·⌈n/64/256⌉ + 4; embeddings, norms, lm_head unquantized
    trainable      LoRA A, B: r·(in+out) per target, in a bytes, or all weights (full); DoRA + out (m)
    gradients      one per trainable parameter, in its dtype
    AdamW states   exp_avg + exp_avg_sq: 2 per trainable parameter, in its dtype (8-bit: 1 byte each)
    activations    L · N · s_layer + N · (final norm 4d + 4; full: + x̂, the head's input, ids), what
                   autograd saves; the first layer's input needs no gradient under LoRA (its norm and
                   dropout masks save nothing); with gradient checkpointing L · N · b·d (each layer's
                   input) plus one layer's s_layer, recomputed in backward
    loss           lorakit.loss (Llama-like heads): no logits at all, (2·b·d + 8)·N' for the rows of h
                   and ∂L/∂h + 2 × a 32 MiB chunk of fp32 logits (+ ∂L/∂W when the head trains); the
                   plain logits path: b·V·N logits + 4·V·N' fp32 copy + 4·V·N' log-softmax, then 12·V·N'
                   in backward -- the usual surprise
    overhead       CPU: interpreter + torch + transformers + this code path's first step, measured here,
                   and glibc heap slack (CPU_HEAP_SLACK); GPU: CUDA context + caching-allocator slack

s_layer, per token, for a Llama block with fused SDPA attention (checked tensor by tensor with
`saved_tensors_hooks` in tests/advise/test_memory.py):

    2 RMSNorms       2·(4d + 4)          fp32 input (RMSNorm upcasts) + rsqrt;  + 2·b·d when norms train
    attention        b·(2·dq + 2·dkv) + 4·h    q, k, v, output, logsumexp (flash / memory-efficient
                                         kernels save no T×T matrix); with a padding/packing mask K and
                                         V are expanded to all heads (dkv -> dq) and the bool mask is
                                         converted to a float mask per layer: + b·T
    gated MLP        3·b·i               act(gate) input, its output, up (the product's operands)
    linear inputs    full: b·in per distinct input (attention output already counted);
                     LoRA: per target a·in (x in the adapter's dtype; one tensor per input site when
                     b = a), with dropout 2a·in on CPU (noise + output) or (1 + a)·in on CUDA (bool
                     mask + output); + a·r (A's output, saved by B); DoRA + b·out (z = x Wᵀ + s·x AᵀBᵀ,
                     saved for ∂m), 2·b·out with dropout (x_d Wᵀ and s·x_d AᵀBᵀ, lorakit.dora)
    dora_norm        DoRA's n = ‖W + s·BA‖_row, computed in fp32 row chunks of ≤ NORM_CHUNK_BYTES per forward
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lorakit.advise.shapes import Linear, ModelShape
from lorakit.advise.units import MiB, fmt_bytes
from lorakit.advise.workload import Workload
from lorakit.dora import NORM_CHUNK_BYTES
from lorakit.loss import ROW_CHUNK_BYTES
from lorakit.quant.nf4 import QUANT_CHUNK

# --------------------------------------------------------------------------- constants (measured or assumed)

CPU_BASELINE_BYTES = 360 * MiB
"""Peak RSS of lorakit's training path with a negligible model (the 'nano' model of
bench/advisor_calibration.py: hidden 32, 1 layer, 8 tokens), measured on this machine (torch 2.13,
transformers 5.23, Python 3.11, 2 cores): interpreter + torch + transformers imports ~228 MiB,
from_pretrained/tokenizer machinery +121 MiB, first training steps (thread pools, kernel code pages)
+11 MiB. Every model-dependent term is added to this."""

CPU_PLOT_BYTES = 32 * MiB
"""matplotlib import + one figure (loss.png at the end of a run), measured: the CPU 'save' phase."""

CPU_HEAP_SLACK = 0.9
"""glibc keeps freed heap pages. After the first free of a large block it raises its mmap threshold (up
to GLIBC_MMAP_MAX), so from the second step on every tensor below it lives in the heap, and the
fragmented free space a step leaves is not returned. Peak RSS exceeds the live-tensor peak by about
this share of the bytes one forward allocates in such tensors (`_heap_churn`: the activations it
would save without checkpointing -- checkpointing still allocates them, layer by layer -- and the
logits-path loss buffers). Least-squares fits on the batch-4 h256 rows of bench/advisor_calibration.py
gave 0.81-0.92 (two loss implementations); the live-tensor peaks, measured separately with
MALLOC_MMAP_THRESHOLD_ set, agree with the model within -8%..+1%. Linux/glibc only."""

GLIBC_MMAP_MAX = 32 * MiB
"""glibc's largest dynamic mmap threshold (64-bit): blocks above it are always mmapped, returned on free."""

QUANTIZE_WORKSPACE_BYTES = 12
"""Bytes per weight of one chunk that lorakit.quant.quantize_nf4 allocates beyond its input at its peak: the
fp32 copy (4), the scaled values and their clamp (4 + 4), then the int32 bucket indices (4) while the clamp
and the copy are alive. quantize_nf4 works QUANT_CHUNK weights at a time, so this is paid on at most one
chunk; the per-chunk codes and scales gathered before the final concatenation cost about
QUANTIZE_GATHER_BYTES per weight beyond the first chunk. Measured (RSS high-water mark, bf16 input):
2²¹ weights 11.9 B/weight; 4096×4096 41.9 MiB (the model: 43.5 MiB)."""

QUANTIZE_GATHER_BYTES = 1.25


def quantize_workspace_bytes(n: int) -> int:
    """quantize_nf4's working set for an n-weight tensor (see QUANTIZE_WORKSPACE_BYTES)."""
    return int(QUANTIZE_WORKSPACE_BYTES * min(n, QUANT_CHUNK) + QUANTIZE_GATHER_BYTES * max(0, n - QUANT_CHUNK))

CUDA_CONTEXT_BYTES = 500 * MiB
"""CUDA context + cuBLAS/cuDNN workspaces: device memory outside torch.cuda.max_memory_allocated."""

CUDA_ALLOCATOR_SLACK = 0.08
"""The caching allocator's reserved-minus-allocated at the peak (block rounding, fragmentation)."""


# --------------------------------------------------------------------------- the terms


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Storage of one NF4 weight: packed codes + absmax (fp32, or 8-bit + fp32 per 256 blocks + offset)."""
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


def lora_parameter_count(w: Workload, shape: ModelShape) -> int:
    """r·(in + out) per target: A is (r, in), B is (out, r)."""
    r, m = w.lora.r, int(w.lora.use_dora)  # DoRA: + m, (out,)
    return shape.layers * sum(r * (t.in_features + t.out_features) + m * t.out_features for t in w.lora_targets) + sum(
        r * (t.in_features + t.out_features) + m * t.out_features for t in w.extra_targets)


def trainable_parameter_count(w: Workload, shape: ModelShape) -> int:
    return shape.n_params if w.method == "full" else lora_parameter_count(w, shape)


def quantized_linears(w: Workload, shape: ModelShape) -> list[Linear]:
    """The linear layers of one decoder layer that QLoRA stores in NF4 (all but quant.skip_modules)."""
    skip = w.quant.skip_modules
    return [lin for lin in shape.layer_linears if not any(lin.name.endswith(s) for s in skip)]


def qlora_weight_bytes(w: Workload, shape: ModelShape) -> tuple[int, int]:
    """(NF4 bytes of the quantized linears, bytes of every other weight): embeddings, norms, head and
    biases stay in the checkpoint's storage dtype (bf16 for a bf16 checkpoint), not the compute dtype."""
    q = w.quant
    quantized = quantized_linears(w, shape)
    nf4 = shape.layers * sum(nf4_bytes(lin.numel, q.blocksize, q.double_quant) for lin in quantized)
    kept = shape.n_params - shape.layers * sum(lin.numel for lin in quantized)
    return nf4, kept * w.storage_bytes


def weight_bytes(w: Workload, shape: ModelShape) -> tuple[int, str]:
    """Base weights by storage (the LoRA factors are a separate term)."""
    if w.method != "qlora":
        what = "fp32" if w.load_bytes == 4 else "bf16/fp16"
        return shape.n_params * w.load_bytes, f"{shape.n_params / 1e6:,.1f}M weights × {w.load_bytes} B ({what})"
    q = w.quant
    nf4, kept_bytes = qlora_weight_bytes(w, shape)
    n_q = shape.layers * sum(lin.numel for lin in quantized_linears(w, shape))
    kept = shape.n_params - n_q
    dq = "double-quantized absmax" if q.double_quant else "fp32 absmax"
    return nf4 + kept_bytes, (
        f"{n_q / 1e6:,.1f}M weights in NF4 ({nf4 / max(1, n_q):.3f} B/weight: 4-bit codes + {dq} per {q.blocksize}) + "
        f"{kept / 1e6:,.1f}M embeddings/norms/head/biases kept in the checkpoint's dtype ({w.storage_bytes} B)")


def qlora_load_parts(w: Workload, shape: ModelShape) -> dict[str, int]:
    """The peak of a streamed QLoRA load, by part. The checkpoint is read tensor by tensor: each weight
    to quantize is read in its storage dtype, quantized to NF4 (+ double quant) and dropped before the
    next, so at the last and largest one the process holds

        nf4          every quantized linear in NF4 (the final form)
        unquantized  embeddings, norms, head, biases in their storage dtype (read once, kept)
        tensor       the largest quantized weight, n·s bytes in its storage dtype s
        workspace    quantize_nf4's working set for it, quantize_workspace_bytes(n) (its fp32 copy included)
    """
    nf4, kept = qlora_weight_bytes(w, shape)
    largest = max((lin.numel for lin in quantized_linears(w, shape)), default=0)
    return {"nf4": nf4, "unquantized": kept, "tensor": largest * w.storage_bytes,
            "workspace": quantize_workspace_bytes(largest)}


def qlora_load_summary(w: Workload, shape: ModelShape) -> str:
    """What a streamed QLoRA load holds at its peak, in words and numbers."""
    parts = qlora_load_parts(w, shape)
    stored = shape.checkpoint_dtype or f"{w.storage_bytes}-byte"
    n = shape.layers * len(quantized_linears(w, shape))
    return (f"the QLoRA load is streamed: each of the {n} quantized weights is read in its storage dtype ({stored}), "
            f"quantized to NF4 and dropped before the next; embeddings, norms and head stay in {stored}. Tensors at the "
            f"load peak: NF4 {fmt_bytes(parts['nf4'])} + unquantized {fmt_bytes(parts['unquantized'])} + the largest "
            f"weight {fmt_bytes(parts['tensor'])} + quantize_nf4's working set {fmt_bytes(parts['workspace'])} = "
            f"{fmt_bytes(sum(parts.values()))}")


def layer_activation_bytes(w: Workload, shape: ModelShape) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring for each part)."""
    return sum(layer_saved_tensors(w, shape))


def layer_saved_tensors(w: Workload, shape: ModelShape) -> list[int]:
    """Per-token bytes of each tensor one decoder layer saves for backward (a tensor holds N times that):
    the sizes matter on CPU, where glibc treats blocks above GLIBC_MMAP_MAX differently."""
    b, d, i = w.compute_bytes, shape.hidden, shape.intermediate
    dq, dkv, full = shape.q_dim, shape.kv_dim, w.method == "full"
    saved = shape.norms_per_layer * ([4 * d, 4] + ([b * d] if full else []))  # fp32 input, rsqrt (+ x̂)
    kv = dq if (w.masked and shape.kv_heads < shape.heads) else dkv
    saved += [b * dq, b * kv, b * kv, b * dq, 4 * shape.heads]  # q, k, v, output, logsumexp
    if w.masked:
        saved.append(b * w.seq_len)  # the (B,1,T,T) bool mask, converted to the compute dtype per layer
    if shape.attn_impl == "eager":
        saved += [b * shape.heads * w.seq_len] * 2  # softmax probabilities (+ their dropout/softcap input)
    saved += [b * i] * (3 if shape.gated_mlp else 1)
    return saved + linear_inputs_saved(w, shape)


def linear_input_bytes(w: Workload, shape: ModelShape) -> int:
    """Inputs saved for the weight gradient (full) or by the LoRA path, per token per layer."""
    return sum(linear_inputs_saved(w, shape))


def linear_inputs_saved(w: Workload, shape: ModelShape) -> list[int]:
    """Per-token bytes of each linear-layer input saved (full: for the weight gradient; LoRA: by the adapter)."""
    width = {"attn_in": shape.hidden, "attn_out": shape.q_dim, "mlp_in": shape.hidden, "mlp_mid": shape.intermediate}
    if w.method == "full":  # each distinct input once; the attention output is SDPA's, already saved
        sites = {lin.site for lin in shape.layer_linears} - {"attn_out"}
        return [w.compute_bytes * width[s] for s in sorted(sites)]
    a, saved, shared = w.adapter_bytes, [], set()
    for t in w.lora_targets:
        saved.append(a * w.lora.r)  # A's output, saved by B
        if w.lora.dropout > 0:  # the mask (CPU: a float noise tensor, CUDA: bool) and the dropped x
            saved += [a * t.in_features] * 2 if w.device == "cpu" else [t.in_features, a * t.in_features]
        elif w.compute_bytes == a:  # x.to(a) is x itself: one saved tensor per input site
            if t.site not in shared and t.site != "attn_out":
                saved.append(a * width[t.site])
            shared.add(t.site)
        else:  # each target makes its own copy of x in the adapter's dtype
            saved.append(a * t.in_features)
        if w.lora.use_dora:  # z for ∂m; with dropout x_d Wᵀ and s·x_d AᵀBᵀ (lorakit.dora.dora_forward)
            saved.append(w.compute_bytes * t.out_features * (2 if w.lora.dropout > 0 else 1))
    return saved


def dora_norm_bytes(w: Workload, shape: ModelShape) -> int:
    """DoRA's fp32 rows of W + s·BA while computing n for the largest target (a 4-bit W's fp32 decode is
    the dequant transient)."""
    if w.method == "full" or not w.lora.use_dora or not w.lora_targets:
        return 0
    return min(4 * max(t.numel for t in w.lora_targets), NORM_CHUNK_BYTES)


def head_activation_bytes(w: Workload, shape: ModelShape) -> int:
    """Saved outside the layers, per token: the final norm's fp32 input and rsqrt; full fine-tuning adds
    the normalized x (for the norm's weight gradient), the head's input and the embedding's int64 ids."""
    b, d = w.compute_bytes, shape.hidden
    # NOTE: with lorakit.loss the trainable head runs on an empty view of its input, which still holds
    # the whole (B, T, d) storage: the same bytes as saving the input.
    return 4 * d + 4 + (2 * b * d + 8 if w.method == "full" else 0)


def first_layer_savings(w: Workload, shape: ModelShape) -> int:
    """LoRA/QLoRA without checkpointing, per token: the first layer reads the frozen embedding's output,
    which needs no gradient, so its first norm saves nothing (4d + 4) and a dropout on its attention
    inputs keeps only its output, not the mask (4·in on CPU, 1·in on CUDA, per such target)."""
    if w.method == "full" or w.checkpointing:
        return 0
    saved = 4 * shape.hidden + 4
    if w.lora.dropout > 0:
        mask = w.adapter_bytes if w.device == "cpu" else 1
        saved += sum(mask * t.in_features for t in w.lora_targets if t.site == "attn_in")
    return saved


def activation_bytes(w: Workload, shape: ModelShape) -> int:
    """Everything the forward leaves for backward, all layers (without logits and loss)."""
    n = w.tokens
    rope = 2 * w.compute_bytes * shape.head_dim * w.seq_len
    mask = w.micro_batch * w.seq_len**2 if w.masked else 0  # the bool mask all layers share
    if w.checkpointing:
        per_layer = w.compute_bytes * shape.hidden  # only each layer's input survives the forward
    else:
        per_layer = layer_activation_bytes(w, shape)
    outside = head_activation_bytes(w, shape) - first_layer_savings(w, shape)
    return shape.layers * per_layer * n + outside * n + rope + mask


def logits_bytes(w: Workload, shape: ModelShape) -> tuple[int, int]:
    """(forward, backward) bytes of the loss. N' = B·(T-1) shifted positions, C = loss_chunks.

    linear_ce  forward: the supervised rows of h and ∂L/∂h, (2·b·d + 8)·N', one fp32 chunk of logits (32 MiB,
               turned into its gradient in place) and logsumexp's temporary of the same size, and, when
               the head trains, ∂L/∂W (V·d); backward:
               ∂L/∂h twice (saved, scaled) and ∂L/∂W once more. No (N, V) tensor at all.
    logits     forward: b·V·N logits + the fp32 copy of the shifted logits 4·V·N'/C + log-softmax
               4·V·N' (saved); backward: the saved log-softmax + its gradient and the input gradient
               8·V·N'/C. C = 1: b·V·N + 8·V·N' forward, 12·V·N' backward.
    compiled   saves the logits (and a log-sum-exp per row): b·V·N + 4·V·N'/C forward, 2·b·V·N' +
               8·V·N'/C backward."""
    if w.task != "causal_lm":
        return 0, 0
    v, n, c, b, d = shape.vocab, w.tokens, w.loss_chunks, w.compute_bytes, shape.hidden
    n_shift = w.micro_batch * (w.seq_len - 1)
    if w.loss == "linear_ce":
        rows_per_chunk = min(max(1, ROW_CHUNK_BYTES // (4 * v)), n_shift)
        # the fp32 chunk of logits, logsumexp's temporary of the same size (+ the gradient cast to b)
        chunk = rows_per_chunk * v * (8 + (b if b < 4 else 0))
        head_grad = v * d * w.load_bytes if w.method == "full" else 0
        rows = (2 * b * d + 8) * n_shift  # h's supervised rows, ∂L/∂h and the int64 row index
        return rows + chunk + head_grad, rows + head_grad
    chunk = 4 * v * n_shift // c
    if w.loss == "compiled":
        return b * v * n + chunk, 2 * b * v * n_shift + 2 * chunk
    return b * v * n + 4 * v * n_shift + chunk, 4 * v * n_shift + 2 * chunk


def backward_transient_bytes(w: Workload, shape: ModelShape) -> int:
    """Gradients in flight inside one layer's backward: the residual stream, the MLP's three
    intermediate gradients, and (LoRA) the fp32 gradient of the widest adapter input."""
    b, d, i = w.compute_bytes, shape.hidden, shape.intermediate
    lora = w.adapter_bytes * max((t.in_features for t in w.lora_targets), default=0)
    return w.tokens * (b * (3 * i + 3 * d) + lora)


def dequant_transient_bytes(w: Workload, shape: ModelShape) -> int:
    """The largest 4-bit layer being dequantized: int32 codes 2n + fp32 values 4n (then + the compute-dtype
    copy b·n when b < 4): about 6n bytes, transient, once per layer per forward/backward."""
    if w.method != "qlora" or not shape.layer_linears:
        return 0
    return 6 * max(lin.numel for lin in shape.layer_linears)


def optimizer_state_bytes(w: Workload, shape: ModelShape) -> tuple[int, int]:
    """(gradient bytes, AdamW state bytes) of the trainable parameters."""
    n = trainable_parameter_count(w, shape)
    p_bytes = w.load_bytes if w.method == "full" else w.adapter_bytes
    states = 2 * n * (1 if "8bit" in w.optimizer else p_bytes)
    return n * p_bytes, states


# --------------------------------------------------------------------------- the phases


@dataclass
class MemoryTerm:
    name: str
    bytes: int
    explanation: str


@dataclass
class MemoryBreakdown:
    """Each term, each phase's total, and the peak: what `check_fits` compares with the machine."""

    terms: list[MemoryTerm]
    phases: dict[str, int]
    peak_phase: str
    peak_bytes: int
    peak_allocated_bytes: int  # tensors only, at the peak phase (GPU: compare with max_memory_allocated)

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)


def memory_model(w: Workload, shape: ModelShape) -> MemoryBreakdown:
    """Every term in bytes and the peak over the phases of one training run."""
    weights, weights_how = weight_bytes(w, shape)
    n_lora = lora_parameter_count(w, shape) if w.method != "full" else 0
    grads, states = optimizer_state_bytes(w, shape)
    acts = activation_bytes(w, shape)
    recompute = layer_activation_bytes(w, shape) * w.tokens if w.checkpointing else 0
    logits_fwd, logits_bwd = logits_bytes(w, shape)
    bwd = backward_transient_bytes(w, shape)
    dequant = dequant_transient_bytes(w, shape)
    dora_norm = dora_norm_bytes(w, shape)
    opt_tmp = _optimizer_transient(w, shape, grads)
    head_grad = shape.vocab * shape.hidden * w.load_bytes if w.method == "full" else 0
    load = load_bytes(w, shape)
    terms = [
        MemoryTerm("weights", weights, weights_how),
        MemoryTerm("lora_params", w.adapter_bytes * n_lora,
                   f"{n_lora:,} LoRA parameters (r={w.lora.r}) × {w.adapter_bytes} B"),
        MemoryTerm("gradients", grads, "one gradient per trainable parameter"),
        MemoryTerm("optimizer_states", states, f"{w.optimizer}: exp_avg + exp_avg_sq per trainable parameter"),
        MemoryTerm("activations", acts, _activation_how(w, shape)),
        MemoryTerm("recompute", recompute, "one layer's activations rebuilt in backward (gradient checkpointing)"),
        MemoryTerm("logits_loss", max(logits_fwd, logits_bwd),
                   "lorakit.loss: rows of h and ∂L/∂h + a 32 MiB chunk of logits (×2 in logsumexp), no (N, V) tensor"
                   if w.loss == "linear_ce" else
                   f"vocab {shape.vocab:,} × {w.tokens:,} tokens: logits + fp32 upcast + log-softmax, then its gradients"),
        MemoryTerm("backward_transient", bwd, "gradients in flight inside one layer's backward"),
        MemoryTerm("dequant_transient", dequant, "the largest NF4 weight dequantized for its matmul (int32 codes + fp32)"),
        MemoryTerm("dora_norm", dora_norm, "DoRA: fp32 rows of W + s·BA for the norm ‖W + s·BA‖_row (per forward)"),
        MemoryTerm("optimizer_transient", opt_tmp, "AdamW step temporaries (foreach on CUDA: a copy of the states)"),
        MemoryTerm("load_transient", load - weights if w.method == "qlora" else 0,
                   "streamed QLoRA load: the largest weight being quantized, in its storage dtype + "
                   f"quantize_nf4's working set ({QUANTIZE_WORKSPACE_BYTES} B/weight, its fp32 copy included)"),
    ]
    resident = weights + w.adapter_bytes * n_lora + states
    grads_held = grads if w.grad_accum > 1 else 0  # earlier micro-batches' gradients wait for the step
    # checkpointed: the recomputed layer is freed as fast as its gradients appear; else gradients in flight
    layer_work = (recompute if w.checkpointing else bwd) + dequant
    phases = {
        "load": load,
        # checkpointed layers run (each one's activations, then freed) before the loss starts
        "forward": resident + grads_held + acts + max(logits_fwd, dequant + recompute + dora_norm),
        "backward": resident + max(acts + logits_bwd + grads_held + head_grad,
                                   acts + grads_held + head_grad + layer_work, grads + layer_work + head_grad),
        "optimizer_step": resident + grads + opt_tmp,
        "eval": resident + _eval_bytes(w, shape) + dequant if w.eval_enabled else 0,
        "save": resident,
    }
    overhead, slack = _overhead(w, shape, phases, terms)
    totals = {k: v + overhead + slack.get(k, 0) for k, v in phases.items()}
    if w.device == "cpu":
        totals["save"] += CPU_PLOT_BYTES
    peak_phase = max(totals, key=totals.get)
    return MemoryBreakdown(terms, totals, peak_phase, totals[peak_phase], phases[peak_phase])


def _activation_how(w: Workload, shape: ModelShape) -> str:
    if w.checkpointing:
        return f"checkpointed: each of {shape.layers} layers keeps its input ({w.compute_bytes}·d B/token)"
    per = layer_activation_bytes(w, shape)
    return f"{per / 1024:.1f} KiB/token/layer × {shape.layers} layers × {w.tokens:,} tokens"


def _optimizer_transient(w: Workload, shape: ModelShape, grads: int) -> int:
    if w.device == "cuda":
        return grads  # foreach AdamW: _foreach_sqrt(exp_avg_sq) materializes a copy of the states
    largest = shape.vocab * shape.hidden if w.method == "full" else max(
        (w.lora.r * max(t.in_features, t.out_features) for t in w.lora_targets), default=0)
    return 2 * largest * (w.load_bytes if w.method == "full" else w.adapter_bytes)


def load_bytes(w: Workload, shape: ModelShape) -> int:
    """Tensors held at the peak of loading: the whole model in its load dtype, or for QLoRA the streamed
    load (qlora_load_parts: the final NF4 model + one weight being quantized)."""
    if w.method != "qlora":
        return shape.n_params * w.load_bytes
    return sum(qlora_load_parts(w, shape).values())


def _eval_bytes(w: Workload, shape: ModelShape) -> int:
    """No-grad forward: the logits b·V·N + one row's fp32 upcast and log-softmax, one layer's temporaries."""
    b = w.compute_bytes
    logits = b * shape.vocab * w.tokens + 8 * shape.vocab * w.seq_len if w.task == "causal_lm" else 0
    return logits + w.tokens * b * (3 * shape.intermediate + 2 * shape.hidden)


def _overhead(w: Workload, shape: ModelShape, phases: dict[str, int],
              terms: list[MemoryTerm]) -> tuple[int, dict[str, int]]:
    """(fixed overhead, allocator slack per phase): CPU heap slack in the training phases, CUDA
    caching-allocator slack in every phase."""
    if w.device == "cpu":
        heap = int(CPU_HEAP_SLACK * _heap_churn(w, shape))
        terms.append(MemoryTerm("framework_overhead", CPU_BASELINE_BYTES,
                                "interpreter + torch + transformers + first step, measured on this machine"))
        terms.append(MemoryTerm("allocator_slack", heap, f"glibc heap keeps freed pages: {CPU_HEAP_SLACK:.0%} of "
                                "the bytes a forward allocates in blocks below the 32 MiB mmap threshold"))
        return CPU_BASELINE_BYTES, {"forward": heap, "backward": heap}
    peak = max(phases.values())
    slack = int(CUDA_ALLOCATOR_SLACK * peak)
    terms.append(MemoryTerm("framework_overhead", CUDA_CONTEXT_BYTES, "CUDA context and library workspaces"))
    terms.append(MemoryTerm("allocator_slack", slack, f"caching allocator: {CUDA_ALLOCATOR_SLACK:.0%} of the peak"))
    return CUDA_CONTEXT_BYTES, {k: int(CUDA_ALLOCATOR_SLACK * v) for k, v in phases.items()}


def _heap_churn(w: Workload, shape: ModelShape) -> int:
    """Bytes one forward allocates in tensors below GLIBC_MMAP_MAX: the activations it would save without
    checkpointing (tensor by tensor) and, with the logits loss, the loss buffers (~ 4·V·N each)."""
    n = w.tokens
    per_layer = sum(n * t for t in layer_saved_tensors(dataclasses.replace(w, checkpointing=False), shape)
                    if n * t < GLIBC_MMAP_MAX)
    churn = shape.layers * per_layer
    if w.loss != "linear_ce" and 4 * shape.vocab * n < GLIBC_MMAP_MAX:
        churn += logits_bytes(w, shape)[0]
    return churn
