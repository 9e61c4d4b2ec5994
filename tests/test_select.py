"""train/select.py and eval/periodic.py: the selection rule on hand-made histories, the config checks, and
training runs that measure task metrics and forgetting at every eval, choose, stop and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_base, write_text_data
from lorakit.config import (
    EVERY_EVAL_METRICS,
    LOWER_IS_BETTER_METRICS,
    SELECTABLE_METRICS,
    dump_yaml,
    load_run_config,
)
from lorakit.errors import ConfigError
from lorakit.eval import ALL_METRICS, LOWER_IS_BETTER, PromptSet
from lorakit.eval.periodic import prompt_subset
from lorakit.train import train_lora
from lorakit.train.outputs import format_summary
from lorakit.train.select import EvalEntry, Selection, choose, is_eligible
from test_distributed import finish, launch

# --------------------------------------------------------------------------- the rule, by hand


def history(*rows: tuple[int, float | None, float | None, float]) -> list[dict]:
    """(step, exact_match, canary_change, eval_loss) -> metrics rows as the loop logs them."""
    return [{"step": s, "exact_match": m, "canary_change": c, "eval_loss": loss} for s, m, c, loss in rows]


def fed(rows: list[dict], metric: str = "exact_match", mode: str = "max", max_forgetting: float | None = 0.10,
        patience: int | None = None) -> tuple[Selection, list[bool]]:
    sel = Selection(metric, mode, max_forgetting, patience, active=True)
    return sel, [sel.record(r) for r in rows]


# An over-trained run: eval loss keeps falling, exact match peaks at step 30 while the canary is already
# +14%, and the best answer within the 10% budget is step 20's.
OVERFIT = history((10, 0.50, 0.01, 1.20), (20, 0.81, 0.06, 0.80), (30, 0.94, 0.14, 0.60), (40, 0.88, 0.31, 0.50),
                  (50, 0.75, 0.55, 0.45))


def test_best_metric_within_the_forgetting_budget():
    sel, improved = fed(OVERFIT)
    assert sel.chosen_step == 20 and improved == [True, True, False, False, False]
    entries = [EvalEntry(r["step"], r["exact_match"], r["canary_change"],
                         is_eligible(r["exact_match"], r["canary_change"], 0.10), r["eval_loss"]) for r in OVERFIT]
    assert choose(entries, "max").step == 20  # the pure rule agrees with the incremental one
    assert min(OVERFIT, key=lambda r: r["eval_loss"])["step"] == 50  # a loss-only rule would keep the most forgetful
    reason = sel.reason()
    assert reason.startswith("step 20: best exact_match 0.8100") and "step 30 scored 0.9400 but its canary rose +14.0%" in reason
    assert "the lowest eval loss (0.4500) was at step 50" in reason
    table = sel.table()
    assert "| 20 | 0.8100 | 0.8000 | +6.0% | yes ← chosen |" in table
    assert "| 30 | 0.9400 | 0.6000 | +14.0% | no: canary +14.0% > +10% |" in table


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.10, 0.2, 0.5, None])
def test_an_eval_over_the_budget_is_never_chosen(budget):
    """Random histories: the choice is always within budget, and is the best metric among those that are."""
    g = torch.Generator().manual_seed(int(1000 * (budget or 1)))
    for _ in range(200):
        n = int(torch.randint(1, 8, (1,), generator=g))
        values = torch.randint(0, 5, (n,), generator=g).float() / 4  # ties are common
        changes = torch.rand(n, generator=g) * 0.4 - 0.05
        rows = history(*[(10 * (i + 1), float(values[i]), float(changes[i]), 1.0) for i in range(n)])
        sel, _ = fed(rows, max_forgetting=budget)
        within = [r for r in rows if budget is None or r["canary_change"] <= budget]
        if not within:
            assert sel.chosen_step is None and "adapter/ holds the last weights" in sel.reason()
            continue
        chosen = next(r for r in rows if r["step"] == sel.chosen_step)
        assert budget is None or chosen["canary_change"] <= budget
        assert chosen["exact_match"] == max(r["exact_match"] for r in within)
        ties = [r for r in within if r["exact_match"] == chosen["exact_match"]]
        assert chosen["canary_change"] == min(r["canary_change"] for r in ties)  # a tie goes to less forgetting


def test_min_mode_missing_metric_and_no_canary():
    rows = [{"step": 1, "eval_loss": 2.0}, {"step": 2, "eval_loss": float("nan")}, {"step": 3}, {"step": 4, "eval_loss": 1.5}]
    sel, improved = fed(rows, metric="eval_loss", mode="min")
    assert improved == [True, False, False, True] and sel.chosen_step == 4
    assert "| 3 | - | - | no: eval_loss not measured |" in sel.table()  # no canary column value: "-"


def test_early_stopping_counts_evals_that_do_not_replace_the_choice():
    sel, _ = fed(OVERFIT[:3], patience=2)
    assert not sel.should_stop()  # step 30 is over budget: one eval without a new choice
    sel.record(OVERFIT[3])
    assert sel.should_stop() and sel.since_best == 2


def test_selection_state_round_trips_like_a_checkpoint():
    sel, _ = fed(OVERFIT[:2])
    sel.base_canary_loss = 2.5
    saved = json.loads(json.dumps(sel.state()))  # state.json
    again = Selection("exact_match", "max", 0.10, None, active=True)
    again.load(saved)
    for row in OVERFIT[2:]:
        sel.record(row)
        again.record(row)
    assert again.state() == sel.state() and again.base_canary_loss == 2.5 and again.chosen_step == 20


def test_prompt_subset_is_fixed_by_the_seed():
    prompts = PromptSet([[i] for i in range(100)], [str(i) for i in range(100)], [str(i % 2) for i in range(100)])
    a, b = prompt_subset(prompts, 16, seed=3), prompt_subset(prompts, 16, seed=3)
    assert a == b and len(a.prompt_ids) == 16 and a.prompt_ids == sorted(a.prompt_ids)
    assert [int(r) for r in a.references] == [ids[0] for ids in a.prompt_ids] and a.labels[0] == str(a.prompt_ids[0][0] % 2)
    assert prompt_subset(prompts, 16, seed=4) != a and prompt_subset(prompts, 500, seed=3) is prompts


# --------------------------------------------------------------------------- config: what a run can measure


def test_metric_lists_agree_with_the_eval_package():
    assert set(SELECTABLE_METRICS) - {"judge_score"} <= set(ALL_METRICS)
    assert set(LOWER_IS_BETTER_METRICS) - {"canary_change"} <= set(LOWER_IS_BETTER)
    assert set(EVERY_EVAL_METRICS) & set(LOWER_IS_BETTER) == set()


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.select_best.metric=exact_match"], "measured during training only with eval.every_eval: true"),
    (["train.select_best.metric=judge_score", "eval.every_eval=true"], "judge_score needs a judge: set eval.judge.base_url"),
    (["train.select_best.metric=judge_score", "eval.every_eval=true", "eval.judge.base_url=http://127.0.0.1:1/v1",
      "eval.judge.model=m", "eval.judge.during_training=false"], "only with eval.judge.during_training: true"),
    (["eval.every_eval=[json_valid]", "train.select_best.metric=accuracy"], "accuracy is not in eval.every_eval"),
    (["task=seq_cls", "eval.every_eval=true", "train.select_best.metric=exact_match"], "exact_match is not produced by task seq_cls"),
    (["train.select_best.metric=exact_match", "train.select_best.mode=min", "eval.every_eval=true"], "mode min contradicts exact_match"),
    (["train.select_best.metric=bleu"], "train.select_best.metric must be one of eval_loss, exact_match"),
    (["train.select_best.max_forgetting=-1"], "max_forgetting must be >= 0"),
    (["eval.every_eval=[exact_match, bleu]"], "eval.every_eval: unknown metric 'bleu'"),
    (["eval.every_eval=yes please"], "eval.every_eval must be true or false or a list of strings, got 'yes please'"),
    (["train.select_best=exact_match"], "train.select_best must be a mapping of SelectConfig keys, got 'exact_match'"),
    (["train.select_best.metric=canary_loss", "eval.every_eval=true", "eval.canary=null"], "canary_loss needs eval.canary"),
    (["eval.judge.base_url=localhost:8000", "eval.judge.scale=1"], "eval.judge.base_url must be an http(s) URL"),
])
def test_a_metric_the_run_cannot_produce_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, overrides)
    assert message in str(e.value)


def test_labels_and_schema_are_checked_before_any_weight_loads(tmp_path, monkeypatch):
    """accuracy without eval.label_key: a ConfigError from train_lora, before the model (or its data) is read."""
    import lorakit.train.run as run_mod

    monkeypatch.setattr(run_mod, "process_group", lambda *a: pytest.fail("got past the check"))
    for metric, message in (("accuracy", "accuracy needs labels: set eval.label_key"), ("schema_valid", "schema_valid needs eval.schema")):
        config = load_run_config(None, ["base_model=/nonexistent", "eval.every_eval=true", f"train.select_best.metric={metric}",
                                        f"output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=message):
            train_lora(config, progress=False)


# --------------------------------------------------------------------------- in the training loop (tiny model)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def tiny_config(base_dir, tmp_path, *overrides):
    data = write_text_data(tmp_path / "train.jsonl", n=48)
    return load_run_config(None, [
        f"base_model={base_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.eval_fraction=0.2",
        "data.max_seq_len=32", "data.packing=false", "data.dedup=false", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=12", "train.lr=3e-2", "train.log_every=1",
        "train.eval_every=4", "train.save_every=4", "train.warmup_ratio=0.0", "train.gradient_checkpointing=false",
        "train.device=cpu", "train.dtype=float32", "eval.at_end=false", "eval.every_eval=true", *overrides])


def metric_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_time_s" in r]


def test_every_eval_logs_the_canary_and_adapter_is_the_chosen_eval(base_dir, tmp_path):
    """Selecting on the canary loss itself (the text task has no prompts to generate for): adapter/ holds the
    chosen eval's weights, adapter-last/ the last, and the summary names the choice with its table."""
    config = tiny_config(base_dir, tmp_path, "train.select_best.metric=canary_loss", "train.select_best.max_forgetting=null")
    result = train_lora(config, progress=False, memory_check=False)
    rows = metric_rows(result.run_dir)
    evals = result.summary["selection"]["evals"]
    assert {4, 8, 12} <= {r["step"] for r in rows} and [e["step"] for e in evals] == [r["step"] for r in rows]
    assert all(r["eval_time_s"] > 0 for r in rows)
    for r in rows:
        assert math.isfinite(r["canary_loss"]) and r["canary_change"] == pytest.approx(
            math.exp(r["canary_loss"] - rows[0]["canary_loss"]) * (1 + rows[0]["canary_change"]) - 1, rel=1e-9)
    chosen = min(rows, key=lambda r: r["canary_loss"])["step"]
    sel = result.summary["selection"]
    assert sel["chosen_step"] == chosen and sel["active"]
    text = format_summary(result)
    assert f"| {chosen} |" in text and "yes ← chosen" in text and "checkpoint selection (adapter/ = chosen)" in text
    adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    last = load_file(result.run_dir / "adapter-last" / "adapter_model.safetensors")
    best = load_file(result.run_dir / "best" / "trainable.safetensors")
    assert chosen != 12 and any(not torch.equal(adapter[k], last[k]) for k in adapter)
    for key, tensor in adapter.items():
        assert torch.equal(tensor, best[key.removeprefix("base_model.model.").replace(".weight", ".default.weight")])
    meta = json.loads((result.run_dir / "adapter" / "lorakit.json").read_text())
    assert meta["metrics"]["selection"]["chosen_step"] == chosen


