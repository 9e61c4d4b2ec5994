"""An OpenAI-compatible server: one base model, many LoRA adapters, mixed in every forward.

    client ──HTTP──> handlers (asyncio, uvicorn) ──Job──> Engine thread ──events──> handlers ──> client
                         │ parse, validate, auth               │ RunningBatch + KV cache
                         └── AdapterBank (load/unload) ────────┘ adapter_rows(model, per-row adapters)

The request's `model` picks the base or an adapter. Every adapter is loaded into the *one* model under
its own key, and `lorakit.lora.adapter_rows` gives each row of a batch its own adapter (or none), so
requests for different adapters share each forward -- no swapping, no merging, any mix of ranks and
targets, over a full-precision or NF4 base:

    y[b] = base(x[b]) + s_a · x[b] A_aᵀ B_aᵀ      a = the adapter of row b (no term for base rows)

The Engine runs continuous batching: between two decode steps, finished rows leave the batch and
waiting requests join it (prefilled on their own, then stacked onto the shared KV cache, see
`lorakit.generate.RunningBatch`). Tokens are chosen with the same functions as `lorakit.generate`, so
a greedy answer from the server equals `generate` on the same model and adapter.

Hot load and unload (vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) never disturb running
requests: each load gets a fresh key in the model, an unload only hides the name, and the weights are
deleted when the last request using them finishes. Model changes and forwards take turns on one lock.

Safety: adapter paths loaded at runtime must lie inside `--adapter-root` (after resolving `..` and
symlinks, for the directory and each file in it); an optional API key; limits on body size, prompt
length and max tokens, answered in OpenAI's error shape; an exception in one request fails only the
requests of that forward, never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.config import ConfigError, _help
from lorakit.generate import (
    GenerationConfig,
    RunningBatch,
    _cut_at_stop,
    encode_prompts,
    next_tokens_per_row,
    render_chat_prompt,
    stop_token_ids,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'lorakit[serve]'"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_CHOICES = 64  # prompts × n in one request
MAX_STOP_STRINGS = 16


# --------------------------------------------------------------------------- settings


@dataclass
class ServeSettings:
    """Everything `lorakit serve` takes; `problems()` reports every bad value before a weight loads."""

    base: str = _help("Base model: hub id, local directory, or 'demo'. It is also the base's model name.")
    quant: Literal["none", "nf4"] = _help("Store the base in 4-bit NF4 (QLoRA) to save memory.", default="none")
    adapters: dict[str, str] = _help("Adapters loaded at start, name -> directory (trusted: no root check).",
                                     default_factory=dict)
    adapter_roots: list[str] = _help("Directories that runtime loads may read from; none = runtime loads off.",
                                     default_factory=list)
    host: str = _help("Interface to listen on; 127.0.0.1 keeps the server local.", default="127.0.0.1")
    port: int = _help("TCP port (0 = any free port).", default=8000)
    api_key: str | None = _help("When set, /v1/* needs `Authorization: Bearer KEY` (401 without it).", default=None)
    max_batch: int = _help("Most sequences decoded together in one forward.", default=16)
    max_tokens: int = _help("Largest max_tokens a request may ask for.", default=1024)
    max_prompt_tokens: int = _help("Longest prompt accepted, in tokens.", default=4096)
    max_body_bytes: int = _help("Largest request body accepted (413 above).", default=1_000_000)
    max_waiting: int = _help("Most sequences queued behind the running batch (503 above).", default=1024)
    device: str = _help("auto, cpu, cuda, cuda:1, mps.", default="auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Compute dtype; auto = bf16 on CUDA, fp32 on CPU unless bf16 is fast there.", default="auto")

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.base, str) or not self.base:
            out.append("serve.base must name a model (hub id, directory or 'demo'), got nothing")
        if self.quant not in ("none", "nf4"):
            out.append(f"serve.quant must be one of none, nf4; got {self.quant!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"serve.dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        for key, low in (("max_batch", 1), ("max_tokens", 1), ("max_prompt_tokens", 1), ("max_body_bytes", 1024),
                         ("max_waiting", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                out.append(f"serve.{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            out.append(f"serve.port must be in 0..65535, got {self.port!r}")
        if self.api_key is not None and not self.api_key.strip():
            out.append("serve.api_key is empty; give a real key or leave it unset")
        out += [f"serve.adapter_roots: {root!r} is not a directory; create it or fix the path"
                for root in self.adapter_roots if not Path(root).is_dir()]
        out += [f"serve.adapters: name {name!r} is not allowed; use letters, digits and . _ : / - (max 128)"
                for name in self.adapters if not ADAPTER_NAME.fullmatch(name)]
        out += [f"serve.adapters: adapter {name!r} has the base model's name; pick another name"
                for name in self.adapters if name == self.base]
        return out


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=DIR` (or a bare `DIR`, named after its last folder) -> {name: dir}; repeated names refused."""
    out: dict[str, str] = {}
    problems = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            problems.append(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter support=runs/support/adapter")
        elif name in out:
            problems.append(f"--adapter {spec!r}: the name {name!r} is already used by {out[name]!r}")
        else:
            out[name] = path
    if problems:
        raise ConfigError(problems)
    return out


# --------------------------------------------------------------------------- errors


class ServeError(Exception):
    """A request the server refuses; `body()` is OpenAI's error shape, which every client parses."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param=param)


# --------------------------------------------------------------------------- adapter paths


def confine_path(raw: Any, roots: Sequence[Path]) -> Path:
    """The adapter directory `raw` names, resolved, if it lies inside one of `roots`; else ServeError.

    A relative path is looked up under each root in turn. `..` is refused outright (it has no use here
    but escaping); symlinks are followed and the *target* must still be inside a root -- for the
    directory and for every file the loader reads from it.
    NOTE: a file swapped for a symlink between this check and the load is not caught; the roots should
    be writable only by whoever may choose what the server loads.
    """
    if not roots:
        raise _bad("loading adapters at runtime is off: start the server with --adapter-root DIR "
                   "and put adapters inside DIR", "lora_path")
    if not isinstance(raw, str) or not raw:
        raise _bad(f"lora_path must be a non-empty string, got {raw!r}", "lora_path")
    path = Path(raw)
    if ".." in path.parts:
        raise _bad(f"lora_path {raw!r} contains '..'; give a path inside the adapter roots "
                   f"{[str(r) for r in roots]}", "lora_path")
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        root = next((r for r in roots if resolved.is_relative_to(r)), None)
        if root is None:
            raise _bad(f"lora_path {raw!r} resolves to {resolved}, outside the adapter roots "
                       f"{[str(r) for r in roots]} (symlinks are followed); copy the adapter into a root", "lora_path")
        if resolved.is_dir():
            _check_files_inside(resolved, root, raw)
            return resolved
    raise ServeError(404, f"lora_path {raw!r}: no such adapter directory under the adapter roots "
                          f"{[str(r) for r in roots]}", param="lora_path", code="adapter_not_found")


def _check_files_inside(directory: Path, root: Path, raw: str) -> None:
    from lorakit.adapters import CONFIG_FILE, META_FILE, TEMPLATE_FILE, WEIGHTS_FILE

    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE, TEMPLATE_FILE):
        target = (directory / name).resolve()
        if (directory / name).exists() and not target.is_relative_to(root):
            raise _bad(f"lora_path {raw!r}: {name} is a symlink to {target}, outside the adapter root {root}; "
                       "copy the file instead of linking it", "lora_path")


# --------------------------------------------------------------------------- the adapter bank


@dataclass(eq=False)
class Adapter:
    """A loaded adapter: `name` is what requests put in `model`; `key` is its name inside the model,
    fresh for every load, so a name can be reloaded while requests on the old weights finish."""

    name: str
    key: str
    path: Path
    rank: int
    chat_template: str | None
    created: int
    refs: int = 0
    retired: bool = False


class AdapterBank:
    """Which adapters the model holds, which names requests may use, and when weights can go.

    `acquire` counts a request in, `release` out; `unload` hides a name at once and deletes the weights
    when the count reaches zero. Every change to the model happens under `model_lock`, which the engine
    holds for each forward.
    """

    def __init__(self, model: nn.Module, model_lock: threading.Lock, base_name: str, roots: Sequence[str] = ()):
        self.model, self.model_lock, self.base_name = model, model_lock, base_name
        self.roots = [Path(r).resolve() for r in roots]
        self.adapters: dict[str, Adapter] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._counter = 0

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.adapters)

    def lookup(self, model_name: Any) -> Adapter | None:
        """The adapter a request's `model` names (None = the base); 404 listing the choices otherwise."""
        if model_name == self.base_name:
            return None
        with self._lock:
            adapter = self.adapters.get(model_name) if isinstance(model_name, str) else None
        if adapter is None:
            raise ServeError(404, f"The model {model_name!r} does not exist; available models: "
                                  f"{[self.base_name, *self.names()]}", param="model", code="model_not_found")
        return adapter

    def acquire(self, model_name: str, count: int = 1) -> Adapter | None:
        """`lookup` and count `count` requests in, atomically (an unload cannot slip in between)."""
        if model_name == self.base_name:
            return None
        with self._lock:
            adapter = self.adapters.get(model_name)
            if adapter is not None:
                adapter.refs += count
                return adapter
        return self.lookup(model_name)  # raises the 404

    def release(self, adapter: Adapter | None) -> None:
        if adapter is None:
            return
        with self._lock:
            adapter.refs -= 1
            gone = adapter.retired and adapter.refs == 0
        if gone:  # outside the bank lock: deleting waits for the running forward, the event loop must not
            self._delete(adapter)

    def load(self, name: Any, path: Any, trusted: bool = False) -> Adapter:
        """Load an adapter directory under `name`. `trusted` (start-up flags) skips the root check."""
        key = self._reserve(name)
        try:
            directory = Path(path).resolve() if trusted else confine_path(path, self.roots)
            adapter = self._load(name, directory, key)
        except BaseException:
            with self._lock:
                self._pending.discard(name)
            raise
        with self._lock:
            self._pending.discard(name)
            self.adapters[name] = adapter
        log.info("loaded adapter %r (rank %d) from %s", name, adapter.rank, adapter.path)
        return adapter

    def unload(self, name: Any) -> None:
        with self._lock:
            adapter = self.adapters.pop(name, None) if isinstance(name, str) else None
            if adapter is None:
                raise ServeError(404, f"no adapter named {name!r} is loaded; loaded adapters: {sorted(self.adapters)}",
                                 param="lora_name", code="adapter_not_found")
            adapter.retired = True
            gone = adapter.refs == 0
        if gone:  # else the last request using it deletes it (`release`); no new request can find it
            self._delete(adapter)
        log.info("unloaded adapter %r", name)

    def entries(self) -> list[Adapter]:
        with self._lock:
            return sorted(self.adapters.values(), key=lambda a: a.name)

    def _reserve(self, name: Any) -> str:
        """Claim `name` for a load in progress and return a fresh key for the model."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise _bad(f"lora_name {name!r} is not allowed; use letters, digits and . _ : / - (max 128)", "lora_name")
        with self._lock:
            if name == self.base_name or name in self.adapters or name in self._pending:
                raise _bad(f"an adapter named {name!r} is already loaded (or is the base model); "
                           "unload it first or pick another name", "lora_name")
            self._pending.add(name)
            self._counter += 1
            return f"serve{self._counter}"  # ModuleDict keys cannot hold dots: never the user's name

    def _load(self, name: str, directory: Path, key: str) -> Adapter:
        from lorakit.adapters import TEMPLATE_FILE, AdapterError, load_lora_adapter, read_adapter_config
        from lorakit.lora import adapter_configs, delete_adapter

        try:
            config = read_adapter_config(directory)
            _refuse_full_modules(directory)
            with self.model_lock:
                try:
                    load_lora_adapter(self.model, directory, adapter_name=key)
                    self.model.eval()  # new LoRA modules start in train mode: their dropout would be live
                except Exception:
                    if key in adapter_configs(self.model):
                        delete_adapter(self.model, key)
                    raise
        except (AdapterError, ValueError) as e:  # AdapterError is a ValueError; so are LoraConfig problems
            raise ServeError(400, f"adapter {name!r} was not loaded: {e}", param="lora_path",
                             code="adapter_incompatible") from None
        template = directory / TEMPLATE_FILE
        return Adapter(name, key, directory, int(config.get("r", 0)),
                       template.read_text(encoding="utf-8") if template.is_file() else None, int(time.time()))

    def _delete(self, adapter: Adapter) -> None:
        from lorakit.lora import delete_adapter

        with self.model_lock:
            delete_adapter(self.model, adapter.key)


def _refuse_full_modules(directory: Path) -> None:
    """Adapters that retrain whole modules (a head, embeddings) would overwrite the shared base."""
    from safetensors import safe_open

    from lorakit.adapters import WEIGHTS_FILE, AdapterError

    path = directory / WEIGHTS_FILE
    if not path.is_file():
        return  # load_lora_adapter explains what is missing
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - a corrupt file: load_lora_adapter reports it with the fix
        return
    full = sorted({k.removeprefix("base_model.model.").rsplit(".", 1)[0] for k in keys if "lora_" not in k})
    if full:
        raise AdapterError(f"{path} trains whole modules {full[:5]} (modules_to_save); they would replace the "
                           "shared base for every request. Serve it merged instead: lorakit merge --base ... "
                           "--adapter ... --out DIR, then lorakit serve --base DIR")


# --------------------------------------------------------------------------- the engine


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
        # its own tokenizer: handlers encode on the event loop while this thread decodes, and a fast
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
    from lorakit.lora import adapter_configs, adapter_rows

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


# --------------------------------------------------------------------------- requests


@dataclass
class Plan:
    """A validated request: which adapter, which prompts (token ids), and how to sample."""

    kind: Literal["completion", "chat"]
    model: str
    adapter: Adapter | None
    prompts: list[list[int]]
    config: GenerationConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


# Fields OpenAI defines that this server does not implement, with the value that means "off".
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "logit_bias": (None, {}), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"})}


def _number(body: dict, key: str, default: float, low: float, high: float | None = None,
            low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise _bad(f"{key} must be a number in {span}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise _bad(f"{key} must be an integer in [{low}, {high if high is not None else '∞'}], got {value!r}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {value!r}", key)
    return bool(value)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, got {body.get('stop')!r}",
                   "stop")
    return stop


def _refuse_unsupported(body: dict) -> None:
    for key, off in UNSUPPORTED.items():
        if key in body and body[key] not in off:
            raise _bad(f"{key}={body[key]!r} is not supported by this server; leave it out", key)


def sampling_config(body: dict, settings: ServeSettings) -> tuple[GenerationConfig, int | None]:
    """GenerationConfig from OpenAI's fields (plus vLLM's top_k and repetition_penalty), and the
    max_tokens asked for (None = not given, filled in once the prompt length is known)."""
    _refuse_unsupported(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, None, 1)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise _bad(f"{key}={max_tokens} is above this server's limit of {settings.max_tokens}; ask for fewer "
                   "tokens (or start the server with a higher --max-tokens)", key)
    top_k = _integer(body, "top_k", 0, -1)
    config = GenerationConfig(
        max_new_tokens=max_tokens or 1,
        temperature=_number(body, "temperature", 1.0, 0.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # vLLM spells "off" as -1
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        stop=_stop_strings(body),
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
    )
    return config, max_tokens


def completion_prompts(body: dict, tokenizer: Any, vocab: int) -> list[list[int]]:
    """`prompt` as OpenAI allows it: a string, a list of strings, a token list, or a list of token lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise _bad(f"prompt must be a string, a list of strings, or token ids; got {_short(prompt)}", "prompt")
    if any(isinstance(p, list) for p in prompts) and not all(isinstance(p, list) for p in prompts):
        raise _bad("prompt mixes strings and token lists; send one kind", "prompt")
    if all(isinstance(p, list) for p in prompts):
        for p in prompts:
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                raise _bad(f"token-id prompts must be non-empty lists of ids in [0, {vocab}); got {_short(p)}", "prompt")
        return [list(p) for p in prompts]
    rows = encode_prompts(tokenizer, prompts)
    if not all(rows):
        raise _bad("a prompt encodes to no tokens (an empty string?); give at least one word", "prompt")
    return rows


