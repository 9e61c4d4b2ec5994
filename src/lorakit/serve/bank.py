"""The adapter bank: which adapters the one model holds, which names requests may use, hot load and
unload, and when an unloaded adapter's weights can finally go (its last request finished)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from lorakit.adapters import WEIGHTS_FILE, load_lora_adapter, read_adapter_config, read_chat_template
from lorakit.errors import AdapterError
from lorakit.lora import adapter_configs, delete_adapter
from lorakit.serve.openai import ServeError, bad_request
from lorakit.serve.paths import confine_path
from lorakit.serve.settings import ADAPTER_NAME

log = logging.getLogger(__name__)

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
            raise bad_request(f"lora_name {name!r} is not allowed; use letters, digits and . _ : / - (max 128)",
                              "lora_name")
        with self._lock:
            if name == self.base_name or name in self.adapters or name in self._pending:
                raise bad_request(f"an adapter named {name!r} is already loaded (or is the base model); "
                                  "unload it first or pick another name", "lora_name")
            self._pending.add(name)
            self._counter += 1
            return f"serve{self._counter}"  # ModuleDict keys cannot hold dots: never the user's name

    def _load(self, name: str, directory: Path, key: str) -> Adapter:
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
        return Adapter(name, key, directory, int(config.get("r", 0)), read_chat_template(directory), int(time.time()))

    def _delete(self, adapter: Adapter) -> None:
        with self.model_lock:
            delete_adapter(self.model, adapter.key)


def _refuse_full_modules(directory: Path) -> None:
    """Adapters that retrain whole modules (a head, embeddings) would overwrite the shared base."""
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