def test_resume_keeps_the_selection_history(base_dir, tmp_path, monkeypatch):
    """A run that crashes at step 7 and resumes from its step-4 checkpoint logs, chooses and saves as the
    uninterrupted run: the history of evals before the checkpoint comes back from state.json."""
    from lorakit.train import Loop

    common = ("train.select_best.metric=canary_loss", "train.select_best.max_forgetting=null")
    full = train_lora(tiny_config(base_dir, tmp_path / "full", *common), progress=False, memory_check=False)
    real_step = Loop.step

    def crash_at_7(self, stream):
        if self.state.step == 6:
            raise RuntimeError("simulated crash")
        return real_step(self, stream)

    monkeypatch.setattr(Loop, "step", crash_at_7)
    part = tiny_config(base_dir, tmp_path / "part", *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(part, progress=False, memory_check=False)
    state = json.loads((Path(part.output_dir) / "checkpoints" / "step-000004" / "state.json").read_text())["run"]["selection"]
    assert [e["step"] for e in state["entries"]] == [4] and state["base_canary_loss"] is not None
    monkeypatch.setattr(Loop, "step", real_step)
    resumed = train_lora(part, resume=True, progress=False, memory_check=False)
    got, expected = resumed.summary["selection"], full.summary["selection"]
    assert [e["step"] for e in got["evals"]] == [e["step"] for e in expected["evals"]]
    for a, b in zip(got["evals"], expected["evals"], strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-5) and a["eligible"] == b["eligible"]
        assert a["canary_change"] == pytest.approx(b["canary_change"], rel=1e-4, abs=1e-7)
    assert got["chosen_step"] == expected["chosen_step"]
    x = load_file(Path(full.run_dir) / "adapter" / "adapter_model.safetensors")
    y = load_file(Path(resumed.run_dir) / "adapter" / "adapter_model.safetensors")
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-6)