def chat_prompt(body: dict, tokenizer: Any, adapter: Adapter | None) -> list[int]:
    """The conversation rendered with the adapter's saved chat template, else the tokenizer's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(f"messages must be a non-empty list of {{role, content}} objects; got {_short(messages)}", "messages")
    plain = [_plain_message(m, i) for i, m in enumerate(messages)]
    template = adapter.chat_template if adapter is not None else None
    try:
        text = render_chat_prompt(tokenizer, plain, template)
    except ValueError as e:
        raise _bad(str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 - jinja's raise_exception() in a template ("roles must alternate")
        raise _bad(f"the chat template refused these messages: {e}", "messages") from None
    return encode_prompts(tokenizer, [text])[0]


def _plain_message(message: Any, i: int) -> dict[str, str]:
    """{role, content: str}; content parts of type text are joined, anything else refused."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _bad(f"messages[{i}] must be an object with a string role; got {_short(message)}", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported", "messages")
        content = "".join(p["text"] for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts; got {_short(content)}", "messages")
    return {"role": message["role"], "content": content}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fit_max_tokens(plan: Plan, asked: int | None, settings: ServeSettings, context: int | None) -> None:
    """Check each prompt's length; fill in max_tokens when not given (the rest of the context, capped)."""
    longest = max(len(p) for p in plan.prompts)
    if longest > settings.max_prompt_tokens:
        raise _bad(f"the prompt has {longest} tokens; this server accepts at most {settings.max_prompt_tokens} "
                   "(--max-prompt-tokens); shorten it", "messages" if plan.kind == "chat" else "prompt")
    default = DEFAULT_COMPLETION_TOKENS if plan.kind == "completion" else settings.max_tokens
    wanted = asked if asked is not None else default
    if context is not None and longest + wanted > context:
        if asked is not None or longest >= context:
            raise _bad(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{longest + wanted} tokens ({longest} in the prompt, {wanted} for the completion). "
                       "Please reduce the length of the prompt or of max_tokens.", "max_tokens")
        wanted = context - longest
    plan.config.max_new_tokens = min(wanted, settings.max_tokens)


def parse_request(body: dict, state: ServerState, kind: Literal["completion", "chat"]) -> Plan:
    """A request body -> a Plan, or a ServeError saying what is wrong with which field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(f"model is required: one of {[state.base_name, *state.bank.names()]}", "model")
    adapter = state.bank.lookup(model)
    config, asked = sampling_config(body, state.settings)
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    if kind == "chat":
        prompts = [chat_prompt(body, state.tokenizer, adapter)]
    else:
        prompts = completion_prompts(body, state.tokenizer, state.vocab)
    if len(prompts) * n > MAX_CHOICES:
        raise _bad(f"{len(prompts)} prompts × n={n} = {len(prompts) * n} choices; at most {MAX_CHOICES} per request", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad(f"stream_options must be an object, got {_short(options)}", "stream_options")
    plan = Plan(kind, model, adapter, prompts, config, n, stream=_flag(body, "stream"),
                include_usage=_flag(options, "include_usage"), ignore_eos=_flag(body, "ignore_eos"))
    fit_max_tokens(plan, asked, state.settings, state.context)
    problems = config.problems("request")
    if problems:
        raise _bad("; ".join(problems))
    return plan


# --------------------------------------------------------------------------- responses


def _choice(plan: Plan, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if plan.kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _chunk_choice(plan: Plan, index: int, text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
    if plan.kind == "chat":
        delta = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _usage(plan: Plan, completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(p) for p in plan.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _envelope(plan: Plan, rid: str, created: int, chunk: bool) -> dict[str, Any]:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[plan.kind]
    return {"id": rid, "object": obj + (".chunk" if chunk and plan.kind == "chat" else ""), "created": created,
            "model": plan.model}


class Run:
    """A plan's jobs in the engine and the events coming back, on the handler's event loop."""

    def __init__(self, state: ServerState, plan: Plan):
        self.plan, self.queue = plan, asyncio.Queue()
        self.rid = f"{'chatcmpl' if plan.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        adapter = state.bank.acquire(plan.model, len(plan.prompts) * plan.n)  # 404 if unloaded meanwhile
        seed = plan.config.seed
        self.jobs = [Job(prompt, adapter, plan.config, emit, index=i * plan.n + k, ignore_eos=plan.ignore_eos,
                         seed=None if seed is None else (seed + i * plan.n + k) % 2**63)
                     for i, prompt in enumerate(plan.prompts) for k in range(plan.n)]
        try:
            state.engine.submit(self.jobs)
        except ServeError:
            for _ in self.jobs:
                state.bank.release(adapter)
            raise

    async def events(self) -> AsyncIterator[Event]:
        remaining = len(self.jobs)
        while remaining:
            event = await self.queue.get()
            remaining -= event.final
            yield event

    def cancel(self) -> None:
        """Called when the client is gone or the handler ends: the engine drops unfinished jobs."""
        for job in self.jobs:
            job.cancelled = True

    async def response(self) -> dict[str, Any]:
        texts, finish, tokens = [""] * len(self.jobs), [None] * len(self.jobs), 0
        try:
            async for event in self.events():
                if event.error:
                    raise ServeError(500, event.error, type="server_error")
                texts[event.index] += event.text
                if event.final:
                    finish[event.index], tokens = event.finish_reason, tokens + event.completion_tokens
        finally:
            self.cancel()
        choices = [_choice(self.plan, i, texts[i], finish[i]) for i in range(len(self.jobs))]
        return {**_envelope(self.plan, self.rid, self.created, False), "choices": choices,
                "usage": _usage(self.plan, tokens)}

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI streams them: chunks, an optional usage chunk, then [DONE]."""
        head, tokens, started = _envelope(self.plan, self.rid, self.created, True), 0, set()
        try:
            async for event in self.events():
                if event.error:
                    yield _sse({"error": ServeError(500, event.error, type="server_error").body()["error"]})
                    continue
                if event.index not in started and self.plan.kind == "chat":  # chat opens with the role
                    yield _sse({**head, "choices": [_chunk_choice(self.plan, event.index, "", None, role=True)]})
                started.add(event.index)
                tokens += event.completion_tokens
                if event.text or event.final:
                    choice = _chunk_choice(self.plan, event.index, event.text, event.finish_reason)
                    yield _sse({**head, "choices": [choice]})
            if self.plan.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(self.plan, tokens)})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------- HTTP


