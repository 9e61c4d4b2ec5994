"""Modules trained in full beside LoRA (PEFT's `modules_to_save`): a sequence classifier's head above all.

A classifier's head is new for the task: transformers initializes `score` / `classifier` (and a pooler a
pretrained encoder lacks, e.g. DeBERTa's) at random when it loads a base for classification. LoRA alone
would leave that random head frozen and unsaved, so the same adapter would predict differently at every
load. PEFT's task_type=SEQ_CLS therefore trains the head in full and saves it with the adapter; so does
lorakit, with the same file keys.

`SavedModule` wraps such a module as PEFT's ModulesToSaveWrapper does, with the same module paths, so a
parameter `score.modules_to_save.<adapter>.weight` is PEFT's file key `base_model.model.score.weight`:

    original_module           the base's own module, frozen: what `adapters_disabled` computes with
    modules_to_save[name]     one trainable copy per adapter; a 4-bit layer inside it is dequantized
                              (a layer trained in full needs full-precision weights)

Forward runs the active adapter's copy; the original when adapters are disabled or the active adapter
has no copy; and under `adapter_rows`, row i runs with row i's adapter's copy (or the original).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.quant.linear import NF4Linear

# PEFT's SEQ_CLS_HEAD_NAMES: what task_type=SEQ_CLS adds to modules_to_save, matched with str.endswith on
# the full module name (so DistilBERT's pre_classifier is trained in full too, as in PEFT).
SEQ_CLS_HEAD_NAMES = ("classifier", "score")
POOLER = "pooler"  # BERT's, ALBERT's, DeBERTa's ContextPooler: feeds the classifier, trained with it


class SavedModule(nn.Module):
    """A frozen original module plus one trainable copy per adapter; see the module docstring."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_adapters: Sequence[str | None] | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = trainable_copy(self.original_module)
        self.active_adapter = name

    def set_adapter(self, name: str) -> None:
        """Compute with `name`'s copy (the original when it has none); only that copy trains."""
        self.active_adapter = name if name in self.modules_to_save else None
        for adapter, module in self.modules_to_save.items():
            module.requires_grad_(adapter == name)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is not None and not self.disabled:
            return self._forward_rows(*args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def _forward_rows(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i of x (B, ...) through row_adapters[i]'s copy, or the original when it has none."""
        names = [n if n in self.modules_to_save else None for n in self.row_adapters]
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_rows has {len(names)} names for a batch of {x.shape[0]} rows")
        out = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)  # (rows of name,)
            module = self.original_module if name is None else self.modules_to_save[name]
            part = module(x.index_select(0, rows), *args, **kwargs)  # (rows, ...)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))  # (B, ...)
            out[rows] = part
        return out

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active_adapter}"


def trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with requires_grad on, its NF4 layers dequantized to the model's dtype."""
    clone = copy.deepcopy(module)
    if isinstance(clone, NF4Linear):
        clone = clone.dequantized_layer(dtype=clone.compute_dtype)
    for name, layer in list(clone.named_modules()):
        if isinstance(layer, NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, child, layer.dequantized_layer(dtype=layer.compute_dtype))
    return clone.requires_grad_(True)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def base_name(name: str) -> str | None:
    """A module or parameter name as the base model spells it: `score.original_module.weight` -> `score.weight`;
    None for a name inside an adapter's copy (`score.modules_to_save.a.weight`), which the base does not have."""
    parts = name.split(".")
    if "modules_to_save" in parts:
        return None
    return ".".join(p for p in parts if p != "original_module")


def is_sequence_classifier(model: nn.Module) -> bool:
    """A transformers *ForSequenceClassification model (what lorakit's task seq_cls loads)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def is_head_name(name: str) -> bool:
    """PEFT's test for a SEQ_CLS head: the full module name ends with `classifier` or `score`."""
    return name.endswith(SEQ_CLS_HEAD_NAMES)


def carries_head(model: nn.Module, modules: Sequence[str]) -> bool:
    """Whether `modules` (trained in full) include the classifier's head: a module named as PEFT names heads --
    or, for a model whose head is called otherwise (T5's classification_head), any module at all."""
    named = any(is_head_name(n) for n, _ in model.named_modules() if base_name(n) == n)
    return any(is_head_name(m) for m in modules) if named else bool(modules)


def classifier_head(model: nn.Module) -> list[str]:
    """The modules task seq_cls trains in full by default: PEFT's SEQ_CLS heads (names ending in `classifier`
    or `score`) plus a module named `pooler` that has weights -- outermost modules only."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or base_name(name) != name or any(name.startswith(f"{f}.") for f in found):
            continue
        pooler = name.rsplit(".", 1)[-1] == POOLER and any(True for _ in module.parameters())
        if is_head_name(name) or pooler:
            found.append(name)
    return found


def label_names(model: nn.Module) -> list[str] | None:
    """The class names of a classifier in id order; None when they are transformers' LABEL_0, LABEL_1, ..."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def set_label_names(model: nn.Module, names: Sequence[str] | None) -> None:
    """Write class names into the model's config (id2label and label2id: what a merged checkpoint carries)."""
    if not names:
        return
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
