"""Adapter files in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT names a LoRA layer's tensors by the layer's path in the base model, under ``base_model.model.``
and without the adapter name; its base layer is one level down (``base_layer``):

    fastlora (model.state_dict())           PEFT (adapter_model.safetensors)
    <path>.lora_A             [r, in]       base_model.model.<path>.lora_A.weight
    <path>.lora_B             [out, r]      base_model.model.<path>.lora_B.weight
    <path>.lora_magnitude_vector  [out]     base_model.model.<path>.lora_magnitude_vector  (DoRA)
    <path>.bias  (LoRA layer)               base_model.model.<path>.base_layer.bias
    <other>.bias (bias="all")               base_model.model.<other>.bias

Only safetensors is read: a pickle (``adapter_model.bin``) can run code when loaded, so it is
refused.

A save is atomic per adapter, as far as two files can be: the config is serialized (and so checked)
before anything is written, both files are written to temporaries in the target directory and
flushed before either replaces the old one, and the weights file's metadata holds a fingerprint of
the config fields that decide what the tensors compute. A save that dies between the two renames
leaves new weights beside the old config; ``load_adapter`` refuses that pair instead of loading it
with the wrong scaling. PEFT's files have no fingerprint and load as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .model import (BIAS_MODES, LORA_LAYERS, bias_parameters, check_bias, check_model, inject_lora,
                    join_path, lora_features, select_targets, lora_layers)
from .arguments import is_finite_number, lora_scaling
from .modules import LoRALinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
# Key, in the weights file's metadata, of the fingerprint of the config it was saved with.
FINGERPRINT_KEY = "fastlora.config_fingerprint"
# The config fields that decide what the tensors compute. Descriptive ones (base_model_name_or_path,
# task_type, inference_mode, ...) are left out, so that editing them by hand keeps the pair loadable.
_FINGERPRINTED = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules",
                  "exclude_modules", "lora_dropout", "bias")
# Fingerprinted only when set, so that the LoRA adapters saved before DoRA keep their fingerprint.
_FINGERPRINTED_WHEN_SET = ("use_dora",)

# LoraConfig fields for features fastlora does not implement; an adapter that sets one is refused
# rather than loaded into something that would compute a different function.
_UNSUPPORTED = ("lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                "layer_replication", "target_parameters", "trainable_token_indices", "use_bdlora",
                "arrow_config", "alora_invocation_tokens", "velora_config", "monteclora_config",
                "kasa_config", "use_qalora", "megatron_config")


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, *, bias: str = "none",
                 base_model_name_or_path: str | None = None) -> None:
    """Write the LoRA layers of ``model`` as a PEFT LoRA adapter that ``PeftModel.from_pretrained``
    (and ``load_adapter``) loads.

    ``bias``: which biases belong to the adapter, as ``mark_only_lora_as_trainable``.
    ``base_model_name_or_path`` (a str or a path) defaults to ``model.config._name_or_path`` when
    the model has one.

    Everything is checked before anything is written; both files replace the old ones only once
    both are written (see the module's docstring for what a crash between the two renames leaves).
    """
    st = _safetensors("save_adapter")
    check_model("save_adapter", model)
    check_bias("save_adapter", bias)
    save_directory = os.fspath(save_directory)
    if os.path.exists(save_directory) and not os.path.isdir(save_directory):
        raise ValueError(f"save_adapter: save_directory {save_directory!r} exists and is not a directory")
    layers = lora_layers(model, "save_adapter")
    config = _config_of(model, layers, bias, base_model_name_or_path)
    config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    tensors = {}
    for path, layer in layers.items():
        tensors[_peft_key(path, "lora_A.weight")] = layer.lora_A
        tensors[_peft_key(path, "lora_B.weight")] = layer.lora_B
        if layer.use_dora:
            tensors[_peft_key(path, "lora_magnitude_vector")] = layer.lora_magnitude_vector
    for name, p in bias_parameters(model, layers, bias).items():
        tensors[_peft_bias_key(name, layers)] = p
    # safetensors wants contiguous CPU tensors that share no memory
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    metadata = {"format": "pt", FINGERPRINT_KEY: _fingerprint(config)}

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text)

    os.makedirs(save_directory, exist_ok=True)
    # weights first: new weights beside the old config are caught by the fingerprint, while an old
    # weights file (from PEFT or an older fastlora) beside a new config might have none
    _replace_files(save_directory, {WEIGHTS_NAME: lambda tmp: st.save_file(tensors, tmp, metadata=metadata),
                                    CONFIG_NAME: write_config})


def load_adapter(model: nn.Module, adapter_directory: str | os.PathLike, *,
                 backend: str = "auto") -> nn.Module:
    """Load a LoRA adapter saved by ``save_adapter`` or by PEFT's ``save_pretrained`` into ``model``.

    If ``model`` has no LoRA layers yet, they are created from ``adapter_config.json`` (its
    target_modules, r, lora_alpha, lora_dropout, use_rslora, use_dora, rank/alpha patterns;
    ``backend`` is theirs) as ``apply_lora`` would. Otherwise the existing layers must be the ones the
    adapter was trained on, with the same scaling and the same use_dora.

    Every tensor of the file must have a place in the model and every place a tensor (errors name
    the first offender), with the same shape and dtype. A weights file written by ``save_adapter``
    must have been written with the config beside it (a fingerprint in its metadata; PEFT's files
    have none). Everything is checked before anything is written, so a refused adapter leaves the
    model as it was. Returns ``model``.
    """
    st = _safetensors("load_adapter")
    check_model("load_adapter", model)
    if hasattr(model, "peft_config"):
        raise TypeError("load_adapter: model is a PEFT model; load adapters into it with PEFT "
                        "(PeftModel.load_adapter), or load into the plain base model here")
    adapter_directory = os.fspath(adapter_directory)
    if not os.path.isdir(adapter_directory):
        raise ValueError(f"load_adapter: adapter_directory {adapter_directory!r} is not a directory "
                         f"(expected one holding {WEIGHTS_NAME} and {CONFIG_NAME})")
    config = _read_config(os.path.join(adapter_directory, CONFIG_NAME))
    weights_file = os.path.join(adapter_directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        pickles = [f for f in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
                   if os.path.isfile(os.path.join(adapter_directory, f))]
        extra = (f"; found {pickles[0]}, a pickle, which is refused because loading it can run code "
                 f"(convert it to safetensors where you trust it)") if pickles else ""
        raise ValueError(f"load_adapter: {weights_file!r} not found{extra}")
    try:
        state = st.load_file(weights_file, device="cpu")
        with st.safe_open(weights_file, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' own error type is not a stable import
        raise ValueError(f"load_adapter: cannot read {weights_file!r} as safetensors (truncated, "
                         f"corrupt or not a safetensors file): {err}") from None
    saved_with = metadata.get(FINGERPRINT_KEY)
    if saved_with is not None and saved_with != _fingerprint(config):
        raise ValueError(f"load_adapter: {weights_file!r} was saved with another {CONFIG_NAME} than "
                         f"the one beside it (they differ in one of {', '.join(_FINGERPRINTED)}): "
                         f"a save interrupted between writing the two files, or an edited config; "
                         f"save the adapter again")

    existing = {p: m for p, m in model.named_modules() if isinstance(m, LORA_LAYERS)}
    if existing:
        plan = {path: _Planned(layer.in_features, layer.out_features, layer.r, layer.lora_A.dtype,
                               layer.lora_B.dtype, layer.use_dora,
                               layer.lora_magnitude_vector.dtype if layer.use_dora else None)
                for path, layer in existing.items()}
        _check_scaling(existing, config)
        other = [p for p, layer in existing.items() if layer.use_dora != config["use_dora"]]
        if other:
            raise ValueError(f"load_adapter: layer {other[0]!r} has use_dora={existing[other[0]].use_dora} "
                             f"but the adapter was trained with use_dora={config['use_dora']}; "
                             f"apply_lora with use_dora={config['use_dora']}")
        merged = [p for p, layer in existing.items() if layer.merged]
        if merged:
            raise ValueError(f"load_adapter: layer {merged[0]!r} is merged; unmerge the model "
                             f"(fastlora.unmerge) before loading new adapter weights into it")
    else:
        paths = select_targets(model, config["target_modules"], config.get("exclude_modules"),
                        "load_adapter (adapter_config.json)")
        modules = dict(model.named_modules())
        plan = {}
        for path in paths:
            in_features, out_features, dtype = lora_features(modules[path])
            r = _r_alpha(config, path)[0]
            if config["use_dora"] and r > min(in_features, out_features):
                raise ValueError(f"load_adapter (adapter_config.json): layer {path!r} has r={r} but "
                                 f"DoRA needs r <= min(in_features, out_features) = "
                                 f"{min(in_features, out_features)}")
            plan[path] = _Planned(in_features, out_features, r, dtype, dtype, config["use_dora"], dtype)

    slots = _slots(model, plan, config["bias"])
    _check_tensors(state, slots, weights_file)

    if not existing:
        model = inject_lora(model, list(plan), lambda path: _r_alpha(config, path),
                        dict(dropout=config["lora_dropout"], use_rslora=config["use_rslora"],
                             backend=backend, use_dora=config["use_dora"]))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, slot in slots.items():
            params[slot.name].copy_(state[key])
    return model


# ---------------------------------------------------------------------------------------------
# Config


def _config_of(model, layers: dict[str, LoRALinear], bias: str, base_name) -> dict:
    """The adapter_config.json for ``layers``: the most common (r, alpha) as r / lora_alpha, the
    others in rank_pattern / alpha_pattern keyed by an anchored, escaped path (PEFT matches those
    keys as regexes against the end of the path)."""
    for attr in ("use_rslora", "dropout", "use_dora"):
        values = {getattr(layer, attr) for layer in layers.values()}
        if len(values) > 1:
            raise ValueError(f"save_adapter: the LoRA layers differ in {attr} ({sorted(values)}); "
                             f"a PEFT adapter config holds one value")
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    where = "base_model_name_or_path"
    if base_name is None:
        where = "base_model_name_or_path (from model.config._name_or_path)"
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if isinstance(base_name, os.PathLike):
        base_name = os.fspath(base_name)
    if base_name is not None and not isinstance(base_name, str):
        raise TypeError(f"save_adapter: {where} must be a str, a path or None, got "
                        f"{type(base_name).__name__}")
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_pattern(p): m.r for p, m in layers.items() if m.r != r},
        "alpha_pattern": {_pattern(p): m.alpha for p, m in layers.items() if m.alpha != alpha},
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "bias": bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": first.use_dora,
        "lora_bias": False,
    }


def _fingerprint(config: dict) -> str:
    """A hash of the config fields that decide what the adapter's tensors compute."""
    fields = {key: config.get(key) for key in _FINGERPRINTED}
    fields.update({key: config[key] for key in _FINGERPRINTED_WHEN_SET if config.get(key)})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _pattern(path: str) -> str:
    return "^" + re.escape(path)


def _r_alpha(config: dict, path: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives the layer at ``path``: the first rank_pattern / alpha_pattern
    key that matches the end of the path (as peft.utils.other.get_pattern_key), else r / lora_alpha."""
    def lookup(patterns: dict, default):
        for key, value in patterns.items():
            if re.match(_key_regex(key), path):
                return value
        return default
    return lookup(config["rank_pattern"], config["r"]), lookup(config["alpha_pattern"], config["lora_alpha"])


def _key_regex(key: str) -> str:
    """The regex PEFT matches a rank_pattern / alpha_pattern key with, against a module path."""
    return rf"(.*\.)?({key})$"


def _read_config(file: str) -> dict:
    if not os.path.isfile(file):
        raise ValueError(f"load_adapter: {file!r} not found")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load_adapter: cannot read {file!r} as JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"load_adapter: cannot read {file!r} as JSON: nested too deeply") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {file!r} must hold a JSON object, got {type(config).__name__}")
    where = f"load_adapter: {file!r}"
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    set_features = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("init_lora_weights") == "mica":
        set_features.append("init_lora_weights='mica'")
    if set_features:
        raise ValueError(f"{where}: uses PEFT features fastlora does not implement: "
                         f"{', '.join(set_features)}")
    config = dict(config)
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("use_rslora", False)
    config["use_dora"] = config.get("use_dora") or False
    config.setdefault("bias", "none")
    config["rank_pattern"] = config.get("rank_pattern") or {}
    config["alpha_pattern"] = config.get("alpha_pattern") or {}
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: r must be a positive int, got {r!r}")
    if not is_finite_number(alpha):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    if config["bias"] not in BIAS_MODES:
        raise ValueError(f"{where}: bias must be one of {BIAS_MODES}, got {config['bias']!r}")
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config[flag], bool):
            raise ValueError(f"{where}: {flag} must be true or false, got {config[flag]!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config[field], dict):
            raise ValueError(f"{where}: {field} must be an object, got {config[field]!r}")
        for key, value in config[field].items():
            try:
                re.compile(_key_regex(key))
            except re.error as err:
                raise ValueError(f"{where}: {field} key {key!r} is not a valid regular expression: "
                                 f"{err}") from None
            if field == "rank_pattern" and not (isinstance(value, int) and not isinstance(value, bool)
                                                and value >= 1):
                raise ValueError(f"{where}: rank_pattern[{key!r}] must be a positive int, got {value!r}")
            if field == "alpha_pattern" and not is_finite_number(value):
                raise ValueError(f"{where}: alpha_pattern[{key!r}] must be a finite number, got {value!r}")
    targets = config.get("target_modules")
    if not targets or not (isinstance(targets, str) or
                           (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{where}: target_modules must be a regex string or a list of names, "
                         f"got {targets!r}")
    return config


def _check_scaling(layers: dict[str, LoRALinear], config: dict) -> None:
    """Existing layers must scale as the adapter was trained: the scaling is in no tensor."""
    for path, layer in layers.items():
        r, alpha = _r_alpha(config, path)
        # another r is refused before the scaling is computed: the file's r may be beyond a float
        scaling = layer.scaling if layer.r != r else lora_scaling(alpha, r, config["use_rslora"])
        if layer.r != r or not math.isclose(layer.scaling, scaling, rel_tol=1e-12):
            trained = f" (scaling {scaling:g})" if layer.r == r else ""
            raise ValueError(
                f"load_adapter: layer {path!r} has r={layer.r}, alpha={layer.alpha:g}, "
                f"use_rslora={layer.use_rslora} (scaling {layer.scaling:g}) but the adapter was "
                f"trained with r={r}, lora_alpha={alpha:g}, use_rslora={config['use_rslora']}"
                f"{trained}; apply_lora with those values")


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class _Planned:
    """A LoRA layer as the checks see it, whether it exists yet or not."""
    in_features: int
    out_features: int
    r: int
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    use_dora: bool = False
    m_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class _Slot:
    name: str                # the parameter's name in model.named_parameters() (after injection)
    shape: tuple[int, ...]
    dtype: torch.dtype


def _slots(model: nn.Module, plan: dict[str, _Planned], bias: str) -> dict[str, _Slot]:
    """Every tensor an adapter for ``plan`` holds, by its PEFT key."""
    slots = {}
    for path, p in plan.items():
        slots[_peft_key(path, "lora_A.weight")] = _Slot(join_path(path, "lora_A"), (p.r, p.in_features), p.a_dtype)
        slots[_peft_key(path, "lora_B.weight")] = _Slot(join_path(path, "lora_B"), (p.out_features, p.r), p.b_dtype)
        if p.use_dora:
            slots[_peft_key(path, "lora_magnitude_vector")] = _Slot(join_path(path, "lora_magnitude_vector"),
                                                                    (p.out_features,), p.m_dtype)
    if bias != "none":
        lora_paths = set(plan)
        for name, param in model.named_parameters():
            if not (name == "bias" or name.endswith(".bias")):
                continue
            owner = name.rpartition(".")[0]
            if bias == "lora_only" and owner not in lora_paths:
                continue
            key = _peft_key(owner, "base_layer.bias" if owner in lora_paths else "bias")
            slots[key] = _Slot(name, tuple(param.shape), param.dtype)
    return slots


def _check_tensors(state: dict[str, torch.Tensor], slots: dict[str, _Slot], file: str) -> None:
    unknown = sorted(set(state) - set(slots))
    if unknown:
        raise ValueError(f"load_adapter: {file!r} holds {len(unknown)} tensor(s) the model has no "
                         f"place for, first {unknown[0]!r} (the model's LoRA layers or bias setting "
                         f"differ from the adapter's)")
    missing = sorted(set(slots) - set(state))
    if missing:
        raise ValueError(f"load_adapter: {file!r} lacks {len(missing)} tensor(s) the model needs, "
                         f"first {missing[0]!r}")
    for key in sorted(slots):
        slot, t = slots[key], state[key]
        if tuple(t.shape) != slot.shape:
            raise ValueError(f"load_adapter: {key!r} has shape {tuple(t.shape)} in {file!r} but "
                             f"{slot.name!r} in the model is {slot.shape}")
        if t.dtype != slot.dtype:
            raise TypeError(f"load_adapter: {key!r} is {t.dtype} in {file!r} but {slot.name!r} in "
                            f"the model is {slot.dtype}; convert the model (e.g. model.to({t.dtype})) "
                            f"before loading")


def _peft_key(path: str, name: str) -> str:
    return PREFIX + join_path(path, name)


def _peft_bias_key(name: str, layers: dict[str, LoRALinear]) -> str:
    owner = name.rpartition(".")[0]
    return _peft_key(owner, "base_layer.bias" if owner in layers else "bias")


# ---------------------------------------------------------------------------------------------
# Files


def _safetensors(caller: str):
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError(f"{caller} needs the safetensors package: pip install safetensors (or, from "
                          f"a fastlora checkout, pip install -e '.[peft]')") from err
    return safetensors.torch


def _replace_files(directory: str, writers: dict) -> None:
    """For each ``name: write`` in order, ``write(tmp)`` to a temporary file in ``directory`` and
    flush it to disk; only once all are written, rename each over ``directory/name``, in order.
    A failure before the renames replaces nothing; no temporary file is left behind."""
    tmps = {}
    try:
        for name, write in writers.items():
            tmps[name] = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
            write(tmps[name])
            with open(tmps[name], "rb+") as f:
                os.fsync(f.fileno())
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(directory, name))
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                with contextlib.suppress(OSError):  # keep the error that brought us here
                    os.unlink(tmp)
