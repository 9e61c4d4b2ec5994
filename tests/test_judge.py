"""eval/judge.py against a stub OpenAI-compatible server on 127.0.0.1 (good scores, malformed scores, 500s, a
slow reply, an endpoint that is down) and against `lorakit serve` itself; then a training run selecting on it."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import WORDS, save_tiny_base
from lorakit.config import JudgeConfig, load_run_config
from lorakit.errors import ConfigError
from lorakit.eval.judge import Judge, judge_messages, parse_score


class Stub(BaseHTTPRequestHandler):
    """Replies by what the answer under judgement says: GOOD -> "Score: 5", OK -> "3/5", JUNK -> prose, FLAKY ->
    two 500s then "4", BROKEN -> always 500, SLOW -> a reply after the client's timeout, GARBLED -> not JSON."""

    seen: Counter = Counter()
    headers_seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = body["messages"][-1]["content"].split("Answer to grade:\n", 1)[1].split("\n", 1)[0]
        Stub.seen[answer] += 1
        Stub.headers_seen.append(self.headers.get("Authorization"))
        n = Stub.seen[answer]
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if "BROKEN" in answer or ("FLAKY" in answer and n <= 2):
            return self._send(500, {"error": {"message": "boom"}})
        if "SLOW" in answer:
            time.sleep(0.5)
        if "GARBLED" in answer:
            return self._send(200, "<html>not json</html>")
        reply = {"GOOD": "Score: 5", "OK": "3/5", "JUNK": "This answer is quite good.", "FLAKY": "4", "HIGH": "9"}
        text = next((v for k, v in reply.items() if k in answer), "1")
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    def _send(self, status, payload):
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fresh_counts():
    Stub.seen.clear()
    Stub.headers_seen.clear()


def config(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"base_url": url, "model": "stub", "timeout_s": 5.0, "max_retries": 2, **kw})


def test_parse_score():
    assert [parse_score(t, 5) for t in ("4", "Score: 4/5", "**5**", "3.5", " 1\n")] == [4, 4, 5, 3.5, 1]
    assert [parse_score(t, 5) for t in ("", "great", "0", "6", "-2", None, 7)] == [None] * 7
    messages = judge_messages(JudgeConfig(base_url="http://x", model="m", scale=10), "P", "R", "A")
    assert "1 to 10" in messages[0]["content"] and "10 = equivalent" in messages[0]["content"]
    assert messages[1]["content"].endswith("Answer to grade:\nA\n\nScore (1-10):")


def test_scores_retries_parse_failures_and_the_cache(stub, tmp_path):
    judge = Judge(config(stub), tmp_path, backoff_s=0.01)
    answers = ["GOOD", "OK", "JUNK", "FLAKY", "BROKEN", "GARBLED", "HIGH"]
    result = judge.judge([f"p{i}" for i in range(7)], answers, ["ref"] * 7)
    assert result.scores == [1.0, 0.5, None, 0.75, None, None, None]
    assert (result.parse_failures, result.request_failures) == (2, 2)  # JUNK, HIGH; BROKEN, GARBLED
    assert Stub.seen["FLAKY"] == 3 and Stub.seen["BROKEN"] == 3  # 1 + max_retries attempts
    assert result.metrics() == {"judge_score": pytest.approx((1 + 0.5 + 0.75) / 3), "judge_failures": 4.0}
    assert any("HTTP 500 (after 2 retries)" in e for e in result.errors)
    assert any("parse: no score in 1..5 in 'This answer is quite good.'" == e for e in result.errors)
    logged = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert len(logged) == 7 and logged[0]["messages"][1]["content"].startswith("Prompt:\np")
    # cached: the scored answers are never sent again, by this judge or by a new one reading judge_cache.jsonl
    Stub.seen.clear()
    again = Judge(config(stub), tmp_path, backoff_s=0.01).judge([f"p{i}" for i in range(4)], answers[:4], ["ref"] * 4)
    assert again.scores[:2] == [1.0, 0.5] and again.scores[3] == 0.75 and set(Stub.seen) == {"JUNK"}
    # the key is (prompt, reference, answer, rubric, scale, model): a new rubric asks again
    Judge(config(stub, rubric="Be harsh; {scale} is perfect."), tmp_path, backoff_s=0.01).judge(["p0"], ["GOOD"], ["ref"])
    assert Stub.seen["GOOD"] == 1


def test_timeouts_and_an_endpoint_that_is_down_are_counted_not_raised(stub, tmp_path):
    slow = Judge(config(stub, timeout_s=0.1, max_retries=1), None, backoff_s=0.01).judge(["p"], ["SLOW"], ["r"])
    assert slow.scores == [None] and slow.request_failures == 1 and "timed out" in slow.errors[0]
    start = time.perf_counter()
    down = Judge(config("http://127.0.0.1:9/v1", max_retries=1), None, backoff_s=0.01).judge(
        [f"p{i}" for i in range(40)], ["GOOD"] * 40, ["r"] * 40)
    assert down.request_failures == 40 and time.perf_counter() - start < 10
    assert down.metrics()["judge_failures"] == 40 and down.metrics()["judge_score"] != down.metrics()["judge_score"]  # NaN


