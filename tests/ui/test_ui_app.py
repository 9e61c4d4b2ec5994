"""The dashboard's API and its gate, on run folders written by hand (no model, no browser): statuses, live
metrics by byte offset, paths confined to --runs, the new-run form's validation, start/stop of a trainer
process, and the security rules (loopback Host, API key, write header)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="pip install 'lorakit[ui]'")
from fastapi.testclient import TestClient  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.config import RunConfig  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.ui import RunsRoot, UIError, gated_app, make_state  # noqa: E402
from lorakit.ui.runs import read_metrics  # noqa: E402

HEADERS = {"X-Lorakit-UI": "1"}


def write_run(run_dir: Path, steps: int = 4, summary: str | None = "completed", method: str = "lora") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"base_model: /models/tiny-llama\nmethod: {method}\ntask: causal_lm\n"
                                         "train:\n  max_steps: 10\n")
    rows = [{"step": s, "epoch": s / 10, "loss": 3.0 - 0.2 * s, "lr": 1e-3, "tokens": 100 * s, "tokens_per_s": 50.0}
            for s in range(1, steps + 1)]
    rows[-1]["eval_loss"] = 2.5
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({"status": summary, "steps": steps, "total_steps": 10,
                                                          "best_eval_loss": 2.5, "wall_time_s": 12.5}))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "done")
    write_run(root / "stopped", summary="interrupted")
    (root / "stopped" / "checkpoints" / "step-4").mkdir(parents=True)
    old = write_run(root / "crashed", summary=None)
    os.utime(old / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))
    live = write_run(root / "sweep" / "r8", summary=None)
    (live / ".lorakit.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    outside = write_run(tmp_path / "elsewhere")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


def client(root: Path, api_key: str | None = None, host: str = "127.0.0.1", **kw) -> TestClient:
    state = make_state(root, preset=RunConfig(), **kw)
    return TestClient(gated_app(state, host=host, api_key=api_key), base_url="http://127.0.0.1:7860")


def test_runs_table_statuses_and_confinement(runs):
    rows = {r["id"]: r for r in client(runs).get("/api/runs").json()["runs"]}
    assert set(rows) == {"done", "stopped", "crashed", "sweep/r8"}  # the symlink out of --runs is not listed
    assert {k: r["status"] for k, r in rows.items()} == {
        "done": "completed", "stopped": "stopped", "crashed": "failed", "sweep/r8": "running"}
    assert rows["done"]["step"] == 4 and rows["done"]["total_steps"] == 10 and rows["done"]["best_eval_loss"] == 2.5
    assert rows["done"]["base"] == "tiny-llama" and rows["done"]["wall_time_s"] == 12.5
    assert rows["stopped"]["resumable"] and not rows["done"]["resumable"]


@pytest.mark.parametrize("bad, status", [("../elsewhere", 400), ("/etc", 400), ("escape", 403), ("done/..", 400),
                                         (".hidden", 400), ("a\\b", 400), ("nope", 404)])
def test_run_ids_stay_inside_the_runs_folder(runs, bad, status):
    response = client(runs).get("/api/run", params={"id": bad})
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_metrics_are_read_incrementally_and_restart_when_the_file_is_replaced(runs):
    run = runs / "done"
    first = read_metrics(run)
    assert [r["step"] for r in first.rows] == [1, 2, 3, 4] and first.reset
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')  # a line still being written
    more = read_metrics(run, first.offset, first.ino)
    assert [r["step"] for r in more.rows] == [5] and not more.reset
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ss": NaN}\n')
    last = read_metrics(run, more.offset, more.ino)
    assert last.rows == [{"step": 6, "loss": None}]  # NaN goes to the browser as null
    tmp = run / "metrics.new"  # a resume rewrites the file (truncated to its checkpoint) and renames it in
    tmp.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    os.replace(tmp, run / "metrics.jsonl")
    again = read_metrics(run, last.offset, last.ino)
    assert again.reset and [r["step"] for r in again.rows] == [1]
    api = client(runs).get("/api/metrics", params={"id": "done", "offset": 0, "ino": 0}).json()
    assert api["status"] == "completed" and [r["step"] for r in api["rows"]] == [1]


def test_run_page_data(runs):
    data = client(runs).get("/api/run", params={"id": "stopped"}).json()
    assert data["run"]["status"] == "stopped" and data["checkpoints"][0]["step"] == 4
    assert "method: lora" in data["config_yaml"] and data["summary"]["status"] == "interrupted"


def test_measured_memory_appears_once_the_run_writes_its_summary(runs):
    """The advice is cached, but not past the summary: a stop (or the end) writes the measured peak into
    summary.json without touching config.yaml, and the run page asks again when the status changes."""
    c = client(runs)
    ask = lambda: c.get("/api/run/advice", params={"id": "crashed"}).json()  # noqa: E731
    assert ask()["measured_bytes"] is None  # the advisor's own error (no such base) is beside the point here
    (runs / "crashed" / "summary.json").write_text(json.dumps({"status": "interrupted", "steps": 4,
                                                               "peak_memory_bytes": 123456789, "device": "cpu"}))
    assert ask()["measured_bytes"] == 123456789 and ask()["device"] == "cpu"


def test_form_reports_every_problem_with_the_cli_messages(runs):
    c = client(runs)
    defaults = c.get("/api/form").json()
    assert defaults["fields"]["lora.r"] == "16" and "tensorboard" in defaults["reporters"]
    fields = {"lora.r": "0", "train.lr": "-1", "train.report_to": "[tensorbord]"}
    preview = c.post("/api/form/preview", json={"name": "x", "fields": fields, "advice": False}, headers=HEADERS).json()
    assert "lora.r must be an integer >= 1, got 0" in preview["problems"]
    assert "train.lr must be a number > 0, got -1" in preview["problems"]
    assert any("unknown tracker 'tensorbord'" in p for p in preview["problems"])
    extra = "# a comment\ntrain.seed=3\ntrain.warmup_step=3"
    preview = c.post("/api/form/preview", json={"name": "ok", "fields": {"lora.r": "8"}, "extra": extra, "advice": False},
                     headers=HEADERS).json()
    assert preview["problems"] == ["unknown key train.warmup_step; did you mean train.warmup_steps?"]
    started = c.post("/api/form/start", json={"name": "ok", "fields": {"lora.r": "0"}}, headers=HEADERS)
    assert started.status_code == 400 and "lora.r must be an integer >= 1, got 0" in started.json()["problems"]
    assert not (runs / "ok").exists()
    for name in ("../out", "done"):  # outside --runs, or an existing run
        response = c.post("/api/form/start", json={"name": name, "fields": {}}, headers=HEADERS)
        assert response.status_code in (400, 409), response.text


def test_form_yaml_is_the_file_that_runs(runs):
    c = client(runs)
    preview = c.post("/api/form/preview", json={"name": "good", "fields": {"lora.r": "8", "train.max_steps": "5"},
                                                "advice": False}, headers=HEADERS).json()
    assert preview["problems"] == []
    assert f"output_dir: {runs.resolve() / 'good'}" in preview["yaml"] and "r: 8" in preview["yaml"]


@pytest.fixture
def fake_python(tmp_path):
    """Stands in for `python -m lorakit train`: records its arguments, exits 130 on SIGINT like the CLI."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$4\")/args.txt\"\ntrap 'echo interrupted; exit 130' INT\n"
                      "i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_start_stop_resume_run_a_separate_process(runs, fake_python):
    c = client(runs, python=fake_python)
    started = c.post("/api/form/start", json={"name": "new", "fields": {"train.max_steps": "5"}}, headers=HEADERS)
    assert started.status_code == 200, started.text
    run = runs / "new"
    assert wait_for(lambda: (run / "args.txt").is_file())
    assert (run / "args.txt").read_text().split() == ["-m", "lorakit", "train", str(run / "config.yaml"), "--quiet"]
    status = lambda: {r["id"]: r["status"] for r in c.get("/api/runs").json()["runs"]}["new"]  # noqa: E731
    assert status() == "running"
    again = c.post("/api/form/start", json={"name": "new", "fields": {}}, headers=HEADERS)
    assert again.status_code == 409
    restarted = client(runs, python=fake_python)  # a new UI finds the run its predecessor started, and stops it
    assert {r["id"]: r["status"] for r in restarted.get("/api/runs").json()["runs"]}["new"] == "running"
    assert restarted.post("/api/run/stop", json={"id": "new"}, headers=HEADERS).status_code == 200
    assert wait_for(lambda: status() == "stopped")  # exit 130, no summary: interrupted before training
    assert "interrupted" in (run / "train.log").read_text()
    assert {r["id"]: r["status"] for r in client(runs).get("/api/runs").json()["runs"]}["new"] == "stopped"  # a new UI too
    refused = c.post("/api/run/resume", json={"id": "new"}, headers=HEADERS)
    assert refused.status_code == 409 and "no checkpoint" in refused.json()["error"]
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    assert c.post("/api/run/resume", json={"id": "new"}, headers=HEADERS).status_code == 200
    assert wait_for(lambda: "--resume" in (run / "args.txt").read_text())
    c.post("/api/run/stop", json={"id": "new"}, headers=HEADERS)


