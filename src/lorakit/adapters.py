"""Adapter files in PEFT's on-disk format, plus lorakit's own metadata beside them.

    adapter_dir/
      adapter_config.json          PEFT's LoraConfig fields (peft_type, r, lora_alpha, target_modules, ...)
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
                                   [/ .lora_magnitude_vector (out,) for DoRA]
                                   and base_model.model.<module>.<param> for modules trained in full
                                   (a classifier's head: base_model.model.score.weight, as PEFT writes it)
      lorakit.json                 base-model fingerprint, lorakit version, creation time, data hash,
                                   hyperparameters, metrics, and for a classifier its num_labels and
                                   id2label (a separate file so PEFT's config parser never sees keys it
                                   does not know)
      chat_template.jinja          the template used in training, when there was one

PEFT, vLLM and lorakit all read the first two files. Saving is atomic (temp dir + rename).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig, init_kind
from lorakit.errors import AdapterError
from lorakit.heads import (
    SEQ_CLS_HEAD_NAMES,
    base_name,
    carries_head,
    is_sequence_classifier,
    saved_modules,
    set_label_names,
)
from lorakit.inits import converted_alpha, converted_factors
from lorakit.lora import (
    LoraLinear,
    adapter_configs,
    fan_in_fan_out,
    inject_lora,
    is_conv1d,
    layer_shape,
    linear_module_names,
    lora_layers,
    merge_lora_weights,
    modules_to_save,
)
from lorakit.quant.linear import NF4Linear
from lorakit.runtime.atomic import atomic_directory
from lorakit.runtime.outdir import check_output_dir, output_errors, replace_files

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "lorakit.json"
TEMPLATE_FILE = "chat_template.jinja"
PREFIX = "base_model.model."
VLLM_DEFAULT_MAX_RANK = 16
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank




def lorakit_version() -> str:
    """The installed lorakit's version (recorded in every adapter's lorakit.json)."""
    try:
        return importlib.metadata.version("lorakit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_chat_template(adapter_dir: str | Path | None) -> str | None:
    """The chat template saved beside an adapter (what training rendered with), or None."""
    path = Path(adapter_dir) / TEMPLATE_FILE if adapter_dir else None
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None


# --------------------------------------------------------------------------- fingerprint


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of the base model: name, revision, and a hash of its config and weight shapes.

    The hash sees through LoRA wrappers and 4-bit storage (logical (out, in) shapes), so the same base
    gives the same hash whether it is plain, adapted or quantized."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if config is not None else {}
    # Keys that differ between runs of the same weights: how it was loaded or saved, runtime switches,
    # and problem_type, which a sequence classifier's forward fills in on its first batch with labels.
    volatile = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache",
                "quantization_config", "_attn_implementation_autoset", "output_hidden_states", "output_attentions",
                "return_dict", "architectures", "problem_type"}
    stable = {k: v for k, v in sorted(config_dict.items()) if k not in volatile}
    # Class names are the task's, not the base's: hashed as transformers' defaults for that many classes,
    # so a base whose head was named by training (or by an adapter) still matches, and hashes made before
    # names were set (always the defaults) stay valid.
    n = len(config_dict.get("id2label") or {})
    if "id2label" in stable:
        stable["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
    if "label2id" in stable:
        stable["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    for name, shape in base_weight_shapes(model):
        digest.update(f"{name}:{tuple(shape)};".encode())
    return {
        "name": getattr(config, "_name_or_path", None) or type(model).__name__,
        "revision": getattr(config, "_commit_hash", None),
        "hash": digest.hexdigest()[:16],
    }


def base_weight_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for name, module in model.named_modules():
        if ".lora_" in f".{name}" or isinstance(module, LoraLinear) or base_name(name) is None:
            continue
        clean = base_name(name).replace(".base_layer", "")
        if isinstance(module, NF4Linear):  # its weight is buffers; its bias is still a parameter
            shapes.append((f"{clean}.weight", (module.out_features, module.in_features)))
        for pname, param in module.named_parameters(recurse=False):
            shape = tuple(param.shape)
            shapes.append((f"{clean}.{pname}", shape[::-1] if is_conv1d(module) and pname == "weight" else shape))
    return sorted(shapes)


# --------------------------------------------------------------------------- save


def lora_state_dict(model: nn.Module, adapter_name: str = "default", converted: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names. `converted`: a PiSSA/OLoRA adapter as plain LoRA of
    rank 2r on the original base ([A ; A₀], [B | −B₀]; lorakit.inits.converted_factors)."""
    out = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if converted:
                A0, B0 = layer.initial_factors[adapter_name]
                A, B = converted_factors(A.detach(), B.detach(), A0.to(A.device), B0.to(B.device))
            out[f"{PREFIX}{name}.lora_A.weight"] = A
            out[f"{PREFIX}{name}.lora_B.weight"] = B
            if adapter_name in layer.lora_magnitude_vector:  # DoRA's m: PEFT drops the ".<adapter>.weight"
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    for module_name, saved in saved_modules(model):
        if adapter_name in saved.modules_to_save:  # PEFT's key: without `.modules_to_save.<adapter>`
            for pname, param in saved.modules_to_save[adapter_name].named_parameters():
                out[f"{PREFIX}{module_name}.{pname}"] = param
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def classifier_metadata(model: nn.Module, adapter_name: str = "default") -> dict[str, Any] | None:
    """lorakit.json's `classifier` entry: num_labels, id2label (class names, or transformers' LABEL_i)
    and the modules saved as the head; None for a model that is not a sequence classifier."""
    if not is_sequence_classifier(model):
        return None
    config = model.config
    return {
        "num_labels": int(config.num_labels),
        "id2label": {str(i): str(config.id2label[i]) for i in sorted(config.id2label, key=int)},
        "head": modules_to_save(model, adapter_name),
    }