def test_api_key_comes_from_the_named_variable(stub, monkeypatch):
    with pytest.raises(ConfigError, match="JUDGE_KEY_FOR_TEST is not set"):
        Judge(config(stub, api_key_env="JUDGE_KEY_FOR_TEST"))
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-test")
    Judge(config(stub, api_key_env="JUDGE_KEY_FOR_TEST")).judge(["p"], ["GOOD"], ["r"])
    assert Stub.headers_seen == ["Bearer sk-test"]


def test_lorakit_serve_as_the_judge(tmp_path):
    """The protocol end to end against our own server (a tiny random model: its replies hold no score, so
    every answer is a counted parse failure -- and nothing crashes)."""
    pytest.importorskip("fastapi")
    from lorakit.serve import BackgroundServer, ServeSettings, build_app, create_state

    base = str(save_tiny_base(tmp_path / "base"))
    state = create_state(ServeSettings(base=base, device="cpu", dtype="float32", max_tokens=16))
    try:
        with BackgroundServer(build_app(state)) as server:
            judge = Judge(JudgeConfig(base_url=server.url + "/v1", model=base, max_retries=0), tmp_path, backoff_s=0.01)
            result = judge.judge(["the cat sat", "a dog ran"], ["on the mat", "fast"], ["on the mat", "slow"])
    finally:
        state.close()
    assert result.request_failures == 0 and result.parse_failures == 2 and judge.sent == 2
    replies = [json.loads(line)["reply"] for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_judge_score_selects_the_checkpoint_during_training(stub, tmp_path):
    """eval.every_eval with a judge: judge_score and judge_failures at every eval, selection on judge_score."""
    from lorakit.train import train_lora

    base = save_tiny_base(tmp_path / "base")
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(40):  # "the cat sat" -> "on the": the next words of WORDS
            user = [WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 4)]
            answer = [WORDS[(i + 3 + i % 4 + k) % len(WORDS)] for k in range(2)]
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(user)},
                                             {"role": "assistant", "content": " ".join(answer)}]}) + "\n")
    run = load_run_config(None, [
        f"base_model={base}", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'chat.jsonl'}",
        "data.eval_fraction=0.2", "data.max_seq_len=32", "data.packing=false", "data.dedup=false", "lora.r=4",
        "lora.alpha=8", "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=6", "train.lr=1e-2",
        "train.eval_every=3", "train.save_every=null", "train.gradient_checkpointing=false", "train.device=cpu",
        "train.dtype=float32", "eval.at_end=false", "eval.every_eval=[exact_match, judge_score]", "eval.canary=null",
        "eval.during_training_prompts=4", "eval.generation.max_new_tokens=3", f"eval.judge.base_url={stub}",
        "eval.judge.model=stub", "train.select_best.metric=judge_score"])
    result = train_lora(run, progress=False, memory_check=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_time_s" in r]
    assert evals and all(r["judge_score"] == 0.0 and r["judge_failures"] == 0 for r in evals)  # the stub says "1"
    assert set(evals[0]) >= {"exact_match", "judge_score", "judge_failures", "eval_loss"} and "json_valid" not in evals[0]
    assert result.summary["selection"]["metric"] == "judge_score" and result.summary["selection"]["chosen_step"] == evals[0]["step"]
    assert (result.run_dir / "judge.jsonl").is_file() and sum(Stub.seen.values()) >= 1


def test_lorakit_eval_judges_base_and_tuned_answers(stub, tmp_path):
    """run_eval with a judge: judge_score for the base (adapters off) and the tuned model, one request per distinct
    answer, counted failures in the report's table."""
    import torch
    import transformers as tf

    from conftest import randomize_lora, tiny_tokenizer
    from lorakit.config import EvalConfig, GenerationConfig, LoraConfig
    from lorakit.eval import PromptSet, run_eval
    from lorakit.lora import inject_lora

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                               pad_token_id=tok.pad_token_id)).eval()
    inject_lora(model, LoraConfig(r=4, dropout=0.0))
    randomize_lora(model)
    prompts = PromptSet([tok("the cat sat")["input_ids"], tok("a dog ran")["input_ids"]], ["on the mat", "fast"])
    judge = Judge(config(stub), tmp_path, backoff_s=0.01)
    report = run_eval(model, tok, EvalConfig(generation=GenerationConfig(max_new_tokens=3), canary=None),
                      prompts=prompts, judge=judge)
    assert report.base["judge_score"] == report.tuned["judge_score"] == 0.0  # the stub gives these answers "1"
    assert report.base["judge_failures"] == 0 and "| judge_score |" in report.markdown
    assert judge.sent == len({json.loads(line)["key"] for line in (tmp_path / "judge.jsonl").read_text().splitlines()})
