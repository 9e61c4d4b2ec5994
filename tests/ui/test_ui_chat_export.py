"""Chat and export through the dashboard's API, on a tiny saved base and an adapter with random factors (no
browser): the run's base and adapter on lorakit.serve's engine behind /serve/<slot>/, streamed; merge and
GGUF exports finishing with progress 1 and the files where the page says."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi", reason="pip install 'lorakit[ui]'")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import randomize_lora, save_tiny_base  # noqa: E402
from lorakit.adapters import save_lora_adapter  # noqa: E402
from lorakit.config import LoraConfig, RunConfig  # noqa: E402
from lorakit.lora import inject_lora  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.ui import gated_app, make_state  # noqa: E402

HEADERS = {"X-Lorakit-UI": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-chat")
    base = save_tiny_base(tmp / "base")
    run = tmp / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"base_model: {base}\nmethod: lora\ntask: causal_lm\n")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "steps": 1}))
    model = load_model(str(base))
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, seed=3)
    save_lora_adapter(model, run / "adapter")
    return tmp / "runs"


@pytest.fixture(scope="module")
def client(runs):
    state = make_state(runs, preset=RunConfig())
    with TestClient(gated_app(state), base_url="http://127.0.0.1:7860") as c:
        yield c
    state.hub.close()


def sse_text(response) -> tuple[str, bool]:
    text, done = "", False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        delta = json.loads(line[6:])["choices"][0]["delta"]
        text += delta.get("content") or ""
    return text, done


def test_chat_base_and_adapter_stream_from_the_serve_engine(client):
    target = client.post("/api/chat/prepare", json={"id": "tiny"}, headers=HEADERS).json()
    assert target["adapter_model"] == "run:tiny" and target["url"] == f"/serve/{target['slot']}/v1"
    models = client.get(f"{target['url']}/models").json()
    assert [m["id"] for m in models["data"]] == [target["base_model"], "run:tiny"]
    answers = {}
    for model in (target["base_model"], target["adapter_model"]):
        body = {"model": model, "messages": [{"role": "user", "content": "the cat sat on the"}], "stream": True,
                "max_tokens": 8, "temperature": 0}
        with client.stream("POST", f"{target['url']}/chat/completions", json=body, headers=HEADERS) as response:
            assert response.status_code == 200
            answers[model], done = sse_text(response)
        assert done and answers[model]
    assert answers[target["base_model"]] != answers[target["adapter_model"]]  # random B: the adapter changes it
    again = client.post("/api/chat/prepare", json={"id": "tiny"}, headers=HEADERS).json()
    assert again["slot"] == target["slot"]  # the loaded base is reused
    assert client.post(f"{target['url']}/chat/completions", json={"model": "x"}).status_code == 403  # no header
    assert client.get("/serve/nope/v1/models").status_code == 404


def wait_export(client, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get("/api/run", params={"id": "tiny"}).json()["export"]
        if job["state"] != "running":
            return job
        time.sleep(0.2)
    raise AssertionError("the export did not finish")


def test_merge_export_finishes_with_progress_and_files(client, runs):
    started = client.post("/api/run/export", json={"id": "tiny", "kind": "merge"}, headers=HEADERS)
    assert started.status_code == 200 and started.json()["state"] == "running", started.text
    job = wait_export(client)
    assert job["state"] == "done" and job["progress"] == 1.0, job
    assert (runs / "tiny" / "merged" / "model.safetensors").is_file() and job["out"] == str(runs / "tiny" / "merged")
    (runs / "tiny" / "merged" / "NOTES.md").write_text("mine")  # a second export replaces only its own files
    client.post("/api/run/export", json={"id": "tiny", "kind": "merge"}, headers=HEADERS)
    assert wait_export(client)["state"] == "done" and (runs / "tiny" / "merged" / "NOTES.md").read_text() == "mine"


def test_a_failed_export_says_why(client):
    """GGUF of a word-level tokenizer is refused by the exporter; the page shows its message."""
    pytest.importorskip("gguf", reason="pip install 'lorakit[export]'")
    started = client.post("/api/run/export", json={"id": "tiny", "kind": "gguf", "dtype": "f32"}, headers=HEADERS)
    assert started.status_code == 200, started.text
    job = wait_export(client)
    assert job["state"] == "failed" and "not supported by the GGUF export" in job["message"], job


def test_export_and_chat_refuse_a_run_without_adapter(client, runs):
    (runs / "bare").mkdir()
    (runs / "bare" / "config.yaml").write_text("base_model: x\n")
    assert client.post("/api/run/export", json={"id": "bare", "kind": "merge"}, headers=HEADERS).status_code == 409
    assert client.post("/api/chat/prepare", json={"id": "bare"}, headers=HEADERS).status_code == 409
    bad = client.post("/api/run/export", json={"id": "tiny", "kind": "zip"}, headers=HEADERS)
    assert bad.status_code == 400 and "merge, gguf, gguf-lora" in bad.json()["error"]
