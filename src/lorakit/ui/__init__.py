"""`lorakit ui`: a dashboard in the browser over a folder of runs -- fully offline, served by the app alone.

    runs      RunsRoot (the one door from a run id to a folder), status, metrics read by byte offset
    jobs      Trainer: `lorakit train` as separate processes (start, stop = SIGINT, resume); Exporter: merge
              and GGUF in a thread, with progress
    forms     the new-run form: fields -> YAML -> config.load_run_config's problems -> the advisor's verdict
    chat      ChatHub: lorakit.serve's engine per base, the run's adapter loaded into it, mounted at /serve/
    security  Gate: loopback by default, an API key otherwise, Host and write-header checks
    app       the routes and `run_ui`
    static/   the pages: HTML, one stylesheet, plain JavaScript (an SVG line chart, no library, no build)

Imports lorakit's pipelines (serve, export, advise) and below; the demo is passed in by the CLI
(`resolve_base`, `preset`), never imported here.
"""

from lorakit.ui.app import build_ui_app, gated_app, make_state, run_ui
from lorakit.ui.runs import RunsRoot, UIError

__all__ = ["RunsRoot", "UIError", "build_ui_app", "gated_app", "make_state", "run_ui"]
