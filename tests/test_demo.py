"""demo.py: the built-in base model and task -- cached atomically, loadable, and learnable by QLoRA.

`demo_setup()` / `trained_demo()` are cached per process so test_evaluate.py reuses the same build and
the same trained adapter. Tests use a reduced DemoSpec (2 layers, 150 pre-training steps, ~10 s); the
default spec is the quickstart's (4 layers, 300 steps, ~40 s).
"""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit import demo
from lorakit.config import LoraConfig, dump_yaml, load_run_config
from lorakit.eval import exact_match, json_valid, schema_valid
from lorakit.generate import GenerationConfig, generate, render_chat_prompt
from lorakit.lora import adapters_disabled, inject_lora

TEST_SPEC = demo.DemoSpec(hidden_size=128, num_layers=2, intermediate_size=352, pretrain_docs=2000,
                          pretrain_steps=150, pretrain_lr=4e-3)
LEARN = SimpleNamespace(steps=100, lr=4e-3, batch=16, seed=0)
_TMP = tempfile.TemporaryDirectory(prefix="lorakit-demo-test-")  # removed when the process exits


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ids of the whole chat, labels = ids on the assistant answer only (prefix rendering, then diff)."""
    prompt = tokenizer(render_chat_prompt(tokenizer, messages[:-1]), add_special_tokens=False)["input_ids"]
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    return full, [-100] * len(prompt) + full[len(prompt):]


def pad_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    return {
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in pairs]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]),
    }


def chat_batches(tokenizer, rows: list[dict], batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    pairs = [encode_chat(tokenizer, r["messages"]) for r in rows]
    return [pad_batch(pairs[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(pairs), batch_size)]


@functools.cache
def demo_setup() -> SimpleNamespace:
    """The reduced demo model (built once per process) and the task files."""
    root = Path(_TMP.name)
    start = time.perf_counter()
    model_dir = demo.ensure_demo_model(root / "cache", TEST_SPEC)
    build_s = time.perf_counter() - start
    paths = demo.write_demo_data(root / "data", n_train=800, n_eval=64, n_canary=32)
    return SimpleNamespace(model_dir=model_dir, paths=paths, build_s=build_s, root=root)


def load_demo(quantize: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup = demo_setup()
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir).eval()
    if quantize:
        from lorakit.config import QuantConfig
        from lorakit.quant import quantize_model

        quantize_model(model, QuantConfig(), compute_dtype=torch.float32, progress=False)
    return model, tokenizer


def train_adapter(model, tokenizer, rows: list[dict], steps: int, lr: float, name: str = "default", batch: int = 16) -> float:
    """The minimal loop: AdamW on the adapter, loss on assistant tokens, linear warmup. Returns seconds."""
    torch.manual_seed(LEARN.seed)
    inject_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0), name)
    pairs = [encode_chat(tokenizer, r["messages"]) for r in rows]
    params = [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in n]
    optimizer = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(LEARN.seed)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        picked = torch.randint(len(pairs), (batch,), generator=g).tolist()
        loss = model(**pad_batch([pairs[i] for i in picked], tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def task_prompts(tokenizer, rows: list[dict]) -> list[str]:
    return [render_chat_prompt(tokenizer, r["messages"]) for r in rows]


@functools.cache
def trained_demo() -> SimpleNamespace:
    """QLoRA (NF4 base + LoRA r=16, all-linear) trained on the demo task; base and tuned generations."""
    setup = demo_setup()
    model, tokenizer = load_demo(quantize=True)
    train_s = train_adapter(model, tokenizer, read_jsonl(setup.paths["train"]), LEARN.steps, LEARN.lr, batch=LEARN.batch)
    prompts = read_jsonl(setup.paths["prompts"])
    texts, config = task_prompts(tokenizer, prompts), GenerationConfig(max_new_tokens=16)
    start = time.perf_counter()
    tuned = generate(model, tokenizer, texts, config, batch_size=64)
    with adapters_disabled(model):
        base = generate(model, tokenizer, texts, config, batch_size=64)
    gen_s = time.perf_counter() - start
    refs = [p["reference"] for p in prompts]
    rate = lambda outs: sum(map(exact_match, outs, refs)) / len(refs)  # noqa: E731
    return SimpleNamespace(model=model, tokenizer=tokenizer, setup=setup, prompts=prompts, base=base, tuned=tuned,
                           base_em=rate(base), tuned_em=rate(tuned), train_s=train_s, gen_s=gen_s)


# --------------------------------------------------------------------------- the task files


def test_write_demo_data(tmp_path):
    paths = demo.write_demo_data(tmp_path, n_train=50, n_eval=20, n_canary=6, seed=3)
    train, evals, prompts = (read_jsonl(paths[k]) for k in ("train", "eval", "prompts"))
    task = [r for r in train if r["messages"][0]["content"] == demo.SYSTEM_PROMPT]
    replay = [r for r in train if r not in task]
    assert (len(task), len(replay), len(evals), len(prompts)) == (50, 12, 20, 20)  # 25% generic chats mixed in
    assert not {r["messages"][-1]["content"] for r in replay} & {demo.answer(label) for label in demo.LABELS}
    assert [m["role"] for m in task[0]["messages"]] == ["system", "user", "assistant"]
    assert task[0]["messages"][1]["content"].startswith("Review: ")
    reviews = {r["messages"][1]["content"] for r in task}
    assert len(reviews) == 50 and not reviews & {r["messages"][1]["content"] for r in evals}  # no leakage
    for row, prompt in zip(evals, prompts, strict=True):
        answer = row["messages"][-1]["content"]
        assert answer == prompt["reference"] == json.dumps({"sentiment": prompt["label"]})
        assert schema_valid(answer, json.loads(paths["schema"].read_text()))
        assert prompt["messages"] == row["messages"][:-1]
    labels = [p["label"] for p in prompts] + [json.loads(r["messages"][-1]["content"])["sentiment"] for r in task]
    assert 0.3 < labels.count("positive") / len(labels) < 0.7
    canary = read_jsonl(paths["canary"])
    assert len(canary) == 6 and all(c["prompt"] and c["completion"] for c in canary)
    assert demo.is_demo_data(paths["train"]) and not demo.is_demo_data(tmp_path / "elsewhere" / "x.jsonl")
    assert demo.write_demo_data(tmp_path / "again", n_train=50, n_eval=20, n_canary=6, seed=3)["train"].read_text() == paths["train"].read_text()


def test_demo_run_config_is_valid_qlora(tmp_path):
    config = demo.demo_run_config(tmp_path / "run")
    assert config.problems() == []
    assert (config.method, config.lora.r, config.lora.alpha, config.lora.target_modules) == ("qlora", 16, 32, "all-linear")
    assert config.base_model == "demo" and config.data.train is None
    dump_yaml(config, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == config


# --------------------------------------------------------------------------- the cache


def test_killed_build_leaves_no_cache_and_concurrent_builders_build_once(tmp_path, monkeypatch):
    spec = demo.DemoSpec(seed=123)
    calls = []

    def crashing(out_dir, spec):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a build killed half-way

    monkeypatch.setattr(demo, "build_demo_model", crashing)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_model(tmp_path, spec)
    assert not (tmp_path / spec.cache_name()).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # no temp dir left

    def slow(out_dir, spec):
        calls.append(out_dir)
        time.sleep(0.3)
        (Path(out_dir) / "lorakit_demo.json").write_text("{}")

    monkeypatch.setattr(demo, "build_demo_model", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo_model(tmp_path, spec))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "lorakit_demo.json").is_file()
    assert spec.cache_name() != demo.DEMO_SPEC.cache_name() == "demo-llama-v1"


def test_demo_model_is_a_cached_standard_checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    setup = demo_setup()
    weights = setup.model_dir / "model.safetensors"
    assert weights.is_file() and not list(setup.model_dir.glob("*.bin"))
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert demo.ensure_demo_model(setup.root / "cache", TEST_SPEC) == setup.model_dir
    assert time.perf_counter() - start < 0.5 and weights.stat().st_mtime_ns == mtime  # reused, not rebuilt
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert 400 <= len(tokenizer) <= 600 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    chat = [{"role": "user", "content": "Hi"}]
    assert render_chat_prompt(tokenizer, chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    stats = json.loads((setup.model_dir / "lorakit_demo.json").read_text())
    assert stats["final_loss"] < stats["first_loss"] / 4  # pre-training did teach it the language
    print(f"\n[demo] reduced spec build {setup.build_s:.1f}s ({stats['parameters']:,} params, "
          f"pretrain {stats['pretrain_s']}s, loss {stats['first_loss']:.2f} -> {stats['final_loss']:.2f})")


# --------------------------------------------------------------------------- learnability


def test_base_writes_the_language_but_not_the_answer_format():
    run = trained_demo()
    assert not any(json_valid(text) for text in run.base)  # it has never seen the answer format
    assert all(len(text.split()) >= 2 for text in run.base)  # ... but it does answer in words


def test_qlora_learns_the_task():
    run = trained_demo()
    print(f"\n[demo] QLoRA {LEARN.steps} steps x {LEARN.batch}: {run.train_s:.1f}s; exact match "
          f"{run.base_em:.2f} -> {run.tuned_em:.2f}; generation base+tuned {run.gen_s:.1f}s")
    assert run.base_em <= 0.05
    assert run.tuned_em >= 0.8, run.tuned[:5]
    assert all(json_valid(text) for text in run.tuned)
