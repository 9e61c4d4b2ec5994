"""LLM-as-judge: any OpenAI-compatible chat endpoint scores each answer against its reference (`eval.judge`).

    request    POST {base_url}/chat/completions  {model, messages: [system: rubric, user: prompt, reference,
               answer], temperature: 0, max_tokens: 8}
    reply      the first number in the message content, which must lie in 1..scale;
               judge_score = mean over the parsed replies of (score - 1) / (scale - 1), in [0, 1]
    failures   a reply without a score in range (a parse failure), or a request that still fails after
               `max_retries` retries with exponential backoff (timeouts, connection errors, 429, 5xx): counted
               (`judge_failures`) and shown, never raised -- a flaky judge never crashes a training run
    cache      keyed by sha256(model, rubric, scale, prompt, reference, answer), kept in judge_cache.jsonl: an
               answer is judged once, however many evals or reruns ask again
    log        every judge request (messages) and its reply, one JSON line each, in judge.jsonl beside the report

httpx is imported when a judge is first used (pip install 'lorakit[judge]').
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config import JudgeConfig
from lorakit.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = "eval.judge needs httpx: pip install 'lorakit[judge]'"
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
CONCURRENCY = 8  # requests in flight at once
SCORE = re.compile(r"-?\d+(?:\.\d+)?")


def judge_messages(config: JudgeConfig, prompt: str, reference: str, answer: str) -> list[dict[str, str]]:
    """The chat the judge sees: the rubric as the system turn; prompt, reference and answer as the user turn."""
    system = (f"You grade answers. {config.rubric.format(scale=config.scale)} Reply with the score only: one "
              f"integer from 1 to {config.scale}.")
    user = (f"Prompt:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
            f"Score (1-{config.scale}):")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_score(text: Any, scale: int) -> float | None:
    """The first number of the reply when it lies in [1, scale] ("4", "Score: 4/5", "**4**"); else None."""
    if not isinstance(text, str):
        return None
    found = SCORE.search(text)
    if found is None:
        return None
    value = float(found.group())
    return value if 1 <= value <= scale else None


@dataclass
class JudgeResult:
    """Scores in [0, 1] per answer (None where the judge failed) and why each failure happened."""

    scores: list[float | None]
    parse_failures: int = 0
    request_failures: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        got = [s for s in self.scores if s is not None]
        return sum(got) / len(got) if got else float("nan")

    def metrics(self) -> dict[str, float]:
        return {"judge_score": self.mean, "judge_failures": float(self.parse_failures + self.request_failures)}


class Judge:
    """Scores answers with `config`'s endpoint; `judge(prompts, answers, references)` -> {judge_score, judge_failures}."""

    def __init__(self, config: JudgeConfig, out_dir: str | Path | None = None, backoff_s: float = 0.5):
        self.config, self.backoff_s = config, backoff_s
        self.api_key = None
        if config.api_key_env:
            self.api_key = os.environ.get(config.api_key_env)
            if not self.api_key:
                raise ConfigError(f"eval.judge.api_key_env {config.api_key_env} is not set in the environment "
                                  f"(export {config.api_key_env}=... or set api_key_env: null for an open endpoint)")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cache: dict[str, dict[str, Any]] = self._read_cache()
        self.lock = threading.Lock()
        self.sent = 0  # requests that reached the network (retries included), for tests and the summary

    # ----- cache and log files

    def _read_cache(self) -> dict[str, dict[str, Any]]:
        path = self.out_dir / "judge_cache.jsonl" if self.out_dir else None
        if path is None or not path.is_file():
            return {}
        cache = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cache[row["key"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that answer is judged again
        return cache

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.lock, open(self.out_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def key(self, prompt: str, reference: str, answer: str) -> str:
        c = self.config
        text = json.dumps([c.model, c.rubric, c.scale, prompt, reference, answer])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    # ----- judging

    def __call__(self, prompts: Sequence[str], answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return self.judge(prompts, answers, references).metrics()

    def judge(self, prompts: Sequence[str], answers: Sequence[str], references: Sequence[str]) -> JudgeResult:
        """Score every answer (cached ones without a request); failures are counted, never raised."""
        httpx = _httpx()
        result = JudgeResult([None] * len(answers))
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        down = threading.Event()  # the endpoint refused a connection after every retry: skip the rest
        with httpx.Client(base_url=self.config.base_url.rstrip("/"), headers=headers,
                          timeout=self.config.timeout_s) as client:
            def one(i: int) -> tuple[int, float | None, str | None]:
                return (i, *self._one(client, prompts[i], references[i], answers[i], down))

            with ThreadPoolExecutor(CONCURRENCY) as pool:
                for i, score, error in pool.map(one, range(len(answers))):
                    result.scores[i] = None if score is None else (score - 1) / (self.config.scale - 1)
                    if error is not None:
                        result.errors.append(error)
                        if error.startswith("parse"):
                            result.parse_failures += 1
                        else:
                            result.request_failures += 1
        if result.errors:
            log.warning("judge: %d of %d answers not scored (%d unparseable replies, %d failed requests); first: %s",
                        len(result.errors), len(answers), result.parse_failures, result.request_failures, result.errors[0])
        return result

    def _one(self, client: Any, prompt: str, reference: str, answer: str, down: threading.Event) -> tuple[float | None, str | None]:
        key = self.key(prompt, reference, answer)
        cached = self.cache.get(key)
        if cached is not None:
            return cached["score"], None
        if down.is_set():
            return None, "request: skipped, the endpoint was unreachable"
        messages = judge_messages(self.config, prompt, reference, answer)
        reply, error = self._request(client, messages, down)
        self._append("judge.jsonl", {"key": key, "messages": messages, "reply": reply, "error": error})
        if error is not None:
            return None, f"request: {error}"
        score = parse_score(reply, self.config.scale)
        if score is None:
            return None, f"parse: no score in 1..{self.config.scale} in {str(reply)[:80]!r}"
        with self.lock:
            self.cache[key] = {"key": key, "score": score}
        self._append("judge_cache.jsonl", {"key": key, "score": score})
        return score, None

    def _request(self, client: Any, messages: list[dict[str, str]], down: threading.Event) -> tuple[str | None, str | None]:
        """(reply text, None) or (None, why it failed), after up to max_retries retries with exponential backoff."""
        httpx = _httpx()
        body = {"model": self.config.model, "messages": messages, "temperature": 0, "max_tokens": 8}
        error = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            with self.lock:
                self.sent += 1
            try:
                response = client.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                error = f"timed out after {self.config.timeout_s}s"
                continue
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e}"
                if attempt == self.config.max_retries:
                    down.set()
                continue
            if response.status_code in RETRY_STATUS:
                error = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                return None, f"HTTP {response.status_code}: {response.text[:200]}"
            try:
                return response.json()["choices"][0]["message"]["content"], None
            except (ValueError, KeyError, IndexError, TypeError):
                return None, f"not a chat completion: {response.text[:200]}"
        return None, f"{error} (after {self.config.max_retries} retries)"


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return httpx
