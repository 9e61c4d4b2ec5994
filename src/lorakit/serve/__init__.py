"""An OpenAI-compatible server: one base model, many LoRA adapters, mixed in every forward.

    client ──HTTP──> handlers (asyncio, uvicorn) ──Job──> Engine thread ──events──> handlers ──> client
                         │ parse, validate, auth               │ RunningBatch + KV cache
                         └── AdapterBank (load/unload) ────────┘ adapter_rows(model, per-row adapters)

The request's `model` picks the base or an adapter. Every adapter is loaded into the *one* model under
its own key, and `lorakit.lora.adapter_rows` gives each row of a batch its own adapter (or none), so
requests for different adapters share each forward -- no swapping, no merging, any mix of ranks and
targets, over a full-precision or NF4 base:

    y[b] = base(x[b]) + s_a · x[b] A_aᵀ B_aᵀ      a = the adapter of row b (no term for base rows)

Hot load and unload (vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) never disturb running
requests: each load gets a fresh key in the model, an unload only hides the name, and the weights are
deleted when the last request using them finishes. Model changes and forwards take turns on one lock.

Safety: adapter paths loaded at runtime must lie inside `--adapter-root` (after resolving `..` and
symlinks, for the directory and each file in it); an optional API key; limits on body size, prompt
length and max tokens, answered in OpenAI's error shape; an exception in one request fails only the
requests of that forward, never the server.

The rooms, bottom to top (each imports only those above it in this list):

    settings.py  ServeSettings, --adapter specs
    openai.py    ServeError (OpenAI's error shape), request fields -> Plan, response shapes
    paths.py     confine_path: runtime loads stay inside the adapter roots
    bank.py      Adapter, AdapterBank: hot load/unload, reference counts
    engine.py    Engine: continuous batching, sampling, KV cache, events
    app.py       ServerState, Run, FastAPI routes, create_state/load_serving_base, run_server
"""

from lorakit.serve.app import (
    BackgroundServer,
    ServerState,
    build_app,
    create_state,
    load_serving_base,
    parse_request,
    run_server,
)
from lorakit.serve.bank import Adapter, AdapterBank
from lorakit.serve.engine import Engine, EngineStats, Event, Job
from lorakit.serve.openai import Plan, ServeError, fit_max_tokens, sampling_config
from lorakit.serve.paths import confine_path
from lorakit.serve.settings import ServeSettings, parse_adapter_specs

__all__ = [
    "Adapter",
    "AdapterBank",
    "BackgroundServer",
    "Engine",
    "EngineStats",
    "Event",
    "Job",
    "Plan",
    "ServeError",
    "ServeSettings",
    "ServerState",
    "build_app",
    "confine_path",
    "create_state",
    "fit_max_tokens",
    "load_serving_base",
    "parse_adapter_specs",
    "parse_request",
    "run_server",
    "sampling_config",
]
