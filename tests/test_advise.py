"""lorakit.advise: the decision tables at each boundary, every byte count against real tensors on tiny
models (NF4 buffers, LoRA parameters, what autograd saves), and the CLI (JSON fields, YAML, errors).

No downloads and no calibration: the models are written as config.json only (the advisor never reads
weights), and the measured rates are replaced by fixed numbers."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
import transformers as tf
from torch import nn

import lorakit.advise  # noqa: F401  (lorakit.advise the attribute is the function; the module is in sys.modules)
from lorakit.cli import main as cli_main
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig, load_run_config
from lorakit.quant import NF4Linear
from lorakit.train import adapt_for_method

A = sys.modules["lorakit.advise"]

RATES = {"matmul_flops": {"32": 2e10, "128": 5e10, "512": 8e10, "2048": 9e10}, "bandwidth": 2e10,
         "dequant_s": 2e-9, "adamw_s": 3e-9, "op_s": 2e-5, "bernoulli_s": 9e-9, "softmax_s": 2e-8,
         "measured": "fixed for tests"}
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, pad_token_id=0)
B, T = 2, 32


@pytest.fixture(autouse=True)
def fixed_rates(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(A, "calibrate", lambda *args, **kwargs: RATES)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama as a model directory holding config.json only."""
    path = tmp_path / "tiny"
    tf.LlamaConfig(**TINY).save_pretrained(path)
    return str(path)


def run_config(model_dir: str, method: str = "lora", targets="all-linear", dropout: float = 0.05,
               gc: bool = False, r: int = 4) -> RunConfig:
    return RunConfig(base_model=model_dir, method=method,
                     lora=LoraConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=targets),
                     data=DataConfig(max_seq_len=T),
                     train=TrainConfig(micro_batch_size=B, gradient_checkpointing=gc, device="cpu", dtype="float32"))


def real_model(config: RunConfig, tied: bool = False) -> nn.Module:
    """The model lorakit.train.prepare_model would build (random weights, fp32, CPU)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, tie_word_embeddings=tied)).float()
    return adapt_for_method(model, config, torch.float32, progress=False).train()


def predicted(config: RunConfig, masked: bool):
    shape = A.model_shape(config.base_model)
    return A.resolve_workload(config, shape, "cpu", masked=masked), shape


# --------------------------------------------------------------------------- decision tables


@pytest.mark.parametrize(("memory", "method"), [
    (4_000_000_000, "full"), (3_999_999_999, "lora"),  # full at >= 2× the fp16 size (2 GB here)
    (2_000_000_000, "lora"), (1_999_999_999, "qlora"),  # LoRA at >= 1×
    (500_000_000, "qlora"), (499_999_999, "none"),  # QLoRA at >= 1/4; below: smaller model / offload
])
def test_method_by_memory_ratio_boundaries(memory, method):
    chosen, reason = A.method_by_memory(memory, n_params=1_000_000_000)
    assert chosen == method
    assert "fp16 model" in reason


@pytest.mark.parametrize(("task", "rank"), [
    ("classification", 4), ("qa", 8), ("summarization", 8), ("translation", 8),
    ("chat", 16), ("instruction", 16), ("code", 32), ("reasoning", 32),
])
def test_rank_by_task(task, rank):
    r, reason = A.rank_by_task(task)
    assert r == rank
    assert "64 only after an ablation" in reason


@pytest.mark.parametrize(("examples", "dropout", "batch"), [
    (4_999, 0.1, 16), (5_000, 0.05, 32), (100_000, 0.05, 32), (100_001, 0.0, 64),
])
def test_dropout_and_effective_batch_by_dataset_size(examples, dropout, batch):
    assert A.dropout_by_examples(examples)[0] == dropout
    assert A.target_effective_batch(examples) == batch


@pytest.mark.parametrize(("ratio", "method", "lr_range"), [
    (2.0, "full", (1e-5, 5e-5)), (1.0, "lora", (5e-5, 2e-4)), (0.25, "qlora", (1e-4, 3e-4)),
])
def test_recommended_config_follows_the_tables(tiny_dir, ratio, method, lr_range):
    """Memory = ratio × the fp16 model picks the method (the CPU baseline makes none of these tiny
    budgets fit, which must not change the table's answer, only say so)."""
    memory = int(ratio * 2 * A.model_shape(tiny_dir).n_params)
    advice = A.advise(model=tiny_dir, memory=memory, device="cpu", task="code", examples=20_000)
    recs = {r.key: r for r in advice.recommendations}
    assert recs["method"].value == method and all(r.reason for r in advice.recommendations)
    assert recs["lora.r"].value == 32 and recs["lora.alpha"].value == 64 and recs["lora.dropout"].value == 0.05
    c = advice.config
    assert c.method == method and c.lora.r == 32 and c.lora.alpha == 64
    assert lr_range[0] <= c.train.lr <= lr_range[1]
    assert c.train.micro_batch_size * c.train.grad_accum == 32
    assert not advice.fits and "nothing fits" in recs["fit"].reason


def test_bare_size_uses_a_family_and_a_real_hub_id():
    advice = A.advise(model="8B", gpu="RTX 4090", task="chat", examples=10_000)
    assert advice.model.hidden == 4096 and advice.model.layers == 32 and advice.model.vocab == 128256
    assert 7.9e9 < advice.model.n_params < 8.1e9
    assert advice.config.base_model == "meta-llama/Llama-3.1-8B"
    assert advice.config.method == "lora" and advice.fits  # 24 GiB = 1.5× the 16 GB fp16 model
    assert 16 <= advice.config.train.micro_batch_size * advice.config.train.grad_accum <= 64


# --------------------------------------------------------------------------- byte counts against real tensors


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("out_f", "in_f"), [(7, 9), (64, 64), (96, 200), (1000, 1000)])
def test_nf4_bytes_match_a_quantized_layers_buffers(out_f, in_f, double_quant):
    layer = NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=False), blocksize=64, double_quant=double_quant)
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert A.nf4_bytes(out_f * in_f, 64, double_quant) == stored


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
        assert A.weight_bytes(w, shape)[0] == frozen + nf4
        if method == "lora":
            assert shape.n_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("targets", ["all-linear", "attention", "minimal", ["q_proj", "down_proj"]])
