"""The dashboard's HTTP side: pages, the JSON API the pages' scripts call, and `run_ui`.

    GET  /  /run?id=  /new  /chat?id=            pages (static HTML; the scripts fill them from the API)
    GET  /static/NAME                            the pages' own CSS and JavaScript (no CDN, no build step)
    GET  /api/runs                               the runs table
    GET  /api/metrics?id=&offset=&ino=           metrics.jsonl lines after byte `offset` (live curves)
    GET  /api/run?id=                            one run: config, summary, eval, checkpoints, log, export
    GET  /api/run/advice?id=                     the advisor's predicted peak memory vs the measured one
    POST /api/run/stop|resume|export             {"id", ...}
    GET  /api/form   POST /api/form/preview|start   the new-run form
    POST /api/chat/prepare                       {"id"}: base + adapter on a chat server
    *    /serve/<slot>/v1/...                    that server's OpenAI API (lorakit.serve), streamed

Every endpoint that reads files or loads models is a plain `def`: FastAPI runs it in a worker thread, so
the event loop (and every other page) never waits on it. FastAPI and uvicorn come with `lorakit[ui]`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.advise import advise, fmt_bytes
from lorakit.config import RunConfig, load_run_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.eval.metrics import LOWER_IS_BETTER
from lorakit.ui.chat import ChatHub
from lorakit.ui.forms import NewRunForm
from lorakit.ui.jobs import Exporter, Trainer
from lorakit.ui.runs import (
    RunsRoot,
    UIError,
    checkpoints,
    current_summary,
    eval_report,
    log_tail,
    read_metrics,
    run_row,
)
from lorakit.ui.security import Gate, check_binding

log = logging.getLogger(__name__)

INSTALL_HINT = "the dashboard needs FastAPI and uvicorn: pip install 'lorakit[ui]'"
STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}
PAGES = {"/": "runs.html", "/run": "run.html", "/new": "new.html", "/chat": "chat.html"}


@dataclass
class UIState:
    """Everything the routes share."""

    root: RunsRoot
    trainer: Trainer
    exporter: Exporter
    form: NewRunForm
    hub: ChatHub
    resolve_base: Callable[[str], str]
    advice: dict[tuple[Path, float, Any], dict[str, Any]] = field(default_factory=dict)

    def row(self, run_dir: Path) -> dict[str, Any]:
        return run_row(self.root, run_dir, self.trainer.child_state(run_dir), self.trainer.started(run_dir))


def make_state(runs: str | Path, preset: RunConfig | None = None, resolve_base: Callable[[str], str] | None = None,
               device: str = "auto", python: str | None = None) -> UIState:
    """`resolve_base` turns a config's base_model into something loadable ('demo' -> its directory); the
    CLI passes lorakit.demo's, since the demo is an application this package does not know about."""
    root = RunsRoot(runs)
    resolve = resolve_base or (lambda name: name)
    trainer = Trainer(python) if python else Trainer()
    return UIState(root, trainer, Exporter(resolve), NewRunForm(root, preset or RunConfig(), resolve),
                   ChatHub(root, resolve, device), resolve)


# --------------------------------------------------------------------------- the API, one function per route


def api_runs(s: UIState) -> dict[str, Any]:
    rows = [s.row(d) for d in s.root.discover()]
    rows.sort(key=lambda r: (r["status"] != "running", -(_stamp(r["modified"]))))
    return {"root": str(s.root.root), "runs": rows}


def _stamp(iso: str | None) -> float:
    return dt.datetime.fromisoformat(iso).timestamp() if iso else 0.0


def api_metrics(s: UIState, run_id: str, offset: int, ino: int) -> dict[str, Any]:
    run_dir = s.root.resolve(run_id)
    chunk = read_metrics(run_dir, offset, ino)
    return {"id": run_id, "rows": chunk.rows, "offset": chunk.offset, "ino": chunk.ino, "reset": chunk.reset,
            "status": s.row(run_dir)["status"]}