def test_the_demo_keeps_its_task_settings_with_every_eval(tmp_path):
    from lorakit.demo import resolve_demo, write_demo_data

    paths = write_demo_data(tmp_path / "data", n_train=20, n_eval=8, n_canary=4)
    config = load_run_config(None, [f"base_model={tmp_path}", f"data.train={paths['train']}", "eval.every_eval=true",
                                    "eval.during_training_prompts=8", "train.select_best.metric=accuracy"])
    resolved = resolve_demo(config)
    assert resolved.eval.label_key == "sentiment" and resolved.eval.schema is not None
    assert resolved.eval.every_eval is True and resolved.eval.during_training_prompts == 8


# --------------------------------------------------------------------------- the built-in task, end to end


@pytest.mark.slow
def test_demo_task_chooses_by_exact_match_within_the_forgetting_budget(tmp_path):
    """QLoRA-free LoRA on the demo task at a high learning rate: the canary jumps in the first evals (the
    adapter answers everything as JSON) and recovers as the replayed chats teach it back. The chosen eval is
    the best exact match among those within +10%; never one over budget; adapter/ holds its weights."""
    from test_demo import demo_setup

    setup = demo_setup()
    p = setup.paths
    config = load_run_config(None, [
        f"base_model={setup.model_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={p['train']}", f"data.eval={p['eval']}",
        "data.max_seq_len=256", "data.packing=false", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "train.micro_batch_size=16", "train.grad_accum=1", "train.max_steps=60", "train.lr=8e-3", "train.warmup_steps=5",
        "train.log_every=10", "train.eval_every=10", "train.save_every=null", "train.gradient_checkpointing=false",
        "train.device=cpu", "train.dtype=float32", "eval.at_end=false", "eval.every_eval=true",
        "eval.during_training_prompts=16", "eval.generation.max_new_tokens=12", "eval.label_key=sentiment",
        f"eval.schema={p['schema']}", f"eval.canary={p['canary']}", "train.select_best.metric=exact_match"])
    result = train_lora(config, progress=False, memory_check=False)
    print("\n" + format_summary(result))
    sel = result.summary["selection"]
    evals = sel["evals"]
    assert len(evals) >= 6 and all(e["canary_change"] is not None for e in evals)
    for e in evals:
        assert e["eligible"] == (e["canary_change"] <= 0.10)
    eligible = [e for e in evals if e["eligible"]]
    if not eligible:
        assert sel["chosen_step"] is None
        return
    chosen = next(e for e in evals if e["step"] == sel["chosen_step"])
    assert chosen["eligible"] and chosen["value"] == max(e["value"] for e in eligible)
    lowest = min(evals, key=lambda e: e["eval_loss"])
    if lowest["value"] < chosen["value"] or not lowest["eligible"]:  # the metric (or the canary) says otherwise
        assert sel["chosen_step"] != lowest["step"]
    rows = metric_rows(result.run_dir)
    assert all({"exact_match", "json_valid", "schema_valid", "accuracy", "canary_change"} <= set(r) for r in rows)
    assert (result.run_dir / "adapter-last").is_dir() and (result.run_dir / "loss.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- distributed: rank 0 measures


def test_ddp_rank0_measures_and_every_rank_agrees(tmp_path):
    """`--nproc 2` (DDP): rank 0 generates and scores the canary while rank 1 waits for the broadcast; the eval
    history and the choice equal one process with the same global batch."""
    base = save_tiny_base(tmp_path / "base")
    overrides = ["train.select_best.metric=canary_loss", "train.select_best.max_forgetting=null", "train.max_steps=8",
                 "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every=4", "train.save_every=null"]
    ddp = tiny_config(base, tmp_path / "ddp", *overrides)
    dump_yaml(ddp, tmp_path / "ddp.yaml")
    out = finish(launch("lorakit", "train", str(tmp_path / "ddp.yaml"), "--nproc", "2", "--quiet", "--no-memory-check"))
    assert out.count("completed:") == 1, out
    single = train_lora(tiny_config(base, tmp_path / "single", *overrides, "train.grad_accum=4"), progress=False,
                        memory_check=False)
    got = json.loads((Path(ddp.output_dir) / "summary.json").read_text())["selection"]
    expected = single.summary["selection"]
    assert [e["step"] for e in got["evals"]] == [e["step"] for e in expected["evals"]] and got["chosen_step"] == expected["chosen_step"]
    for a, b in zip(got["evals"], expected["evals"], strict=True):
        assert a["value"] == pytest.approx(b["value"], abs=1e-5) and a["canary_change"] == pytest.approx(b["canary_change"], abs=1e-5)


def test_every_eval_refuses_an_fsdp_sharded_model(base_dir, tmp_path, monkeypatch):
    import lorakit.train.loop as loop_mod
    from lorakit.data import prepare_data
    from lorakit.train import Loop, TrainingError, prepare_model

    config = tiny_config(base_dir, tmp_path)
    model, tokenizer = prepare_model(config, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(loop_mod, "sharded", lambda model: True)
    with pytest.raises(TrainingError, match="eval.every_eval cannot generate from an FSDP2-sharded model"):
        Loop(config, model, tokenizer, prepare_data(config.data, tokenizer), torch.device("cpu"), tmp_path, False)