def test_lora_parameter_count_matches_inject_lora(tiny_dir, targets):
    config = run_config(tiny_dir, targets=targets)
    model = real_model(config)
    w, shape = predicted(config, masked=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert A.lora_parameter_count(w, shape) == trainable
    assert A.optimizer_state_bytes(w, shape) == (4 * trainable, 8 * trainable)


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
    assert A.layer_activation_bytes(w, shape) * B * T == measured


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_activation_bytes_match_saved_tensors(tiny_dir, method, gc):
    """The whole forward + loss as lorakit trains (lorakit.loss: no logits): the layers, the first layer's
    frozen input, the final norm (+ for full its x̂, the head's input and the embedding's ids), and what
    the loss saves: ∂L/∂h (B·(T-1), d), its row index and, when the head trains, ∂L/∂W (V, d). Under checkpointing autograd saves only
    each layer's input; rotary cos/sin and the bool mask are then held by the checkpoints, not saved."""
    from lorakit.loss import causal_lm_loss_sum

    config = run_config(tiny_dir, method, gc=gc)
    model = real_model(config)
    inputs = batch(masked=True)
    measured = saved_bytes(lambda: causal_lm_loss_sum(model, inputs, inputs["input_ids"]),
                           [*model.parameters(), *model.buffers()])
    w, shape = predicted(config, masked=True)
    assert w.loss == "linear_ce"
    loss_saved = (4 * shape.hidden + 8) * B * (T - 1) + (4 * shape.vocab * shape.hidden if method == "full" else 0)
    not_saved = B * T * T + (2 * 4 * shape.head_dim * T if gc else 0)
    assert A.activation_bytes(w, shape) + loss_saved == measured + not_saved


# --------------------------------------------------------------------------- the models as a whole


def test_memory_terms_add_up_and_respond_to_settings(tiny_dir):
    base = A.memory_model(*predicted(run_config(tiny_dir), masked=True))
    assert base.peak_bytes == max(base.phases.values()) and base.peak_bytes > A.CPU_BASELINE_BYTES
    longer = run_config(tiny_dir)
    longer.data.max_seq_len = 4 * T
    assert A.memory_model(*predicted(longer, True)).term("activations") > 4 * base.term("activations")
    gc = A.memory_model(*predicted(run_config(tiny_dir, gc=True), True))
    assert gc.term("activations") < base.term("activations") and gc.term("recompute") > 0


def test_time_model_parts_add_up(tiny_dir):
    w, shape = predicted(run_config(tiny_dir), masked=True)
    t = A.time_model(w, shape, RATES)
    assert t.step_time_s == pytest.approx(sum(t.parts.values()))
    slower = A.time_model(*predicted(run_config(tiny_dir, gc=True), True), RATES)
    assert slower.step_time_s > t.step_time_s and slower.flops_per_token > t.flops_per_token


def test_a_calibration_taken_on_a_busy_machine_is_flagged(tiny_dir, monkeypatch):
    monkeypatch.setattr(A, "calibrate", lambda *args, **kwargs: dict(RATES, other_load=0.5))
    advice = A.advise(run_config(tiny_dir), memory="8GB")
    assert any("other processes used 50%" in note for note in advice.notes)


def test_check_fits(tiny_dir):
    config = run_config(tiny_dir)
    assert A.check_fits(config, 64 * 2**30) is None
    message = A.check_fits(config, 2**20)
    assert "exceeds" in message and "gradient_checkpointing" in message and "--no-memory-check" in message
    missing = dataclasses.replace(config, base_model=tiny_dir + "-missing")
    assert A.check_fits(missing, 2**20) is None  # an advisor limitation never blocks training


# --------------------------------------------------------------------------- command line


def test_cli_json_has_the_numbers(tiny_dir, capsys):
    assert cli_main(["advise", "--model", tiny_dir, "--memory", "8GiB", "--device", "cpu",
                     "--examples", "1000", "--price-per-hour", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_available_bytes"] == 8 * 2**30
    assert isinstance(out["peak_memory_bytes"], int) and out["peak_memory_bytes"] > 0
    assert out["step_time_s"] > 0 and out["total_time_s"] == pytest.approx(out["total_steps"] * out["step_time_s"])
    assert out["cost"] == pytest.approx(out["total_time_s"] / 3600 * 2)
    for term in ("weights", "lora_params", "optimizer_states", "activations", "logits_loss", "framework_overhead"):
        assert out["memory_terms"][term]["explanation"]
    assert {"forward", "backward", "optimizer_step", "eval", "save"} <= set(out["phases_bytes"])
    assert all(r["reason"] for r in out["recommendations"])


def test_cli_config_yaml_loads_back(tiny_dir, tmp_path, capsys):
    assert cli_main(["advise", "--model", tiny_dir, "--memory", "8GB", "--device", "cpu", "--task", "qa"]) == 0
    text = capsys.readouterr().out
    assert "Recommendations:" in text and "Memory (peak" in text and "Time:" in text
    yaml_text = text.split("Config (lorakit train config.yaml):\n", 1)[1]
    (tmp_path / "run.yaml").write_text(yaml_text)
    config = load_run_config(tmp_path / "run.yaml")
    assert config.base_model == tiny_dir and config.lora.r == 8 and config.lora.alpha == 16


def test_cli_predicts_a_given_config_as_is(tiny_dir, tmp_path, capsys):
    from lorakit.config import dump_yaml

    config = run_config(tiny_dir, gc=True)
    dump_yaml(config, tmp_path / "run.yaml")
    assert cli_main(["advise", "--config", str(tmp_path / "run.yaml"), "--memory", "8GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    w, shape = predicted(config, masked=True)
    assert out["peak_memory_bytes"] == A.memory_model(w, shape).peak_bytes
    assert load_run_config(tmp_path / "run.yaml") == config  # untouched


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "8B", "--memory", "abc"], "memory 'abc' is not a size"),
    (["--model", "8B", "--memory", "0GB"], "more than 0 bytes"),
    (["--model", "500B", "--memory", "24GB"], "no named family near 500B"),
    (["--model", "8B", "--memory", "24GB", "--task", "poetry"], "task 'poetry' is not one of"),
    (["--model", "8B", "--gpu", "RTX 9999"], "gpu 'RTX 9999' is not one of"),
])
def test_cli_bad_inputs_are_user_errors(args, message, capsys):
    assert cli_main(["advise", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_model_directory_without_config(tmp_path, capsys):
    assert cli_main(["advise", "--model", str(tmp_path), "--memory", "8GB"]) == 2
    assert "has no config.json" in capsys.readouterr().err
