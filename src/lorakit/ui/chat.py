"""The chat playground: base and adapter side by side, on the server's own engine.

The UI does not generate anything itself. For a run it starts (or reuses) a `lorakit.serve` server state
for the run's base -- the same continuous-batching engine, sampling and chat templates as `lorakit serve`
-- loads the run's adapter into it through the adapter bank (a runtime load, confined to --runs), and
mounts that server's OpenAI-compatible app under /serve/<slot>/. The browser then sends the same prompt
twice to /serve/<slot>/v1/chat/completions with `stream: true`, once with `model` = the base and once with
`model` = the adapter; the engine decodes both in the same forwards, and each answer streams back as
server-sent events.

One slot per (base, quantization): a QLoRA adapter is served over the NF4 base it was trained on. At
most `max_bases` bases are held; the least recently used one is closed to make room.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.serve import ServeSettings, build_app, create_state
from lorakit.ui.runs import RunsRoot, UIError, read_config

ADAPTER_CHARS = re.compile(r"[^A-Za-z0-9._:/-]")


@dataclass
class Slot:
    key: str
    state: Any  # lorakit.serve.ServerState
    app: Any  # its FastAPI app
    adapters: dict[str, float] = field(default_factory=dict)  # adapter name -> adapter mtime when loaded


class ChatHub:
    def __init__(self, root: RunsRoot, resolve_base: Any = None, device: str = "auto", max_bases: int = 1):
        self.root, self.device, self.max_bases = root, device, max_bases
        self.resolve_base = resolve_base or (lambda name: name)
        self.slots: OrderedDict[str, Slot] = OrderedDict()
        self.lock = threading.Lock()  # one base loads at a time

    def prepare(self, run_dir: Path) -> dict[str, Any]:
        """Make base + this run's adapter servable; returns where to send requests and the two model names."""
        config = read_config(run_dir)
        adapter_dir = run_dir / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UIError(f"{self.root.run_id(run_dir)} has no adapter/ yet (chat needs a LoRA/QLoRA run that "
                          "saved one; a run saves it when it ends or is stopped)", 409)
        if config.get("task", "causal_lm") != "causal_lm":
            raise UIError(f"{self.root.run_id(run_dir)} is a {config.get('task')} run; chat needs a causal_lm run", 409)
        base = self.resolve_base(str(config.get("base_model") or ""))
        quant = "nf4" if config.get("method") == "qlora" else "none"
        with self.lock:
            slot = self._slot(base, quant)
            name = self._load_adapter(slot, run_dir)
        return {"slot": slot.key, "url": f"/serve/{slot.key}/v1", "base_model": slot.state.base_name,
                "adapter_model": name, "quant": quant}

    def _slot(self, base: str, quant: str) -> Slot:
        key = hashlib.sha256(f"{base}\0{quant}".encode()).hexdigest()[:12]
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.max_bases:
            _, old = self.slots.popitem(last=False)
            old.state.close()
        settings = ServeSettings(base=base, quant=quant, adapter_roots=[str(self.root.root)], device=self.device,
                                 max_tokens=512)
        state = create_state(settings)
        slot = Slot(key, state, build_app(state))
        self.slots[key] = slot
        return slot

    def _load_adapter(self, slot: Slot, run_dir: Path) -> str:
        """The run's adapter under the name `run:<id>`, reloaded when the run has saved a newer one."""
        name = "run:" + ADAPTER_CHARS.sub("-", self.root.run_id(run_dir))
        mtime = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime
        if slot.adapters.get(name) == mtime:
            return name
        if name in slot.adapters:
            slot.state.bank.unload(name)  # running requests keep the old weights until they finish
        slot.state.bank.load(name, str(run_dir / "adapter"))  # not trusted: the bank confines it to --runs
        slot.adapters[name] = mtime
        return name

    def app(self, key: str) -> Any | None:
        slot = self.slots.get(key)
        return slot.app if slot else None

    def close(self) -> None:
        with self.lock:
            for slot in self.slots.values():
                slot.state.close()
            self.slots.clear()
