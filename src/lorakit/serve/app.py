"""The HTTP side: the shared `ServerState`, request -> `Plan` -> engine jobs -> JSON or server-sent
events (`Run`), the FastAPI routes, start-up (`create_state`, `load_serving_base`) and `run_server`.

FastAPI and uvicorn are optional (`pip install 'lorakit[serve]'`): imported where they are used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from lorakit.config import QuantConfig
from lorakit.errors import ConfigError
from lorakit.models import load_base
from lorakit.runtime.devices import pick_device, pick_dtype
from lorakit.serve.bank import AdapterBank
from lorakit.serve.engine import Engine, Event, Job
from lorakit.serve.openai import (
    MAX_CHOICES,
    Plan,
    ServeError,
    bad_request,
    chat_prompt,
    chunk_choice,
    completion_prompts,
    envelope,
    fit_max_tokens,
    flag_field,
    integer_field,
    response_choice,
    sampling_config,
    short_repr,
    sse_line,
    usage,
)
from lorakit.serve.settings import ServeSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'lorakit[serve]'"


# --------------------------------------------------------------------------- requests


def parse_request(body: dict, state: ServerState, kind: Literal["completion", "chat"]) -> Plan:
    """A request body -> a Plan, or a ServeError saying what is wrong with which field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"model is required: one of {[state.base_name, *state.bank.names()]}", "model")
    adapter = state.bank.lookup(model)
    config, asked = sampling_config(body, state.settings)
    n = integer_field(body, "n", 1, 1, MAX_CHOICES)
    if kind == "chat":
        prompts = [chat_prompt(body, state.tokenizer, None if adapter is None else adapter.chat_template)]
    else:
        prompts = completion_prompts(body, state.tokenizer, state.vocab)
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts × n={n} = {len(prompts) * n} choices; "
                          f"at most {MAX_CHOICES} per request", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, got {short_repr(options)}", "stream_options")
    plan = Plan(kind, model, adapter, prompts, config, n, stream=flag_field(body, "stream"),
                include_usage=flag_field(options, "include_usage"), ignore_eos=flag_field(body, "ignore_eos"))
    fit_max_tokens(plan, asked, state.settings, state.context)
    problems = config.problems("request")
    if problems:
        raise bad_request("; ".join(problems))
    return plan


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
        choices = [response_choice(self.plan, i, texts[i], finish[i]) for i in range(len(self.jobs))]
        return {**envelope(self.plan, self.rid, self.created, False), "choices": choices,
                "usage": usage(self.plan, tokens)}

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI streams them: chunks, an optional usage chunk, then [DONE]."""
        head, tokens, started = envelope(self.plan, self.rid, self.created, True), 0, set()
        try:
            async for event in self.events():
                if event.error:
                    yield sse_line({"error": ServeError(500, event.error, type="server_error").body()["error"]})
                    continue
                if event.index not in started and self.plan.kind == "chat":  # chat opens with the role
                    yield sse_line({**head, "choices": [chunk_choice(self.plan, event.index, "", None, role=True)]})
                started.add(event.index)
                tokens += event.completion_tokens
                if event.text or event.final:
                    choice = chunk_choice(self.plan, event.index, event.text, event.finish_reason)
                    yield sse_line({**head, "choices": [choice]})
            if self.plan.include_usage:
                yield sse_line({**head, "choices": [], "usage": usage(self.plan, tokens)})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()



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
    # Parsing a request (chat templates, tokenizing) runs here, off the event loop, one at a time: the
    # handlers' tokenizer is one object, and a fast tokenizer is not meant for concurrent calls.
    parser: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lorakit-parse"))

    def close(self) -> None:
        self.engine.shutdown()
        self.parser.shutdown(wait=False)


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
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
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
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    state = _state(request)
    _authorize(request, state)
    body = await _read_json(request, state.settings.max_body_bytes)
    plan = await asyncio.get_running_loop().run_in_executor(state.parser, parse_request, body, state, kind)
    run = Run(state, plan)
    if plan.stream:  # a closed stream stops the generator, whose `finally` cancels the jobs
        return StreamingResponse(run.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    body = await _response_unless_gone(request, run)
    return JSONResponse(body) if body is not None else Response(status_code=499)  # nginx's "client closed"


async def _response_unless_gone(request: Any, run: Run, poll_s: float = 0.25) -> dict[str, Any] | None:
    """The non-streaming response, or None when the client hung up first: its jobs are then cancelled, so
    the engine stops generating for nobody (a plain handler would run to max_tokens)."""
    task = asyncio.ensure_future(run.response())
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await request.is_disconnected():
            run.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


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
    problems = settings.problems()
    if problems:
        raise ConfigError(problems, "the serve settings")
    model, tokenizer = load_serving_base(settings)
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


def load_serving_base(settings: ServeSettings) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of `settings.base` on the chosen device and dtype; with `--quant nf4` quantized
    while loading (the full-precision model never exists)."""
    device = pick_device(settings.device)
    return load_base(settings.base, dtype=pick_dtype(settings.dtype, device), device=device,
                     quant=QuantConfig() if settings.quant == "nf4" else None)


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
    sock = listening_socket(settings.host, settings.port)  # bound before the model loads and before we say so
    state = create_state(settings)
    try:
        print(f"serving {settings.base!r} with adapters {state.bank.names()} at "
              f"http://{settings.host}:{settings.port}/v1", flush=True)
        _uvicorn_server(build_app(state), settings.host, settings.port, "info").run(sockets=[sock])
    finally:
        state.close()
        sock.close()
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a ConfigError naming the address and what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError([f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); another "
                           "process may hold the port: pick another --port, or stop that process"]) from None
    return sock


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