def api_run(s: UIState, run_id: str) -> dict[str, Any]:
    run_dir = s.root.resolve(run_id)
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else None
    job = s.exporter.jobs.get(run_dir)
    return {"run": s.row(run_dir), "config_yaml": config_text, "summary": current_summary(run_dir),
            "eval": eval_report(run_dir), "lower_is_better": sorted(LOWER_IS_BETTER), "checkpoints": checkpoints(run_dir), "log": log_tail(run_dir),
            "export": job.to_json() if job else None,
            "files": sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if not p.name.startswith("."))}


def api_advice(s: UIState, run_id: str) -> dict[str, Any]:
    """Predicted (advisor, from config.json) vs measured (summary.json) peak memory, cached per config and
    summary: a run that ends or stops writes its summary without touching its config."""
    run_dir = s.root.resolve(run_id)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UIError(f"{run_id} has no config.yaml", 404)
    summary = current_summary(run_dir)
    key = (run_dir, path.stat().st_mtime, (summary or {}).get("peak_memory_bytes"))
    if key not in s.advice:
        s.advice[key] = _advice(s, path, summary or {})
    return s.advice[key]


def _advice(s: UIState, path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    measured = summary.get("peak_memory_bytes")
    out: dict[str, Any] = {"measured_bytes": measured, "measured": fmt_bytes(measured) if measured else None,
                           "device": summary.get("device")}
    try:
        config = load_run_config(path)
        config.base_model = s.resolve_base(config.base_model)
        device = str(summary.get("device") or "").split(":")[0] or None
        advice = advise(config, device=device if device in ("cpu", "cuda") else None, calibrate_now=False)
    except (LorakitError, OSError, ValueError) as e:
        return {**out, "error": f"the advisor cannot predict this run: {e}"}
    peak = advice.peak_memory_bytes
    out.update(predicted_bytes=peak, predicted=fmt_bytes(peak), peak_phase=advice.memory.peak_phase,
               terms={t.name: fmt_bytes(t.bytes) for t in advice.memory.terms if t.bytes})
    if measured:
        out["error_share"] = round((peak - measured) / measured, 3)
    return out


def _id(body: Any) -> str:
    if not isinstance(body, dict):
        raise UIError("the request body must be a JSON object like {\"id\": \"RUN\"}")
    return str(body.get("id") or "")


def api_stop(s: UIState, run_id: str) -> dict[str, Any]:
    run_dir = s.root.resolve(run_id)
    pid = s.trainer.stop(run_dir)
    return {"id": run_id, "pid": pid, "message": "SIGINT sent: the run saves a checkpoint and stops"}


def api_resume(s: UIState, run_id: str) -> dict[str, Any]:
    run_dir = s.root.resolve(run_id)
    if not (run_dir / "config.yaml").is_file():
        raise UIError(f"{run_id} has no config.yaml to resume from", 409)
    if not any((run_dir / "checkpoints").glob("step-*")):
        raise UIError(f"{run_id} has no checkpoint yet; start a new run instead", 409)
    s.trainer.start(run_dir, resume=True)
    return {"id": run_id, "status": "running"}


def api_start(s: UIState, body: dict[str, Any]) -> dict[str, Any]:
    name = str(body.get("name") or "")
    run_dir = s.form.create(name, body.get("fields") or {}, str(body.get("extra") or ""))
    s.trainer.start(run_dir)
    return {"id": s.root.run_id(run_dir), "status": "running"}


def api_export(s: UIState, body: dict[str, Any]) -> dict[str, Any]:
    run_dir = s.root.resolve(_id(body))
    job = s.exporter.start(run_dir, body.get("kind", "merge"), str(body.get("dtype") or "f16"))
    return job.to_json()


# --------------------------------------------------------------------------- the app


def build_ui_app(s: UIState) -> Any:
    """The FastAPI app (without the gate: `gated_app` adds it)."""
    try:
        from fastapi import FastAPI
        from fastapi.responses import FileResponse, JSONResponse, Response
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e

    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = s
    for error, status in ((UIError, None), (ConfigError, 400), (LorakitError, 400)):
        app.add_exception_handler(error, _error_handler(JSONResponse, status))
    for route, page in PAGES.items():
        app.add_api_route(route, _page(page, FileResponse), methods=["GET"], include_in_schema=False)

    @app.get("/static/{name}")
    def static(name: str) -> Any:
        path = STATIC / name
        if not re.fullmatch(r"[a-z][a-z0-9_-]*\.(js|css|svg|png)", name) or not path.is_file():
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return Response(path.read_bytes(), media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})

    _add_api(app, s)
    return app


