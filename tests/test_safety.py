"""Issue 19: never lose a user's work, never show a traceback. One test (or a few) per numbered case.

Each runs the real command (`lorakit.cli.main` in-process; a subprocess for SIGINT and a second process
holding the lock), checks its exit status and message, and that every file present before is still there
with the same bytes (`snapshot` hashes the tree).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_base, tiny_tokenizer, write_text_data
from lorakit.cli import build_parser, main
from lorakit.runtime.rundir import LOCK_FILE, RunLock

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (a symlink by its target, never followed)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.name == LOCK_FILE:
            continue
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def write_config(path: Path, base: Path, train_file: Path, out: Path, **sections) -> Path:
    config = {
        "base_model": str(base), "output_dir": str(out),
        "data": {"train": str(train_file), "max_seq_len": 32, "packing": False, "dedup": False, "eval_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "save_every": 1, "eval_every": 2, "micro_batch_size": 4, "grad_accum": 1,
                  "log_every": 1, "gradient_checkpointing": False, "lr": 1e-3},
        "eval": {"at_end": False},
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    base = save_tiny_base(root / "base")
    data = write_text_data(root / "train.jsonl", n=24)
    return root, base, data


@pytest.fixture(scope="module")
def finished(world):
    """A finished run (2 steps, a checkpoint per step, adapter, metrics, summary)."""
    root, base, data = world
    config = write_config(root / "finished.yaml", base, data, root / "finished")
    assert main(["train", str(config), "--quiet"]) == 0
    return root / "finished"


@pytest.fixture
def run(world, finished, tmp_path):
    """A copy of the finished run to do things to, with its YAML (output_dir = the copy)."""
    _, base, data = world
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run", write_config(tmp_path / "run.yaml", base, data, tmp_path / "run")


# --------------------------------------------------------------------------- 1. merge --out


def test_1_merge_refuses_a_non_empty_out(capsys, world, run, tmp_path):
    _, base, _ = world
    out = tmp_path / "x"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    (out / "sub" / "a.txt").write_text("keep too")
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(run[0] / "adapter"), "--out", str(out))
    assert code == 2 and "is not empty (notes.txt, sub/)" in msg and "--force" in msg
    assert snapshot(tmp_path) == before


def test_1_merge_force_replaces_only_what_it_writes(capsys, world, run, tmp_path):
    _, base, _ = world
    out = tmp_path / "x"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    (out / "config.json").write_text("{}")  # one of merge's own files: replaced
    code, msg = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(run[0] / "adapter"), "--out", str(out),
                        "--force")
    assert code == 0, msg
    assert (out / "notes.txt").read_text() == "keep" and (out / "sub").is_dir()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_1_merge_into_a_run_directory_is_refused(capsys, world, run):
    _, base, _ = world
    before = snapshot(run[0])
    code, msg = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(run[0] / "adapter"), "--out", str(run[0]))
    assert code == 2 and "adapter/" in msg and "checkpoints/" in msg
    assert snapshot(run[0]) == before


# --------------------------------------------------------------------------- 2. a failed train keeps the previous run


def test_2_train_into_a_previous_run_refuses_and_names_the_ways_forward(capsys, run, tmp_path):
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "train", str(run[1]), "--set", "base_model=./typo", "--quiet")
    assert code == 2 and "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("override, message", [
    ("base_model=./typo", "base_model './typo'"),
    ("data.train=missing.jsonl", "missing.jsonl"),
    ("lora.target_modules=[qproj]", "matched no module"),
])
def test_2_overwrite_moves_nothing_until_config_data_and_model_are_valid(capsys, run, tmp_path, override, message):
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "train", str(run[1]), "--overwrite", "--set", override, "--quiet")
    assert code == 2 and message in msg, msg
    assert "Traceback" not in msg
    assert snapshot(tmp_path) == before  # config.yaml, checkpoints/, metrics.jsonl ... all as they were


def test_2_overwrite_moves_the_old_run_aside_and_keeps_user_files(capsys, run, tmp_path):
    run_dir, config = run
    (run_dir / "notes.txt").write_text("mine")
    old = snapshot(run_dir)
    code, msg = run_cli(capsys, "train", str(config), "--overwrite", "--quiet")
    assert code == 0, msg
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert "moved the previous run" in msg and str(aside) in msg
    assert snapshot(aside) == {k: v for k, v in old.items() if k != "notes.txt"}
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_2_resume_with_a_typo_changes_nothing(capsys, run, tmp_path):
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--set", "base_model=./typo", "--quiet")
    assert code == 2 and "base_model" in msg
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 3. one run per directory


def test_3_a_held_lock_names_its_holder(capsys, run, tmp_path):
    before = snapshot(tmp_path)
    lock = RunLock(run[0]).acquire()  # another open file description: conflicts like another process
    try:
        code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--quiet")
    finally:
        lock.release()
    assert code == 2 and f"in use by another lorakit run (pid {os.getpid()} on {socket.gethostname()}" in msg
    assert snapshot(tmp_path) == before


def test_3_a_stale_lock_is_taken_over(capsys, run):
    (run[0] / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--set", "train.max_steps=3", "--quiet")
    assert code == 0, msg
    assert not (run[0] / LOCK_FILE).exists()  # released at the end


def test_3_without_flock_a_dead_pid_is_stale_and_a_live_one_is_not(monkeypatch, tmp_path):
    import lorakit.runtime.rundir as rundir
    from lorakit.errors import OutputError

    monkeypatch.setattr(rundir, "fcntl", None)
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # held by a live process (this one)
    lock.release()
    assert not path.exists()
    path.write_text(json.dumps({"pid": 2**22 + 7, "host": "another-host"}))
    with pytest.raises(OutputError, match="another-host"):  # another host: cannot tell, never stale
        RunLock(tmp_path).acquire()


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)


def test_3_and_8_second_run_refused_while_the_first_trains_and_sigint_saves_then_exits_130(capsys, run, tmp_path):
    """One long run in a subprocess: a second run on its directory is refused naming it; Ctrl-C then saves a
    checkpoint and exits 130 (not 0), without a traceback."""
    run_dir, config = run
    long = write_config(tmp_path / "long.yaml", *_base_and_data(config), tmp_path / "long",
                        train={"max_steps": 100000, "save_every": None, "eval_every": None})
    proc = _cli("train", str(long), "--quiet")
    metrics = tmp_path / "long" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.1)
    config_yaml = (tmp_path / "long" / "config.yaml").read_bytes()  # the rest is the first run's to change
    code, msg = run_cli(capsys, "train", str(long), "--resume", "--quiet")
    assert code == 2 and f"in use by another lorakit run (pid {proc.pid}" in msg
    assert (tmp_path / "long" / "config.yaml").read_bytes() == config_yaml
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted at step" in err and "--resume" in err
    assert list((tmp_path / "long" / "checkpoints").iterdir())
    assert not (tmp_path / "long" / LOCK_FILE).exists()


def _base_and_data(config: Path) -> tuple[Path, Path]:
    loaded = yaml.safe_load(config.read_text())
    return Path(loaded["base_model"]), Path(loaded["data"]["train"])


# --------------------------------------------------------------------------- 4. --resume checks the checkpoint


@pytest.mark.parametrize("overrides, listed", [
    (["lora.r=8"], ["lora.r: 4 in the checkpoint, 8 now"]),
    (["train.lr=1e-2", "train.micro_batch_size=2"], ["train.lr: 0.001 in the checkpoint, 0.01 now",
                                                     "train.micro_batch_size: 4 in the checkpoint, 2 now"]),
    (["data.max_seq_len=64"], ["data.max_seq_len: 32 in the checkpoint, 64 now"]),
])
def test_4_resume_refuses_what_changes_the_maths(capsys, run, tmp_path, overrides, listed):
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", *[a for o in overrides for a in ("--set", o)])
    assert code == 2 and "--resume-anyway" in msg, msg
    for line in listed:
        assert line in msg
    assert snapshot(tmp_path) == before  # config.yaml untouched


def test_4_resume_refuses_changed_data(capsys, world, run, tmp_path):
    other = write_text_data(tmp_path / "other.jsonl", n=24, seed=1)
    before = snapshot(run[0])
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--set", f"data.train={other}")
    assert code == 2 and "the data: hash" in msg
    assert snapshot(run[0]) == before


def test_4_resume_allows_more_steps_and_other_cadence(capsys, run):
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--set", "train.max_steps=3",
                        "--set", "train.eval_every=1", "--set", "train.log_every=2", "--quiet")
    assert code == 0 and "resumed from" in msg and "step-000002" in msg
    assert json.loads((run[0] / "summary.json").read_text())["steps"] == 3
    assert yaml.safe_load((run[0] / "config.yaml").read_text())["train"]["max_steps"] == 3


def test_4_resume_anyway(capsys, run, tmp_path):
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume-anyway", "--set", "train.lr=1e-2",
                        "--set", "train.max_steps=3", "--quiet")
    assert code == 0, msg
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume-anyway", "--set", "lora.r=8", "--quiet")
    assert code == 2 and "other shapes" in msg and "Traceback" not in msg
    assert snapshot(tmp_path) == before


def test_4_resume_of_a_finished_run_without_checkpoints(capsys, run):
    shutil.rmtree(run[0] / "checkpoints")
    before = snapshot(run[0])
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume")
    assert code == 2 and "finished run" in msg and "--overwrite" in msg
    assert snapshot(run[0]) == before


# --------------------------------------------------------------------------- 5. user mistakes exit 2, no traceback


def test_5_unmatched_target_modules_in_a_fresh_directory(capsys, world, tmp_path):
    _, base, data = world
    config = write_config(tmp_path / "c.yaml", base, data, tmp_path / "fresh")
    code, msg = run_cli(capsys, "train", str(config), "--set", "lora.target_modules=[qproj]", "--quiet")
    assert code == 2 and "lora.target_modules ['qproj'] matched no module" in msg and "q_proj" in msg
    assert not (tmp_path / "fresh").exists()  # a run that wrote nothing leaves nothing


def test_5_set_value_that_is_not_yaml(capsys):
    code, msg = run_cli(capsys, "train", "--set", "lora.target_modules=[q_proj", "--set", "lora.r={")
    assert code == 2 and "--set lora.target_modules=[q_proj: the value is not valid YAML" in msg
    assert "--set lora.r={" in msg  # every bad override at once


def test_5_output_dir_is_a_file(capsys, world, tmp_path):
    _, base, data = world
    (tmp_path / "file").write_text("mine")
    config = write_config(tmp_path / "c.yaml", base, data, tmp_path / "file")
    code, msg = run_cli(capsys, "train", str(config), "--quiet")
    assert code == 2 and "is a file, not a directory" in msg
    assert (tmp_path / "file").read_text() == "mine"


def test_5_output_dir_not_writable(capsys, world, tmp_path):
    _, base, data = world
    target = Path("/sys/lorakit-test/run")  # sysfs: mkdir fails even for root
    if os.access("/sys", os.W_OK) and Path("/sys").is_dir():
        try:
            target.parent.mkdir()
        except OSError:
            pass
        else:
            target.parent.rmdir()
            pytest.skip("/sys is writable here")
    config = write_config(tmp_path / "c.yaml", base, data, target)
    code, msg = run_cli(capsys, "train", str(config), "--quiet")
    assert code == 2 and "cannot write /sys/lorakit-test" in msg and "mode" in msg


def test_5_full_disk_during_a_checkpoint(capsys, monkeypatch, run, tmp_path):
    import lorakit.runtime.checkpoint as ckpt

    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 563520 vs 563412")

    monkeypatch.setattr(ckpt.torch, "save", full)
    before = snapshot(run[0] / "checkpoints")
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--set", "train.max_steps=3", "--quiet")
    assert code == 2 and "the disk is full" in msg and "free of" in msg and "unexpected pos" not in msg
    assert snapshot(run[0] / "checkpoints") == before  # the previous checkpoints intact


def test_5_permission_denied_while_writing(capsys, monkeypatch, run):
    import lorakit.runtime.checkpoint as ckpt

    def denied(_tensors, path, *_a, **_k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ckpt, "save_file", denied)
    code, msg = run_cli(capsys, "train", str(run[1]), "--resume", "--set", "train.max_steps=3", "--quiet")
    assert code == 2 and "cannot write" in msg and "Permission denied" in msg and "mode d" in msg


@pytest.mark.parametrize("content, message", [
    (None, "adapter_config.json not found"),
    ("{not json", "adapter_config.json is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"r": "eight"}', "r='eight' is not valid"),
])
def test_5_merge_with_a_missing_or_corrupt_adapter_config(capsys, world, run, tmp_path, content, message):
    _, base, _ = world
    adapter = run[0] / "adapter"
    if content is None:
        (adapter / "adapter_config.json").unlink()
    else:
        (adapter / "adapter_config.json").write_text(content)
    code, msg = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m"))
    assert code == 2 and message in msg and str(adapter) in msg
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, message", [
    (["--raw", "--prompt", ""], "--prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 1, got -5"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be a number >= 0 (0 = greedy), got -1.0"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature must be a number >= 0"),
])
def test_5_generate_arguments_checked_before_loading(capsys, tmp_path, args, message):
    code, msg = run_cli(capsys, "generate", "--base", str(tmp_path / "no-such-model"), *args)
    assert code == 2 and message in msg  # the base does not exist: nothing was loaded


@pytest.mark.parametrize("spec, message", [
    ("exact_match", "must look like METRIC=VALUE"),
    ("exact_match=high", "must look like METRIC=VALUE"),
    ("exactmatch=0.5", "unknown metric 'exactmatch'"),
    ("exact_match=2", "a threshold is a rate in [0, 1]"),
])
def test_5_eval_fail_below_checked_before_the_eval(capsys, tmp_path, spec, message):
    code, msg = run_cli(capsys, "eval", str(tmp_path / "missing.yaml"), "--fail-below", spec)
    assert code == 2 and message in msg and "missing.yaml" not in msg  # parsed before the config is even read


# --------------------------------------------------------------------------- 6. strict types


def test_6_booleans_ints_and_lists_are_typed_strictly_every_problem_at_once(capsys, world, tmp_path):
    _, base, data = world
    config = write_config(tmp_path / "c.yaml", base, data, tmp_path / "r", data={"packing": "false"},
                          lora={"r": "8", "modules_to_save": "score"}, train={"max_steps": 1.5})
    code, msg = run_cli(capsys, "train", str(config), "--set", "data.dedup=maybe", "--set", "train.lr=-1")
    assert code == 2
    for text in ("data.packing must be true or false, got 'false' (a string: write true or false without quotes)",
                 "data.dedup must be true or false, got 'maybe'",
                 "lora.r must be an integer, got '8' (a string: write the number without quotes)",
                 "lora.modules_to_save must be a list of strings or null, got 'score'",
                 "train.max_steps must be an integer or null, got 1.5",
                 "train.lr must be a number > 0, got -1"):
        assert text in msg, msg
    assert "6 problem(s)" in msg and not (tmp_path / "r").exists()


def test_6_typed_config_api():
    from lorakit.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="data.packing must be true or false, got 'maybe'"):
        load_run_config(None, ["data.packing=maybe"])
    with pytest.raises(ConfigError, match="eval.generation must be a mapping of GenerationConfig keys"):
        load_run_config(None, ["eval.generation=3"])
    assert load_run_config(None, ["data.packing=false", "train.epochs=2"]).data.packing is False


# --------------------------------------------------------------------------- 7. messages that tell the truth


# Flags of other tools that messages tell the user to pass there (vLLM, torchrun).
FOREIGN_FLAGS = {"--max-lora-rank", "--enable-lora-bias", "--standalone", "--nproc_per_node", "--nproc-per-node",
                 "--max-restarts", "--help",
                 "--jinja", "--lora", "--template"}  # llama.cpp's llama-cli and `ollama show`, named by export


def _flags_in_messages() -> set[str]:
    found = set()
    for path in (SRC / "lorakit").rglob("*.py"):
        for literal in re.findall(r"\"[^\"\n]*\"|'[^'\n]*'", path.read_text(encoding="utf-8")):
            found |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]+", literal))
    return found


def _parser_flags() -> set[str]:
    flags = set()

    def walk(parser):
        for action in parser._actions:
            flags.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action.choices, dict):  # subcommands
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return flags


def test_7_every_flag_a_message_names_exists():
    unknown = sorted(_flags_in_messages() - _parser_flags() - FOREIGN_FLAGS)
    assert unknown == [], f"messages name flags that `lorakit` does not have: {unknown}"
    assert "--help-keys" not in _flags_in_messages()  # --no-check-base exists now: `lorakit export` has it


def test_7_missing_config_json_is_reported_as_such(capsys, world, tmp_path):
    _, _, data = world
    model_dir = tmp_path / "model"
    tiny_tokenizer().save_pretrained(model_dir)  # tokenizer files, no config.json
    (model_dir / "model.safetensors").write_bytes(b"")
    config = write_config(tmp_path / "c.yaml", model_dir, data, tmp_path / "r")
    code, msg = run_cli(capsys, "train", str(config), "--quiet", "--no-memory-check")
    assert code == 2 and "has no config.json" in msg and "sentencepiece" not in msg.lower()
    (tmp_path / "empty").mkdir()
    code, msg = run_cli(capsys, "generate", "--base", str(tmp_path / "empty"), "--prompt", "hi")
    assert code == 2 and "has no config.json (found: nothing)" in msg


def test_7_adapters_check_fails_a_rank_that_does_not_match_the_tensors(capsys, run):
    adapter = run[0] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert main(["adapters", "check", str(adapter)]) == 0
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    capsys.readouterr()
    code, msg = run_cli(capsys, "adapters", "check", str(adapter))
    assert code == 1 and "says r=8, but" in msg and "(4, 32)" in msg


# --------------------------------------------------------------------------- 8. smaller


def test_8_a_5mb_row_is_cut_before_tokenizing(tmp_path):
    from lorakit.config import DataConfig
    from lorakit.data import prepare_data
    from lorakit.data.templates import CHARS_PER_TOKEN

    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": "the cat sat on the mat " * 220_000}) + "\n")  # 5 MB
        for i in range(8):
            f.write(json.dumps({"text": f"a dog ran {'fast ' * i}and then it was happy"}) + "\n")
    tokenizer, longest = tiny_tokenizer(), []
    real_call = type(tokenizer).__call__

    def spy(self, text, *a, **k):
        longest.append(len(text) if isinstance(text, str) else 0)
        return real_call(self, text, *a, **k)

    type(tokenizer).__call__ = spy
    try:
        data = prepare_data(DataConfig(train=str(path), max_seq_len=64, eval_fraction=0.0), tokenizer)
    finally:
        type(tokenizer).__call__ = real_call
    assert max(longest) <= 64 * CHARS_PER_TOKEN
    assert data.stats["train"]["truncated"] == 1 and data.stats["train"]["cut_before_tokenizing"] == 1
    assert max(len(e) for e in data.train) == 64


def test_8_empty_yaml_is_an_error_not_the_demo(capsys, tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    code, msg = run_cli(capsys, "train", str(tmp_path / "empty.yaml"))
    assert code == 2 and "is empty" in msg and "`lorakit config`" in msg


# --------------------------------------------------------------------------- the helpers themselves


def test_replace_files_keeps_what_it_does_not_write(tmp_path):
    from lorakit.errors import OutputError
    from lorakit.runtime.outdir import check_output_dir, replace_files

    out = tmp_path / "out"
    with replace_files(out) as tmp:  # a new directory appears whole
        (tmp / "a.json").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]
    (out / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty"):
        check_output_dir(out, force=False)
    with replace_files(out) as tmp:
        (tmp / "a.json").write_text("2")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("3")
    assert (out / "a.json").read_text() == "2" and (out / "sub" / "b.json").read_text() == "3"
    assert (out / "mine.txt").read_text() == "mine"
    (out / "c.json").mkdir()
    with pytest.raises(OutputError, match="is a directory where this command writes a file"):
        with replace_files(out) as tmp:
            (tmp / "c.json").write_text("4")
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_write_errors_name_the_path_and_the_way_out(tmp_path):
    import errno

    from lorakit.runtime.outdir import describe_write_error

    full = describe_write_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), tmp_path)
    assert f"writing {tmp_path / 'x'} failed: the disk is full" in full and "free of" in full
    (tmp_path / "f").write_text("")
    blocked = describe_write_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "f" / "run")), tmp_path / "f" / "run")
    assert f"{tmp_path / 'f'} is a file, not a directory" in blocked
    read_only = describe_write_error(OSError(errno.EROFS, "Read-only file system", str(tmp_path / "r")), tmp_path)
    assert "a read-only file system" in read_only and "mode drwx" in read_only
    assert describe_write_error(RuntimeError("size mismatch"), tmp_path) is None


def test_nproc_reports_a_refused_output_dir_once_before_launching(capsys, run, tmp_path):
    before = snapshot(tmp_path)
    code, msg = run_cli(capsys, "train", str(run[1]), "--nproc", "2")
    assert code == 2 and msg.count("already holds a run") == 1
    assert snapshot(tmp_path) == before