def test_gate_host_key_and_write_header(runs):
    open_client = client(runs)
    assert open_client.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    assert open_client.post("/api/run/stop", json={"id": "done"}).status_code == 403  # no X-Lorakit-UI header
    assert open_client.get("/").status_code == 200 and "common.js" in open_client.get("/").text

    keyed = client(runs, api_key="s3cret", host="0.0.0.0")
    assert keyed.get("/api/runs").status_code == 401
    page = keyed.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert keyed.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert keyed.post("/login", data={"key": "nope"}).status_code == 401
    login = keyed.post("/login", data={"key": "s3cret"}, follow_redirects=False)
    assert login.status_code == 303 and "HttpOnly" in login.headers["set-cookie"]
    assert keyed.get("/api/runs").status_code == 200  # the session cookie now
    assert keyed.get("/api/runs", headers={"Host": "my-box.lan:7860"}).status_code == 200  # any Host once keyed


def test_binding_elsewhere_needs_a_key(runs, tmp_path, capsys, monkeypatch):
    with pytest.raises(UIError, match="--api-key"):
        client(runs, host="0.0.0.0")
    assert isinstance(UIError("x"), LorakitError)
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    assert main(["ui", "--runs", str(tmp_path / "r"), "--host", "0.0.0.0"]) == 2  # the CLI: message, status 2
    assert "--host 0.0.0.0 makes the dashboard" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_static_files_are_only_the_apps_own(runs):
    c = client(runs)
    assert c.get("/static/charts.js").status_code == 200
    assert c.get("/static/app.css").headers["content-type"].startswith("text/css")
    for bad in ("..%2Fapp.py", "app.py", "runs.html"):
        assert c.get(f"/static/{bad}").status_code == 404
    html = "".join(c.get(p).text for p in ("/", "/run", "/new", "/chat"))
    assert "http://" not in html and "https://" not in html  # nothing from a CDN


