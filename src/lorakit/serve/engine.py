"""The engine: a thread running continuous batching over one model with per-row adapters.

Between two decode steps finished rows leave the batch and waiting jobs join it (prefilled on their own,
then stacked onto the shared KV cache, `lorakit.generate.RunningBatch`); tokens are chosen with
`lorakit.generate`'s functions, so a greedy answer equals `generate` on the same model and adapter.
Text goes back to the requests as `Event`s through each job's `emit`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.config import GenerationConfig
from lorakit.generate import RunningBatch, _cut_at_stop, next_tokens_per_row, stop_token_ids
from lorakit.lora import adapter_configs, adapter_rows
from lorakit.serve.bank import Adapter
from lorakit.serve.openai import ServeError

log = logging.getLogger(__name__)

@dataclass
class Event:
    """What the engine tells a request: new text for choice `index`, and at the end why it stopped."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class Job:
    """One choice being generated: its prompt, adapter, settings, and where its text goes."""

    prompt_ids: list[int]
    adapter: Adapter | None
    config: GenerationConfig
    emit: Callable[[Event], None]
    index: int = 0
    ignore_eos: bool = False
    seed: int | None = None  # the request's seed + the choice index, so n seeded choices differ
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (V,) bool, only with a repetition penalty

    @property
    def key(self) -> str | None:
        return None if self.adapter is None else self.adapter.key

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters for /health and the benchmark; `max_adapters_per_forward` shows the mixing happens."""

    forwards: int = 0
    rows_forwarded: int = 0
    tokens: int = 0
    finished: int = 0
    failed: int = 0
    max_rows_per_forward: int = 0
    max_adapters_per_forward: int = 0

    def record(self, keys: Sequence[str | None]) -> None:
        self.forwards += 1
        self.rows_forwarded += len(keys)
        self.max_rows_per_forward = max(self.max_rows_per_forward, len(keys))
        self.max_adapters_per_forward = max(self.max_adapters_per_forward, len(set(keys)))


class Engine:
    """A thread that runs the continuous-batching loop: admit waiting jobs, step, drop finished ones."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_lock: threading.Lock,
                 release: Callable[[Adapter | None], None], max_batch: int = 16, max_waiting: int = 1024,
                 max_prefill_tokens: int = 8192):
        # its own tokenizer: requests are encoded on the parser thread while this one decodes, and a fast
        # tokenizer's Rust state is not meant to be shared across threads
        self.model, self.tokenizer, self.model_lock, self.release = model, copy.deepcopy(tokenizer), model_lock, release
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.batch = RunningBatch(model)
        self.rows: list[Job] = []  # row i of `batch`
        self.waiting: deque[Job] = deque()
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._fail(self.rows + list(self.waiting), "the server is shutting down")
        self.rows, self.waiting = [], deque()

    def load(self) -> dict[str, int]:
        return {"running": len(self.rows), "waiting": len(self.waiting)}

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down; retry on another replica", type="server_error")
            if len(self.waiting) + len(jobs) > self.max_waiting:
                raise ServeError(503, f"{len(self.waiting)} sequences are already queued (limit {self.max_waiting}, "
                                      "--max-waiting); retry later", type="server_error", code="overloaded")
            for job in jobs:
                if job.seed is not None:
                    job.generator = torch.Generator(device=self.device).manual_seed(job.seed)
                if job.config.repetition_penalty != 1.0:
                    job.seen = torch.zeros(self.model.get_input_embeddings().num_embeddings, dtype=torch.bool,
                                           device=self.device).index_fill_(0, torch.tensor(job.prompt_ids,
                                                                                           device=self.device), True)
            self.waiting.extend(jobs)
            self._cond.notify()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            admitted = self._admissions()
            if admitted is None:
                return
            try:
                self._drop_cancelled()
                if admitted:
                    self._prefill(admitted)
                if self.rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug in one iteration fails its requests, not the engine
                log.exception("engine iteration failed; failing its %d requests", len(self.rows))
                self._fail(self.rows + admitted, f"internal error: {type(e).__name__}: {e}")
                self.rows = []
                self.batch.keep([])

    def _admissions(self) -> list[Job] | None:
        """Waiting jobs that fit in the batch (by rows and by prefill tokens); blocks while idle."""
        with self._cond:
            while not self._stopping and not self.waiting and not self.rows:
                self._cond.wait()
            if self._stopping:
                return None
            admitted, cancelled, tokens = [], [], 0
            while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                job = self.waiting[0]
                if admitted and tokens + len(job.prompt_ids) > self.max_prefill_tokens:
                    break
                self.waiting.popleft()
                (cancelled if job.cancelled else admitted).append(job)
                tokens += 0 if job.cancelled else len(job.prompt_ids)
        for job in cancelled:
            self._finish(job, "cancelled")
        return admitted

    def _prefill(self, jobs: list[Job]) -> None:
        try:
            with self.model_lock, _adapter_rows(self.model, [j.key for j in jobs]):
                logits = self.batch.prefill([j.prompt_ids for j in jobs], self.pad_id)  # (n, V)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server or fail its neighbours
            if len(jobs) > 1:  # retry one by one to find the culprit (a failed prefill leaves the batch as it was)
                for job in jobs:
                    self._prefill([job])
                return
            log.exception("prefill failed")
            self._fail(jobs, f"internal error while reading the prompt: {type(e).__name__}: {e}")
            return
        self.stats.record([j.key for j in jobs])
        self.rows += jobs
        self._advance(jobs, logits)

    def _step(self) -> None:
        keys = [j.key for j in self.rows]
        tokens = torch.tensor([j.token_ids[-1] for j in self.rows])  # (B,) each row's last chosen token
        try:
            with self.model_lock, _adapter_rows(self.model, keys):
                logits = self.batch.step(tokens)  # (B, V)
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("decode step over %d sequences failed", len(self.rows))
            self._fail(self.rows, f"internal error while generating: {type(e).__name__}: {e}")
            self.rows = []
            self.batch.keep([])
            return
        self.stats.record(keys)
        self._advance(list(self.rows), logits)

    def _advance(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Choose and record one token for each of `jobs` (the last len(jobs) rows), drop finished rows."""
        chosen = next_tokens_per_row(logits, [j.config for j in jobs], [j.seen for j in jobs],
                                     [j.generator for j in jobs])
        for job, token in zip(jobs, chosen.tolist(), strict=True):
            self._record(job, token)
        self.stats.tokens += len(jobs)
        self._drop(lambda job: job.done)

    def _drop_cancelled(self) -> None:
        for job in self.rows:
            if job.cancelled and not job.done:
                self._finish(job, "cancelled")
        self._drop(lambda job: job.done)

    def _drop(self, gone: Callable[[Job], bool]) -> None:
        keep = [i for i, job in enumerate(self.rows) if not gone(job)]
        if len(keep) < len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]

    # ------------------------------------------------------------------ tokens to text

    def _record(self, job: Job, token: int) -> None:
        """Append a token (or stop), decode, and emit the text no stop string can still take back."""
        if token in self.stop_ids and not job.ignore_eos:
            self._finish(job, "stop")
            return
        job.token_ids.append(token)
        if job.seen is not None:
            job.seen[token] = True
        # NOTE: decodes the whole output each token (as generate's stop check does): O(n²), fine at these lengths
        text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        job.text = _cut_at_stop(text, job.config.stop)
        if job.text != text:
            self._finish(job, "stop")
        elif len(job.token_ids) >= job.config.max_new_tokens:
            self._finish(job, "length")
        else:
            delta = self._take(job, final=False)
            if delta:
                _safe_emit(job, Event(job.index, delta))

    @staticmethod
    def _take(job: Job, final: bool) -> str:
        """Text not yet emitted; unless final, hold back what could start a stop string or is a partial
        character (decoders show an incomplete UTF-8 sequence as U+FFFD until its last byte arrives)."""
        end = len(job.text)
        if not final:
            end -= max((len(s) for s in job.config.stop), default=1) - 1
            while end > job.sent and job.text[end - 1] == "\ufffd":
                end -= 1
        delta = job.text[job.sent : max(end, job.sent)]
        job.sent += len(delta)
        return delta

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        self.stats.finished += 1
        self.release(job.adapter)  # before the last event: a client that saw the end sees the adapter freed
        _safe_emit(job, Event(job.index, self._take(job, final=True), finish_reason=reason,
                              completion_tokens=len(job.token_ids)))

    def _fail(self, jobs: Sequence[Job], message: str) -> None:
        for job in jobs:
            if job.done:
                continue
            job.finish_reason = "error"
            self.stats.failed += 1
            self.release(job.adapter)
            _safe_emit(job, Event(job.index, error=message))


@contextlib.contextmanager
def _adapter_rows(model: nn.Module, keys: Sequence[str | None]) -> Iterator[None]:
    """adapter_rows, skipped when the model has no adapter at all (a merged or plain base)."""
    if not adapter_configs(model) and all(k is None for k in keys):
        yield
        return
    with adapter_rows(model, keys):
        yield


def _safe_emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:  # noqa: BLE001 - a closed event loop (client gone, server stopping) loses nothing
        log.debug("could not deliver an event for a finished request", exc_info=True)