def _error_handler(json_response: Any, status: int | None) -> Callable[[Any, Exception], Any]:
    """A user's mistake as {"error", "problems"?} with its status (UIError carries its own)."""
    async def handler(_request: Any, exc: Exception) -> Any:
        body = {"error": str(exc), **({"problems": exc.problems} if isinstance(exc, ConfigError) else {})}
        return json_response(body, status_code=status or getattr(exc, "status", 400))

    return handler


def _add_api(app: Any, s: UIState) -> None:
    @app.get("/api/runs")
    def runs() -> Any:
        return api_runs(s)

    @app.get("/api/metrics")
    def metrics(id: str, offset: int = 0, ino: int = 0) -> Any:  # noqa: A002 - the query's name
        return api_metrics(s, id, offset, ino)

    @app.get("/api/run")
    def run(id: str) -> Any:  # noqa: A002
        return api_run(s, id)

    @app.get("/api/run/advice")
    def advice(id: str) -> Any:  # noqa: A002
        return api_advice(s, id)

    @app.post("/api/run/{action}")
    def run_action(action: str, body: dict) -> Any:
        actions = {"stop": lambda: api_stop(s, _id(body)), "resume": lambda: api_resume(s, _id(body)),
                   "export": lambda: api_export(s, body)}
        if action not in actions:
            raise UIError(f"no action {action!r}; one of {', '.join(actions)}", 404)
        return actions[action]()

    @app.get("/api/form")
    def form() -> Any:
        return s.form.defaults()

    @app.post("/api/form/preview")
    def preview(body: dict) -> Any:
        return s.form.preview(str(body.get("name") or ""), body.get("fields") or {}, str(body.get("extra") or ""),
                              bool(body.get("advice", True)))

    @app.post("/api/form/start")
    def start(body: dict) -> Any:
        return api_start(s, body)

    @app.post("/api/chat/prepare")
    def chat_prepare(body: dict) -> Any:
        return s.hub.prepare(s.root.resolve(_id(body)))


def _page(name: str, response: Any) -> Callable[[], Any]:
    def page() -> Any:
        return response(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})

    return page


def gated_app(s: UIState, host: str = "127.0.0.1", api_key: str | None = None) -> Any:
    """The UI app behind the security gate, with the chat servers mounted under /serve/ (see security.py)."""
    check_binding(host, api_key)
    return Gate(build_ui_app(s), s.hub, host, api_key)


def run_ui(runs: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
           preset: RunConfig | None = None, resolve_base: Callable[[str], str] | None = None,
           device: str = "auto") -> int:
    """`lorakit ui`: serve the dashboard until Ctrl-C. Training runs it started keep running after it stops."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    check_binding(host, api_key)  # before anything else: a refused binding creates nothing
    s = make_state(runs, preset, resolve_base, device)
    app = gated_app(s, host, api_key)
    where = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"lorakit ui: runs under {s.root.root}, at {where}" + (" (API key required)" if api_key else ""), flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                      timeout_graceful_shutdown=3)).run()
    finally:
        s.hub.close()
        s.trainer.close()
    return 0