@dataclass
class ServerState:
    """Everything the handlers share."""

    settings: ServeSettings
    model: nn.Module
    tokenizer: Any
    bank: AdapterBank
    engine: Engine
    base_name: str
    context: int | None
    vocab: int
    created: int = field(default_factory=lambda: int(time.time()))

    def close(self) -> None:
        self.engine.shutdown()


def _state(request: Any) -> ServerState:
    return request.app.state.lorakit


def _authorize(request: Any, state: ServerState) -> None:
    key = state.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ServeError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                              "(the key the server was started with, --api-key)", code="invalid_api_key")


async def _read_json(request: Any, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read at most `limit` bytes far (413 beyond, even without Content-Length)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the request body is {int(declared)} bytes; this server accepts at most {limit} "
                              "(--max-body-bytes)", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServeError(413, f"the request body is over {limit} bytes, this server's limit (--max-body-bytes)",
                             code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


async def health(request: Any) -> Any:
    from fastapi.responses import JSONResponse

    state = _state(request)
    return JSONResponse({"status": "ok", "model": state.base_name, "adapters": state.bank.names(),
                         **state.engine.load(), "stats": vars(state.engine.stats)})


async def list_models(request: Any) -> Any:
    from fastapi.responses import JSONResponse

    state = _state(request)
    _authorize(request, state)
    base = {"id": state.base_name, "object": "model", "created": state.created, "owned_by": "lorakit",
            "root": state.base_name, "parent": None, "max_model_len": state.context}
    rows = [{"id": a.name, "object": "model", "created": a.created, "owned_by": "lorakit", "root": str(a.path),
             "parent": state.base_name, "max_model_len": state.context, "lora_rank": a.rank}
            for a in state.bank.entries()]
    return JSONResponse({"object": "list", "data": [base, *rows]})


async def _generate(request: Any, kind: Literal["completion", "chat"]) -> Any:
    from fastapi.responses import JSONResponse, StreamingResponse

    state = _state(request)
    _authorize(request, state)
    plan = parse_request(await _read_json(request, state.settings.max_body_bytes), state, kind)
    run = Run(state, plan)
    if plan.stream:
        return StreamingResponse(run.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await run.response())


async def completions(request: Any) -> Any:
    return await _generate(request, "completion")


async def chat_completions(request: Any) -> Any:
    return await _generate(request, "chat")


async def load_adapter(request: Any) -> Any:
    from fastapi.responses import PlainTextResponse

    state = _state(request)
    _authorize(request, state)
    body = await _read_json(request, state.settings.max_body_bytes)
    name = body.get("lora_name")
    await asyncio.to_thread(state.bank.load, name, body.get("lora_path"))  # waits for a forward to end
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_adapter(request: Any) -> Any:
    from fastapi.responses import PlainTextResponse

    state = _state(request)
    _authorize(request, state)
    body = await _read_json(request, state.settings.max_body_bytes)
    name = body.get("lora_name")
    await asyncio.to_thread(state.bank.unload, name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


ROUTES = [("/health", health, ["GET"]), ("/v1/models", list_models, ["GET"]),
          ("/v1/completions", completions, ["POST"]), ("/v1/chat/completions", chat_completions, ["POST"]),
          ("/v1/load_lora_adapter", load_adapter, ["POST"]), ("/v1/unload_lora_adapter", unload_adapter, ["POST"])]


def build_app(state: ServerState) -> Any:
    """The FastAPI app over a ready ServerState; every error leaves in OpenAI's shape."""
    try:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e

    app = FastAPI(title="lorakit", description="OpenAI-compatible multi-adapter server", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.lorakit = state
    for path, endpoint, methods in ROUTES:
        app.add_route(path, endpoint, methods=methods)

    async def serve_error(_request: Any, exc: ServeError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(_request: Any, exc: HTTPException) -> Any:
        error = ServeError(exc.status_code, f"{exc.detail}; routes: {[r[0] for r in ROUTES]}", code="not_found")
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def internal_error(_request: Any, exc: Exception) -> Any:
        log.exception("unhandled error in a request", exc_info=exc)
        error = ServeError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    return app


# --------------------------------------------------------------------------- start and stop


def create_state(settings: ServeSettings) -> ServerState:
    """Validate the settings, load the base (NF4 if asked) and the start-up adapters, start the engine."""
    from lorakit.config import QuantConfig
    from lorakit.models import load_model, load_tokenizer
    from lorakit.quant import quantize_model
    from lorakit.runtime.devices import pick_device, pick_dtype

    problems = settings.problems()
    if problems:
        raise ConfigError(problems, "the serve settings")
    device = pick_device(settings.device)
    tokenizer = load_tokenizer(settings.base)
    model = load_model(settings.base, "causal_lm", pick_dtype(settings.dtype, device), device)
    if settings.quant == "nf4":
        quantize_model(model, QuantConfig(), progress=False)
    lock = threading.Lock()
    bank = AdapterBank(model, lock, settings.base, settings.adapter_roots)
    engine = Engine(model, tokenizer, lock, bank.release, settings.max_batch, settings.max_waiting)
    for name, path in settings.adapters.items():
        try:
            bank.load(name, path, trusted=True)
        except ServeError as e:
            raise ConfigError([f"--adapter {name}={path}: {e.message}"]) from None
    engine.start()
    context = getattr(model.config, "max_position_embeddings", None)
    return ServerState(settings, model, tokenizer, bank, engine, settings.base, context,
                       model.get_input_embeddings().num_embeddings)


def _uvicorn_server(app: Any, host: str, port: int, log_level: str) -> Any:
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                         timeout_graceful_shutdown=5))


def run_server(settings: ServeSettings) -> int:
    """`lorakit serve`: serve until Ctrl-C."""
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who reaches this port can use the model and "
                    "load adapters from the adapter roots", settings.host)
    state = create_state(settings)
    try:
        print(f"serving {settings.base!r} with adapters {state.bank.names()} at "
              f"http://{settings.host}:{settings.port}/v1", flush=True)
        _uvicorn_server(build_app(state), settings.host, settings.port, "info").run()
    finally:
        state.close()
    return 0


class BackgroundServer:
    """The app on a free loopback port in a thread (tests, benchmarks): `with BackgroundServer(app) as s:`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = _uvicorn_server(app, host, 0, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
