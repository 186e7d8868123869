"""LoRA on a whole model: inject LoRA layers, choose what trains, merge and unload.

Module paths are those of ``model.named_modules()``; matching follows PEFT's LoraConfig so that the
same ``target_modules`` selects the same layers in both libraries. An nn.Linear becomes a
LoRALinear; a 4-bit linear (fastlora's or bitsandbytes' Linear4bit) a LoRALinear4bit over it.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .linear4bit import ADAPTER_DTYPE, LoRALinear4bit, is_4bit_linear, weight4bit
from .modules import LoRALinear, has_own_forward

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"
# The LoRA layer types the model helpers handle.
LORA_LAYERS = (LoRALinear, LoRALinear4bit)


def apply_lora(model: nn.Module, target_modules: str | Iterable[str], *, r: int = 8,
               alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False,
               exclude_modules: str | Iterable[str] | None = None,
               init_lora_weights: bool | str = True, backend: str = "auto",
               use_dora: bool = False) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by LoRA layers, in place.

    Each LoRALinear shares its base layer's weight and bias Parameters (no copy); a 4-bit base
    (fastlora's or bitsandbytes' Linear4bit) is kept whole inside a LoRALinear4bit. Afterwards only
    the LoRA parameters train, as after PEFT's ``get_peft_model``: every other parameter of the model
    gets ``requires_grad=False`` (``mark_only_lora_as_trainable`` can make biases train too).

    Args:
        target_modules: a list of names, each matching a module whose path equals it or ends with
            "." + name (PEFT's rule); a string, matched as a regex against the whole path; or
            "all-linear": every nn.Linear (4-bit ones included) except the output head
            (``model.get_output_embeddings()`` where the model has it, as PEFT does for transformers
            models).
        exclude_modules: modules not to target, in the same forms (no "all-linear").
        r, alpha, dropout, use_rslora, init_lora_weights, backend, use_dora: as LoRALinear
            (``use_dora=True``: DoRA, as PEFT's LoraConfig(use_dora=True); docs/dora.md).

    Returns ``model`` (a new LoRA layer if ``model`` itself is a targeted linear layer).
    """
    check_model("apply_lora", model)
    paths = select_targets(model, target_modules, exclude_modules, "apply_lora")
    return inject_lora(model, paths, lambda path: (r, alpha),
                       dict(dropout=dropout, use_rslora=use_rslora,
                            init_lora_weights=init_lora_weights, backend=backend, use_dora=use_dora))


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Make the LoRA parameters of ``model`` (DoRA's magnitudes too) trainable and freeze every other
    parameter.

    ``bias``: "none" (biases frozen), "all" (every parameter named ``bias`` trains) or
    "lora_only" (the biases of the LoRA layers train), as PEFT's LoraConfig.bias.
    """
    check_model("mark_only_lora_as_trainable", model)
    check_bias("mark_only_lora_as_trainable", bias)
    layers = lora_layers(model, "mark_only_lora_as_trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if layer.lora_magnitude_vector is not None:
            layer.lora_magnitude_vector.requires_grad_(True)
    for p in bias_parameters(model, layers, bias).values():
        p.requires_grad_(True)


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter's tensors only, keyed as in ``model.state_dict()``: every LoRA layer's
    ``lora_A`` and ``lora_B`` (and DoRA's ``lora_magnitude_vector``), plus the biases that ``bias``
    (as mark_only_lora_as_trainable) trains."""
    check_model("lora_state_dict", model)
    check_bias("lora_state_dict", bias)
    layers = lora_layers(model, "lora_state_dict")
    out = {}
    for path, layer in layers.items():
        out[join_path(path, "lora_A")] = layer.lora_A.detach()
        out[join_path(path, "lora_B")] = layer.lora_B.detach()
        if layer.lora_magnitude_vector is not None:
            out[join_path(path, "lora_magnitude_vector")] = layer.lora_magnitude_vector.detach()
    out.update({name: p.detach() for name, p in bias_parameters(model, layers, bias).items()})
    return out


def merge(model: nn.Module) -> None:
    """Fold every LoRA layer's ``s B A`` into its weight (DoRA: W' = m o (W + s B A) /
    ||W + s B A||_row; see LoRALinear.merge); all or nothing:
    if one layer's merged weight is not finite, the layers merged before it are unmerged again.

    A LoRA layer whose weight shares memory with another parameter or buffer of the model (tied
    weights) is refused before anything changes: the merge writes into the weight in place, so the
    other module would compute with this layer's update, and two LoRA layers' updates would land in
    the one tensor, which unmerge could not undo."""
    check_model("merge", model)
    _merge(model, lora_layers(model, "merge"), "merge")


def unmerge(model: nn.Module) -> None:
    """Restore every merged LoRA layer's weight bit-exactly (see LoRALinear.unmerge)."""
    check_model("unmerge", model)
    for layer in lora_layers(model, "unmerge").values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put a plain nn.Linear back in its place, in place.

    The nn.Linear holds the LoRALinear's weight and bias Parameters (now merged); the adapters and
    the copies kept for unmerge are dropped. A LoRALinear4bit gives its 4-bit base back, the
    adapter requantized into it (LoRALinear4bit.merge). Returns ``model`` (the nn.Linear if
    ``model`` itself is a LoRA layer). ``requires_grad`` flags are left as they are.
    """
    check_model("merge_and_unload", model)
    layers = lora_layers(model, "merge_and_unload")
    _merge(model, layers, "merge_and_unload")
    for path, layer in layers.items():
        if isinstance(layer, LoRALinear4bit):
            model = _replace(model, path, layer.base_layer)
            continue
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        layer._weight_before_merge = None
        model = _replace(model, path, linear)
    return model


def _merge(model: nn.Module, layers: dict[str, nn.Module], caller: str) -> None:
    _check_untied(model, layers, caller)
    done = []
    for path, layer in layers.items():
        if layer.merged:
            continue
        try:
            layer.merge()
        except ValueError as err:
            for merged in reversed(done):
                merged.unmerge()
            raise ValueError(f"{caller}: layer {path or '<root>'!r}: {err}") from None
        done.append(layer)


def _check_untied(model: nn.Module, layers: dict[str, nn.Module], caller: str) -> None:
    """A ValueError if a LoRALinear's weight overlaps in memory with any other named parameter or
    buffer of ``model`` (the same Parameter under two names, or views of one tensor that overlap).
    One layer reached by two paths (a reused block) is one update, not a tie. (A 4-bit base's
    tensors are its own: nothing else computes with them.)"""
    def span(t):  # the bytes t's elements occupy
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    by_storage = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:
        if t.numel() and t.device.type != "meta":
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((name, t))
    own_names = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoRALinear):
            own_names.setdefault(id(module), set()).add(join_path(path, "weight"))
    for path, layer in layers.items():
        if not isinstance(layer, LoRALinear):
            continue
        w = layer.weight
        if not w.numel() or w.device.type == "meta":
            continue
        start, end = span(w)
        others = [name for name, t in by_storage.get((w.device, w.untyped_storage().data_ptr()), [])
                  if name not in own_names[id(layer)] and span(t)[0] < end and start < span(t)[1]]
        if others:
            raise ValueError(
                f"{caller}: layer {path or '<root>'!r} shares its weight with {', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''} (tied weights): merging writes into the weight "
                f"in place, so the update would reach the other module too and could not be undone "
                f"exactly; nothing was merged. Keep the model unmerged, or untie the weights (give "
                f"each module its own copy) before apply_lora")


def lora_layers(model: nn.Module, caller: str = "lora_layers") -> dict[str, nn.Module]:
    """Every LoRA layer (LoRALinear, LoRALinear4bit) of ``model`` by module path; a ValueError
    naming ``caller`` if none."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, LORA_LAYERS)}
    if not layers:
        raise ValueError(f"{caller}: model ({type(model).__name__}) has no LoRA layers; "
                         f"add them with fastlora.apply_lora first")
    return layers


# ---------------------------------------------------------------------------------------------
# Selection: which module paths a target_modules / exclude_modules specification picks


def select_targets(model: nn.Module, target_modules, exclude_modules, caller: str) -> list[str]:
    """The paths of the linear modules to adapt (PEFT's matching rules), in module order: nn.Linear
    layers and 4-bit ones (fastlora's or bitsandbytes' Linear4bit)."""
    modules = dict(model.named_modules())
    paths = list(modules)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head(model)
        picked = [p for p, m in modules.items()
                  if (isinstance(m, nn.Linear) or is_4bit_linear(m)) and m is not head]
        if not picked:
            raise ValueError(f"{caller}: target_modules='all-linear' found no nn.Linear in the model "
                             f"(other than its output head)")
    else:
        picked = _match(paths, target_modules, "target_modules", caller)
    if exclude_modules is not None:
        if isinstance(exclude_modules, str) and exclude_modules.lower() == ALL_LINEAR:
            raise ValueError(f"{caller}: exclude_modules cannot be 'all-linear'")
        excluded = set(_match(paths, exclude_modules, "exclude_modules", caller))
        picked = [p for p in picked if p not in excluded]
    if not picked:
        raise ValueError(f"{caller}: target_modules={target_modules!r} minus exclude_modules="
                         f"{exclude_modules!r} leaves no module to adapt")
    wrong = [f"{p or '<root>'} ({type(modules[p]).__name__})" for p in picked
             if not (isinstance(modules[p], nn.Linear) or is_4bit_linear(modules[p]))]
    if wrong:
        already = any(isinstance(modules[p], LORA_LAYERS) for p in picked)
        hint = " (LoRA is already applied there)" if already else ""
        raise TypeError(f"{caller}: target_modules matched modules that are not nn.Linear{hint}: "
                        f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; only nn.Linear "
                        f"layers (and 4-bit Linear4bit ones) can be adapted")
    four_bit = {p for p in picked if is_4bit_linear(modules[p])}
    # other nn.Linear subclasses with packed weights (8-bit, GPTQ, ...) are not F.linear
    packed = [f"{p or '<root>'} ({type(modules[p]).__name__}, {type(modules[p].weight).__name__} "
              f"of {modules[p].weight.dtype})" for p in picked if p not in four_bit
              and (type(modules[p].weight.data) is not torch.Tensor
                   or not modules[p].weight.dtype.is_floating_point)]
    if packed:
        raise TypeError(f"{caller}: target_modules matched linear layers whose weight is not a plain "
                        f"floating-point tensor (quantized?): {', '.join(packed[:5])}; fastlora "
                        f"needs a float16/bfloat16/float32/float64 weight, or a 4-bit one "
                        f"(bitsandbytes' NF4/FP4 Linear4bit)")
    own = [f"{p or '<root>'} ({type(modules[p]).__qualname__})" for p in picked
           if p not in four_bit and has_own_forward(modules[p])]
    if own:
        raise TypeError(f"{caller}: target_modules matched nn.Linear subclasses with a forward of their "
                        f"own, which a LoRALinear (F.linear) would drop: {', '.join(own[:5])}"
                        f"{' ...' if len(own) > 5 else ''}; exclude them (exclude_modules)")
    return picked


def _match(paths: list[str], spec, arg: str, caller: str) -> list[str]:
    """Paths matching ``spec``: a regex string (full match) or names (equal or '.'-suffix match).
    Every name, and a regex, must match something: the error lists close names."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{caller}: {arg} {spec!r} is not a valid regular expression: {err}") from None
        found = [p for p in paths if p and pattern.fullmatch(p)]
        if not found:
            raise ValueError(f"{caller}: {arg} regex {spec!r} matches no module path (it must "
                             f"match the whole path, e.g. {_example_paths(paths)})")
        return found
    if isinstance(spec, (bytes, dict)) or not isinstance(spec, Iterable):
        raise TypeError(f"{caller}: {arg} must be a list of module names or a regex string, got "
                        f"{type(spec).__name__}")
    names = list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{caller}: {arg} must be a non-empty list of non-empty strings, got {spec!r}")
    found = set()
    for name in names:
        hits = {p for p in paths if p and (p == name or p.endswith("." + name))}
        if not hits:
            short = sorted({p.rsplit(".", 1)[-1] for p in paths if p} | set(p for p in paths if p))
            close = difflib.get_close_matches(name, short, n=5)
            hint = f"close names: {close}" if close else f"module names look like {_example_paths(paths)}"
            raise ValueError(f"{caller}: {arg} name {name!r} matches no module; {hint}")
        found |= hits
    return [p for p in paths if p in found]


def _example_paths(paths: list[str], n: int = 4) -> str:
    return ", ".join(repr(p) for p in paths[1:n + 1]) + (", ..." if len(paths) > n + 1 else "")


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (lm_head), which PEFT's 'all-linear' leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


# ---------------------------------------------------------------------------------------------
# Surgery


def inject_lora(model: nn.Module, paths: list[str], r_alpha: Callable[[str], tuple[int, float]],
            layer_kwargs: dict) -> nn.Module:
    """Replace each linear layer at ``paths`` by a LoRA layer over it (a LoRALinear sharing an
    nn.Linear's Parameters, a LoRALinear4bit holding a 4-bit one), then freeze everything but the
    adapters. All layers are built before any is swapped in, so a bad argument leaves the model
    untouched."""
    modules = dict(model.named_modules())
    new = {}
    for path in paths:
        r, alpha = r_alpha(path)
        if is_4bit_linear(modules[path]):
            kwargs = dict(layer_kwargs)
            if kwargs.pop("use_dora", False):
                raise ValueError(f"apply_lora: DoRA over a 4-bit base is not supported (layer "
                                 f"{path!r} is {type(modules[path]).__name__}); use_dora=False there")
            new[path] = LoRALinear4bit(modules[path], r=r, alpha=alpha, **kwargs)
        else:
            new[path] = LoRALinear.from_linear(modules[path], r=r, alpha=alpha, **layer_kwargs)
    for path, layer in new.items():
        model = _replace(model, path, layer)
    mark_only_lora_as_trainable(model)
    return model


def _replace(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` under ``root``; returns the root (``new`` itself for path "")."""
    if not path:
        return new
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
    return root


def bias_parameters(model: nn.Module, layers: dict[str, nn.Module],
                     bias: str) -> dict[str, nn.Parameter]:
    """The bias Parameters that ``bias`` trains, by their name in model.named_parameters()."""
    if bias == "none":
        return {}
    if bias == "all":
        return {n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")}
    return {join_path(path, "bias"): layer.bias for path, layer in layers.items() if layer.bias is not None}


def lora_features(module: nn.Module) -> tuple[int, int, torch.dtype]:
    """(in_features, out_features, the adapters' dtype) of a LoRA layer over ``module``, a linear
    layer: the weight's dtype over a 16-bit one, ADAPTER_DTYPE (float32) over a 4-bit one."""
    if is_4bit_linear(module):
        w4 = weight4bit(module)
        return w4.in_features, w4.out_features, ADAPTER_DTYPE
    return module.weight.shape[1], module.weight.shape[0], module.weight.dtype


def join_path(path: str, name: str) -> str:
    """``path.name``, or ``name`` at the root (path "")."""
    return f"{path}.{name}" if path else name


def check_model(caller: str, model, arg: str = "model") -> None:
    """A TypeError naming ``caller`` and ``arg`` unless ``model`` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: {arg} must be a torch.nn.Module, got {type(model).__name__}")


def check_bias(caller: str, bias) -> None:
    """A ValueError naming ``caller`` unless ``bias`` is one of BIAS_MODES."""
    if bias not in BIAS_MODES:
        raise ValueError(f"{caller}: bias must be one of {BIAS_MODES}, got {bias!r}")