def test_runs_root_discovery_skips_run_subfolders(tmp_path):
    root = RunsRoot(tmp_path)
    write_run(tmp_path / "a")
    (tmp_path / "a" / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "step-1" / "config.yaml").write_text("{}")
    write_run(tmp_path / "b.old-20250101-000000")
    assert [root.run_id(p) for p in root.discover()] == ["a", "b.old-20250101-000000"]
    assert sys.platform != "win32"


def test_a_summary_older_than_the_metrics_belongs_to_an_earlier_attempt(runs):
    """Stopped, resumed from the UI, then the resumed trainer died: the old 'interrupted' summary no longer
    speaks for the run (the resume rewrote metrics.jsonl after it)."""
    run, now = runs / "stopped", time.time()
    os.utime(run / "summary.json", (now - 600, now - 600))
    os.utime(run / "metrics.jsonl", (now - 300, now - 300))
    rows = {r["id"]: r for r in client(runs).get("/api/runs").json()["runs"]}
    assert rows["stopped"]["status"] == "failed" and rows["stopped"]["resumable"]
    os.utime(run / "metrics.jsonl", (now, now))  # still writing, no lock file (a CLI run before locks): running
    rows = {r["id"]: r for r in client(runs).get("/api/runs").json()["runs"]}
    assert rows["stopped"]["status"] == "running" and not rows["stopped"]["resumable"]