def peft_config_dict(model: nn.Module, config: LoraConfig, adapter_name: str, task_type: str | None,
                     converted: bool = False) -> dict:
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.lora_A]
    config_obj = getattr(model, "config", None)
    r, alpha = (2 * config.r, converted_alpha(config.alpha, config.use_rslora)) if converted else (config.r, config.alpha)
    return {
        "peft_type": "LORA",
        "task_type": task_type or _guess_task_type(model),
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.dropout,
        "target_modules": _portable_targets(model, [n for n, _ in layers]),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(fan_in_fan_out(layer.base_layer) for _, layer in layers),
        "init_lora_weights": _peft_init(config, converted),
        "modules_to_save": modules_to_save(model, adapter_name) or None,
        "base_model_name_or_path": getattr(config_obj, "_name_or_path", None) or None,
        "revision": getattr(config_obj, "_commit_hash", None),
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _peft_init(config: LoraConfig, converted: bool) -> str | bool:
    """PEFT's init_lora_weights. An unconverted PiSSA/OLoRA adapter keeps its init, so that PEFT (and lorakit)
    recompute the reduced base W − s·B₀A₀ from the original W on load before copying the trained factors in
    (exact for pissa and olora; pissa_niter_N's randomized SVD gives another reduced base, hence converted
    saving by default). A converted one is plain LoRA; so is LoftQ's, whose factors apply to the 4-bit base
    (PEFT's LoftQ example saves init_lora_weights=True too, since "loftq" would re-quantize on load)."""
    if config.init == "gaussian":
        return "gaussian"
    return config.init if init_kind(config.init) in ("pissa", "olora") and not converted else True


def _portable_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Suffixes (q_proj, ...) when they select exactly these layers -- what vLLM expects -- else full names."""
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    selected = [n for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(selected) == sorted(targets) else sorted(targets)


def _guess_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    return "SEQ_CLS" if "SequenceClassification" in name else "CAUSAL_LM"


def save_lora_adapter(
    model: nn.Module,
    out_dir: str | Path,
    adapter_name: str = "default",
    task_type: str | None = None,
    metadata: dict[str, Any] | None = None,
    chat_template: str | None = None,
    converted: bool | None = None,
) -> Path:
    """Write the adapter in PEFT's format (atomically) and return the directory.

    A PiSSA/OLoRA adapter is saved `converted` (default: its config's save_converted) to plain LoRA of rank
    2r that applies to the original base, or as trained (it then applies to the reduced base only; PEFT and
    lorakit recompute that base on load from the init recorded in adapter_config.json)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"no adapter named {adapter_name!r} on this model; adapters here: {list(configs)}")
    config = configs[adapter_name]
    convertible = init_kind(config.init) in ("pissa", "olora")
    converted = convertible and (config.save_converted if converted is None else converted)
    tensors = lora_state_dict(model, adapter_name, converted=converted)
    if converted and any(isinstance(layer.base_layer, NF4Linear) for _, layer in lora_layers(model)
                         if adapter_name in layer.initial_factors):
        log.warning("adapter %r is saved converted to plain LoRA on the original W, but it trained on NF4(W − s·B₀A₀): "
                    "NF4(W) + the converted update differs from the trained model by the change in quantization error "
                    "(as PEFT warns); save_converted: false keeps the factors for the reduced base", adapter_name)

    meta = {
        "lorakit_version": lorakit_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "adapter_name": adapter_name,
        "base_model": base_fingerprint(model),
        **({"classifier": classifier_metadata(model, adapter_name)} if is_sequence_classifier(model) else {}),
        **({"init": {"method": config.init, "converted": converted}} if init_kind(config.init) in WEIGHT_INITS else {}),
        **(metadata or {}),
    }
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        peft_config = peft_config_dict(model, config, adapter_name, task_type, converted)
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if chat_template:
            (tmp / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    return Path(out_dir)


# --------------------------------------------------------------------------- load


def read_adapter_config(adapter_dir: str | Path, allow_dora: bool = False) -> dict[str, Any]:
    """adapter_config.json as a dict, refusing what lorakit cannot apply; a DoRA adapter only for callers that
    apply DoRA (`allow_dora`: loading into a model, the streamed merge) -- the others add s·BA."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        found = sorted(p.name for p in Path(adapter_dir).iterdir()) if Path(adapter_dir).is_dir() else "nothing (no such directory)"
        raise AdapterError(f"{path} not found; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}; found: {found}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); the file is corrupt -- re-save the adapter") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object (PEFT's LoraConfig), got {type(config).__name__}; re-save the adapter")
    bad = [f"{key}={config[key]!r}" for key, ok in (("r", _positive_int), ("lora_alpha", _positive_number))
           if key in config and not ok(config[key])]
    if bad:
        raise AdapterError(f"{path}: {', '.join(bad)} is not valid (r must be an integer >= 1, lora_alpha a number > 0); "
                           "the file is corrupt or hand-edited -- re-save the adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; lorakit loads LORA adapters")
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "layers_to_transform") if config.get(k)}
    if unsupported:
        raise AdapterError(f"{path}: options {unsupported} are not supported by lorakit yet; merge them with PEFT instead")
    if config.get("use_dora") and not allow_dora:
        raise AdapterError(
            f"{path}: a DoRA adapter (use_dora: true). This path applies adapters as a low-rank delta W + s·BA, but "
            "DoRA also rescales every output row by m/‖W + s·BA‖ (lora_magnitude_vector), so it would be applied "
            f"wrongly. Merge it into its base first (lorakit merge --adapter {Path(adapter_dir)}) and use the merged "
            "model; lorakit's train, eval and generate load DoRA adapters as they are"
        )
    return config


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _positive_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    """lorakit.json as a dict; {} for a PEFT adapter that has none."""
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); the file is corrupt -- re-save the adapter, or delete "
                           f"{META_FILE} to load it as a plain PEFT adapter (no base-model check)") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(meta).__name__}; re-save the adapter")
    return meta


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{adapter_dir} holds only adapter_model.bin (a pickle, which lorakit never loads); convert it "
                "with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise AdapterError(f"{path} not found; re-save the adapter")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is corrupt or truncated ({e}); re-save or re-download the adapter") from None


def load_lora_adapter(
    model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default", check_base: bool = True,
    require_head: bool = True,
) -> list[str]:
    """Load a lorakit or PEFT LoRA adapter into `model` as `adapter_name`; returns the adapted modules.

    Into a sequence classifier, the adapter must carry its head (refused otherwise, unless `require_head`
    is False: the base's own head is then the one meant) and fit the model's num_labels; its class names
    (lorakit.json) become the model's id2label."""
    adapter_dir = Path(adapter_dir)
    peft_config = read_adapter_config(adapter_dir, allow_dora=True)
    tensors = read_adapter_tensors(adapter_dir)
    lora, full = split_adapter_keys(tensors, adapter_dir)
    meta = read_metadata(adapter_dir).get("classifier")
    _check_classifier(model, full, meta, adapter_dir, require_head)  # first: num_labels also changes the fingerprint
    if check_base:
        _check_fingerprint(model, adapter_dir)
    use_dora = bool(peft_config.get("use_dora", False))
    _check_modules(model, lora, full, adapter_dir, int(peft_config.get("r", 8)), use_dora)
    saved = saved_module_names(full, peft_config.get("modules_to_save"))
    config = LoraConfig(
        r=int(peft_config.get("r", 8)),
        alpha=float(peft_config.get("lora_alpha", 8)),
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        target_modules=sorted(lora),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        use_dora=use_dora,
        init=_reduced_base_init(peft_config),
        modules_to_save=saved,
    )
    try:
        targets = inject_lora(model, config, adapter_name)
    except ValueError as e:
        if config.init == "kaiming":
            raise
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: init_lora_weights {config.init!r} means the factors apply to "
                           f"the reduced base W − s·B₀A₀, which is recomputed from the original W on load, but: {e}. "
                           "Load it onto the full-precision base, or save it converted (the default)") from None
    _copy_weights(model, lora, full, saved, adapter_name)
    if meta and is_sequence_classifier(model):
        set_label_names(model, [meta["id2label"][str(i)] for i in range(len(meta["id2label"]))])
    return targets


def _reduced_base_init(peft_config: dict[str, Any]) -> str:
    """pissa | pissa_niter_N | olora when the file holds unconverted factors (the base must be reduced as at
    training start, as PEFT does on load); kaiming otherwise (the factors are then copied over the init)."""
    init = peft_config.get("init_lora_weights", True)
    return init if isinstance(init, str) and init_kind(init) in ("pissa", "olora") else "kaiming"


def saved_module_names(full: dict[str, torch.Tensor], listed: list[str] | None) -> list[str]:
    """The modules whose trained copies the file's full tensors fill: for each parameter path, the outermost
    enclosing module whose name ends with an entry of adapter_config.json's modules_to_save (PEFT's rule), else
    the parameter's own module. A SEQ_CLS adapter saved by PEFT lists ['classifier', 'score']."""
    names: list[str] = []
    for key in full:
        prefixes = _prefixes(key)
        module = next((p for p in prefixes if any(p.endswith(entry) for entry in listed or [])), prefixes[-1])
        if module not in names:
            names.append(module)
    return sorted(names)


def _check_classifier(model: nn.Module, full: dict, meta: dict | None, adapter_dir: Path, require_head: bool) -> None:
    """A classifier adapter must carry its head and be for this many classes."""
    if not is_sequence_classifier(model):
        return
    if require_head and not carries_head(model, [module for key in full for module in _prefixes(key)]):
        raise AdapterError(
            f"adapter {adapter_dir} carries no classification head (no {'/'.join(SEQ_CLS_HEAD_NAMES)} weights in "
            f"{WEIGHTS_FILE}), but {type(model).__name__} predicts through one: with this base's head -- random "
            "whenever the base was not trained for the task -- the same adapter would score differently at every load. "
            "Retrain with lora.modules_to_save unset (null: the head is trained and saved, as PEFT's task_type=SEQ_CLS "
            "does), or, if this base's own head is the one the adapter was trained with, pass require_head=False."
        )
    want = int(meta["num_labels"]) if meta and meta.get("num_labels") else None
    if want is not None and want != model.config.num_labels:
        names = list((meta.get("id2label") or {}).values())
        raise AdapterError(
            f"adapter {adapter_dir} classifies into {want} labels {names}, but this {type(model).__name__} has "
            f"num_labels={model.config.num_labels}; load the base with num_labels={want} (`num_labels: {want}` in "
            f"the run config, or load_base(..., num_labels={want}))"
        )


def _prefixes(key: str) -> list[str]:
    """The module paths enclosing parameter `key`, outermost first: a.b.c.weight -> [a, a.b, a.b.c]."""
    parts = key.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def adapter_num_labels(adapter_dir: str | Path) -> int | None:
    """How many classes a SEQ_CLS adapter predicts: lorakit.json's num_labels, else the rows of a PEFT
    adapter's head weight (`score.weight`, `classifier.weight`, `classifier.out_proj.weight`); None if unknown."""
    meta = read_metadata(adapter_dir).get("classifier") or {}
    if meta.get("num_labels"):
        return int(meta["num_labels"])
    keys = read_adapter_tensors(Path(adapter_dir))
    for head in SEQ_CLS_HEAD_NAMES:
        for suffix in (f"{head}.weight", f"{head}.out_proj.weight"):
            hits = [t for k, t in keys.items() if k.endswith(suffix) and "lora_" not in k]
            if len(hits) == 1:
                return int(hits[0].shape[0])
    return None


def split_adapter_keys(tensors: dict[str, torch.Tensor], adapter_dir: Path) -> tuple[dict, dict]:
    """{module: {'A': t, 'B': t}} for LoRA factors, {param path: t} for modules trained in full."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for part, suffix in (("A", ".lora_A.weight"), ("B", ".lora_B.weight"), ("m", ".lora_magnitude_vector")):
            if name.endswith(suffix):
                lora.setdefault(name.removesuffix(suffix), {})[part] = tensor
                break
        else:
            if "lora_" in name:
                raise AdapterError(f"{adapter_dir / WEIGHTS_FILE}: key {key} is a LoRA variant lorakit does not load (only linear lora_A/lora_B)")
            full[name.replace(".modules_to_save.default", "")] = tensor
    for module, parts in lora.items():
        if not {"A", "B"} <= set(parts):
            has = "lora_A" if "A" in parts else "lora_B" if "B" in parts else "only a DoRA lora_magnitude_vector"
            raise AdapterError(f"{adapter_dir / WEIGHTS_FILE}: {module} has {has} but not its pair; the file is incomplete")
    if not lora:
        raise AdapterError(f"{adapter_dir / WEIGHTS_FILE} holds no lora_A/lora_B tensors (keys: {sorted(tensors)[:5]}); "
                           "it is not a LoRA adapter or the file is incomplete")
    return lora, full


def _check_modules(model: nn.Module, lora: dict, full: dict, adapter_dir: Path, r: int, use_dora: bool = False) -> None:
    """Every tensor must fit the layer it is for; r is the rank adapter_config.json declares, use_dora whether
    each module must carry DoRA's magnitude (out,)."""
    problems = []
    linear = set(linear_module_names(model))
    for module, parts in lora.items():
        if module not in linear:
            problems.append(f"{module}: no such linear layer in this model")
            continue
        layer = model.get_submodule(module)
        in_f, out_f = (layer.in_features, layer.out_features) if isinstance(layer, LoraLinear) else _shape(layer)
        want_a, want_b = (r, in_f), (out_f, r)
        if tuple(parts["A"].shape) != want_a or tuple(parts["B"].shape) != want_b:
            problems.append(
                f"{module}: expected lora_A {want_a} and lora_B {want_b} for this model, found "
                f"{tuple(parts['A'].shape)} and {tuple(parts['B'].shape)}"
            )
        if use_dora and tuple(parts["m"].shape if "m" in parts else ()) != (out_f,):
            found = tuple(parts["m"].shape) if "m" in parts else "none"
            problems.append(f"{module}: use_dora is true, so lora_magnitude_vector must be ({out_f},); found {found}")
        elif not use_dora and "m" in parts:
            problems.append(f"{module}: holds a DoRA lora_magnitude_vector but {CONFIG_FILE} says use_dora: false")
    shapes = _full_shapes(model)
    for name, tensor in full.items():
        if name not in shapes:
            problems.append(f"{name}: no such parameter in this model")
        elif shapes[name] != tuple(tensor.shape):
            problems.append(f"{name}: expected shape {shapes[name]}, found {tuple(tensor.shape)}")
    if problems:
        base = read_metadata(adapter_dir).get("base_model", {}).get("name") or _peft_base(adapter_dir)
        raise AdapterError(
            f"adapter {adapter_dir} does not fit this model (likely trained for another base or revision"
            f"{f': {base}' if base else ''}, or {CONFIG_FILE} and {WEIGHTS_FILE} do not belong together):\n  - "
            + "\n  - ".join(problems[:20])
        )


def _shape(layer: nn.Module) -> tuple[int, int]:
    return layer_shape(layer)


def _peft_base(adapter_dir: Path) -> str | None:
    try:
        return json.loads((adapter_dir / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None


def _check_fingerprint(model: nn.Module, adapter_dir: Path) -> None:
    saved = read_metadata(adapter_dir).get("base_model")
    if not saved or not saved.get("hash"):
        return  # a PEFT adapter: no fingerprint, shapes are still checked
    here = base_fingerprint(model)
    if saved["hash"] != here["hash"]:
        raise AdapterError(
            f"adapter {adapter_dir} was trained for base {saved.get('name')!r} (revision {saved.get('revision')}, "
            f"fingerprint {saved['hash']}), but this model is {here['name']!r} (fingerprint {here['hash']}): "
            "a different base model or revision. Load the matching base (--base); from Python, "
            "load_lora_adapter(..., check_base=False) skips this check if you know they are compatible."
        )


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base's parameters by the base's names, through LoRA and modules_to_save wrappers."""
    out = {}
    for name, param in model.named_parameters():
        clean = base_name(name)
        if clean is not None and ".lora_" not in f".{clean}":
            out[clean.replace(".base_layer", "")] = param
    return out


def _full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes a module trained in full may hold, by base name: its parameters, and a 4-bit layer's (out, in)
    weight (its trained copy is dequantized)."""
    shapes = {name: tuple(param.shape) for name, param in base_parameters(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear) and base_name(name) is not None:
            shapes[f"{base_name(name).replace('.base_layer', '')}.weight"] = (module.out_features, module.in_features)
    return shapes


def _copy_weights(model: nn.Module, lora: dict, full: dict, saved: list[str], adapter_name: str) -> None:
    with torch.no_grad():
        for module, parts in lora.items():
            layer = model.get_submodule(module)
            for part, store in (("A", layer.lora_A), ("B", layer.lora_B), ("m", layer.lora_magnitude_vector)):
                if part in parts:
                    weight = store[adapter_name].weight
                    weight.copy_(parts[part].to(weight.dtype))
        for name, tensor in full.items():  # into this adapter's copy of the module trained in full
            module = next(m for m in saved if name.startswith(f"{m}."))
            copy = model.get_submodule(module).modules_to_save[adapter_name]
            param = copy.get_parameter(name.removeprefix(f"{module}."))
            param.copy_(tensor.to(param.dtype))


# --------------------------------------------------------------------------- merge, list, check


def export_merged(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, force: bool = False) -> Path:
    """Merge the active adapter into the base and save a standard transformers model (safetensors).

    A non-empty `out_dir` is refused unless `force`; then only the files written here are replaced (each
    atomically) and anything else in `out_dir` stays (lorakit.runtime.outdir)."""
    check_output_dir(out_dir, force)
    merged = merge_lora_weights(model, remove_wrappers=True)
    with output_errors(out_dir, "--out"), replace_files(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def list_adapters(root: str | Path) -> list[dict[str, Any]]:
    """One summary row per adapter directory under `root` (the root itself included)."""
    root = Path(root)
    rows = []
    for config_path in sorted(root.rglob(CONFIG_FILE)):
        adapter_dir = config_path.parent
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            rows.append({"path": str(adapter_dir), "error": f"unreadable {CONFIG_FILE}: {e}"})
            continue
        try:
            meta = read_metadata(adapter_dir)
        except AdapterError as e:
            rows.append({"path": str(adapter_dir), "error": str(e)})
            continue
        rows.append({
            "path": str(adapter_dir),
            "base_model": meta.get("base_model", {}).get("name") or config.get("base_model_name_or_path"),
            "r": config.get("r"),
            "alpha": config.get("lora_alpha"),
            "targets": config.get("target_modules"),
            "data_hash": meta.get("data_hash"),
            "created": meta.get("created"),
            "metrics": meta.get("metrics"),
        })
    return rows


def _rank_problems(config: dict[str, Any], lora: dict[str, dict[str, torch.Tensor]], adapter_dir: Path) -> list[str]:
    """adapter_config.json's r must be the rank of every lora_A (r, in) and lora_B (out, r): engines size
    their buffers from r, and PEFT fails to load the tensors otherwise."""
    r = config.get("r", 8)
    wrong = sorted(f"{m} (lora_A {tuple(p['A'].shape)}, lora_B {tuple(p['B'].shape)})" for m, p in lora.items()
                   if p["A"].dim() != 2 or p["B"].dim() != 2 or p["A"].shape[0] != r or p["B"].shape[1] != r)
    if not wrong:
        return []
    return [f"{adapter_dir / CONFIG_FILE} says r={r}, but {len(wrong)} module(s) have tensors of another rank: "
            f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}; {CONFIG_FILE} and {WEIGHTS_FILE} do not "
            "belong together -- re-save the adapter"]


def check_adapter(adapter_dir: str | Path, target: str = "vllm") -> list[str]:
    """What a serving engine would reject or warn about; an empty list means it should load."""
    if target != "vllm":
        raise ValueError(f"check_adapter target must be one of vllm; got {target!r}")
    adapter_dir = Path(adapter_dir)
    problems = []
    try:
        config = read_adapter_config(adapter_dir, allow_dora=True)
        tensors = read_adapter_tensors(adapter_dir)
        lora, _ = split_adapter_keys(tensors, adapter_dir)
    except AdapterError as e:
        return [str(e)]
    problems += _rank_problems(config, lora, adapter_dir)
    if target == "vllm":
        if config.get("use_dora"):
            problems.append("use_dora: vLLM does not load DoRA adapters (its LoRA layers add s·BA and have no "
                            "lora_magnitude_vector); merge the adapter (lorakit merge) and serve the merged model")
        r = int(config.get("r", 0))
        fits = [m for m in VLLM_MAX_RANKS if m >= r]
        if r > VLLM_DEFAULT_MAX_RANK and fits:
            problems.append(f"rank {r} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}; start vLLM with "
                            f"--max-lora-rank {fits[0]} (it accepts {', '.join(map(str, VLLM_MAX_RANKS))})")
        elif not fits:
            problems.append(f"rank {r} is above the largest --max-lora-rank vLLM accepts ({VLLM_MAX_RANKS[-1]}); "
                            "retrain with a smaller r or merge the adapter")
        if config.get("modules_to_save"):
            problems.append(f"modules_to_save {config['modules_to_save']} (extra trainable modules) are rejected by vLLM; merge the adapter instead")
        if config.get("bias", "none") != "none":
            problems.append(f"bias={config['bias']!r}: vLLM needs --enable-lora-bias")
        if config.get("fan_in_fan_out"):
            problems.append("fan_in_fan_out (GPT-2 Conv1D) adapters: check that vLLM supports LoRA for this architecture")
        extra = sorted({k for k in tensors if "lora_" not in k})
        if extra:
            problems.append(f"non-LoRA tensors {extra[:5]} in the weights file are not loaded by vLLM")
    return problems
