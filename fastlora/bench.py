"""Benchmark LoRA linear layers against the floor (the frozen base F.linear alone) and peers.

Used by ``fastlora bench`` and the scripts in benchmarks/. Every provider gets the same inputs and
weights; each is checked against the float64 reference before it is timed, and a provider that
disagrees is reported as wrong instead of timed.

Timing: on CUDA ``triton.testing.do_bench`` (median, p20, p80 over ~100 ms of repeats after a
warm-up). With ``--mode fwd`` and M <= 64 the forward is timed as inference (no_grad) replayed from
a CUDA graph, where launch overhead would otherwise dominate. Weights are rotated among several
copies when one set would fit in L2, so that the floor is not measured from cache. On the CPU the
providers are timed round-robin (interleaved) with perf_counter, and the medians are reported;
on CUDA too when ``cuda_rounds`` > 1 (``fastlora bench --dora`` uses 5): each round times every
provider for rep / rounds ms, and the median (p20, p80) of the rounds' medians is reported.

DoRA (``--dora``): ``fastlora-dora`` (LoRALinear(use_dora=True)) and ``peft-dora`` (PEFT's
LoraConfig(use_dora=True)) get the same magnitude besides the same weights; their ``x peft`` is
against ``peft-dora``, and ``x lora`` is fastlora-dora's time over fastlora's (LoRA) in the run.

With a 4-bit base (``--base nf4`` or ``fp4``: QLoRA) the LoRA providers hold the frozen weight in
bitsandbytes' format (blocks of 64, nested absmax), all of them the same bytes: ``peft`` is PEFT's
LoRA over bitsandbytes' Linear4bit, ``fastlora`` (and the route-forcing ones) LoRALinear4bit; the
floor stays the 16-bit base's F.linear. They are checked against the float64 reference on the
dequantized weight, and ``W MB`` reports the bytes each holds the frozen weight in.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .linear4bit import LoRALinear4bit
from .modules import LoRALinear
from .reference import LoRALinearReference, dora_linear_reference, lora_linear_reference

# The frozen weight of a bench problem: 16-bit ("dense") or 4-bit in bitsandbytes' format.
BASES = ("dense", "nf4", "fp4")
# Providers that run over a 4-bit base (the floor, "base", is the dense F.linear in every case).
PROVIDERS_4BIT = ("base", "peft", "fastlora", "fastlora-fused", "fastlora-split", "fastlora-torch")

PRESETS = {
    "llama-7b": [(4096, 4096), (4096, 11008)],
    "llama3-8b": [(4096, 4096), (4096, 14336), (14336, 4096)],
    "llama": [(4096, 4096), (4096, 11008), (4096, 14336)],
    "small": [(1024, 1024)],
    # the GPU-speed bars' shapes (in -> out)
    "bars": [(4096, 4096), (4096, 14336)],
}
PROVIDERS = ("base", "reference", "peft", "compiled", "fastlora", "fastlora-fused", "fastlora-split",
             "fastlora-torch", "fastlora-dora", "peft-dora")
# The DoRA providers, and the providers ``--dora`` runs by default (fastlora: the LoRA it is timed
# against).
DORA_PROVIDERS = ("fastlora-dora", "peft-dora")
DORA_DEFAULT = ("base", "fastlora", "fastlora-dora", "peft-dora")
# fastlora's providers and the backend each forces: "fastlora" is the default ("auto": on CUDA the
# Triton route the route table picks per pass), the others one route each.
FASTLORA_BACKENDS = {"fastlora": "auto", "fastlora-fused": "fused", "fastlora-split": "split",
                     "fastlora-torch": "torch"}
MODES = ("fwd", "bwd", "full")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# Agreement with the float64 reference required before timing, relative to max |ref|.
CHECK_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}


@dataclass
class Row:
    shape: str          # "M,IN,OUT"
    M: int
    in_features: int
    out_features: int
    rank: int
    dtype: str
    mode: str
    dropout: float
    provider: str
    status: str         # "ok" | "wrong" | "unavailable" | "error"
    ms: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    ratio_to_base: float = math.nan
    speedup_over_peft: float = math.nan  # DoRA providers: over peft-dora
    ratio_to_lora: float = math.nan      # fastlora-dora: over fastlora (LoRA) in the same run
    tflops: float = math.nan
    mem_over_base_mb: float = math.nan   # NaN on CPU: unmeasured
    max_rel_err: float = math.nan
    note: str = ""
    base: str = "dense"                  # the frozen weight: dense, nf4 or fp4
    weight_mb: float = math.nan          # bytes the provider holds the frozen weight in


def flops(M: int, K: int, N: int, r: int, mode: str, lora: bool, dora: bool = False) -> float:
    """Multiply-adds x2 of the base GEMM(s) and, for LoRA providers, the low-rank terms (DoRA: and
    the norm's W A^T)."""
    fwd = 2 * M * K * N + (2 * M * K * r + 2 * M * r * N if lora else 0) + (2 * N * K * r if dora else 0)
    # backward with W frozen: dX = dY W (+ (dY B) A), dA = (dY B)^T x, dB = dY^T xa
    bwd = 2 * M * N * K + (2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r if lora else 0)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


# ------------------------------------------------------------------------------------------------
# providers: each builds a module computing y = f(x) from the same weights


@dataclass
class Weights:
    weight: torch.Tensor
    bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout: float
    magnitude: torch.Tensor  # DoRA's: ||W + s B A||_row, each feature off by up to 10%
    w4: object = None   # the weight in 4 bits (fastlora.quant4bit.Weight4bit) for a 4-bit base

    @property
    def frozen(self) -> torch.Tensor:
        """The frozen weight the LoRA providers compute with: ``weight``, or the 4-bit one
        dequantized (float32)."""
        return self.weight if self.w4 is None else self.w4.dequantize(torch.float32)


def make_weights(K: int, N: int, r: int, dtype, device, dropout: float, seed: int = 0,
                 base: str = "dense") -> Weights:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    w, b, a, bb = rnd(N, K, scale=K ** -0.5), rnd(N, scale=1.0), rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
    m = torch.linalg.norm(w + 2.0 * bb @ a, dim=1) * (0.9 + 0.2 * torch.rand(N, generator=g))
    weights = Weights(*(t.to(device=device, dtype=dtype) for t in (w, b, a, bb)), scaling=2.0,
                      dropout=dropout, magnitude=m.to(device=device, dtype=dtype))
    if base != "dense":
        from .quant4bit import quantize
        weights.w4 = quantize(weights.weight, base, 64, double_quant=True)
    return weights


def bnb_linear4bit(w4, bias: torch.Tensor | None, compute_dtype=None) -> nn.Module:
    """bitsandbytes' Linear4bit holding the 4-bit weight ``w4`` (its tensors, not a copy) and
    ``bias``: the bytes fastlora's providers use, in bitsandbytes' objects."""
    import bitsandbytes as bnb  # optional extra "qlora"

    F = bnb.functional
    n = w4.nested
    state = F.QuantState(absmax=w4.absmax, shape=torch.Size(w4.shape), code=w4.code, blocksize=w4.blocksize,
                         quant_type=w4.quant_type, dtype=w4.dtype,
                         offset=None if n is None else n.offset.reshape(()),
                         state2=None if n is None else F.QuantState(absmax=n.scale, code=n.code,
                                                                    blocksize=n.blocksize,
                                                                    dtype=torch.float32))
    layer = bnb.nn.Linear4bit(w4.in_features, w4.out_features, bias=bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=n is not None,
                              quant_type=w4.quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(w4.packed, requires_grad=False, quant_state=state,
                                     blocksize=w4.blocksize, compress_statistics=n is not None,
                                     quant_type=w4.quant_type, bnb_quantized=True, module=layer)
    layer.quant_state = state
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def build(provider: str, w: Weights) -> tuple[Callable, list[torch.Tensor]]:
    """(module, its trainable tensors) for ``provider``, sharing w's tensors where it can."""
    N, K = w.weight.shape
    r = w.lora_A.shape[0]
    if provider == "base":
        return (lambda x: nn.functional.linear(x, w.weight, w.bias)), []
    if w.w4 is not None:
        return _build_4bit(provider, w)
    if provider in ("reference", "compiled"):
        m = LoRALinearReference(K, N, r=r, alpha=w.scaling * r, dropout=w.dropout,
                                device=w.weight.device, dtype=w.weight.dtype)
        _share(m, w)
        params = [m.lora_A, m.lora_B]
        return (torch.compile(m) if provider == "compiled" else m), params
    if provider in FASTLORA_BACKENDS or provider == "fastlora-dora":
        dora = provider == "fastlora-dora"
        m = LoRALinear(K, N, r=r, alpha=w.scaling * r, dropout=w.dropout,
                       backend=FASTLORA_BACKENDS.get(provider, "auto"), device=w.weight.device,
                       dtype=w.weight.dtype, use_dora=dora)
        _share(m, w)
        if dora:
            m.lora_magnitude_vector = nn.Parameter(w.magnitude.clone())
        return m, [m.lora_A, m.lora_B] + ([m.lora_magnitude_vector] if dora else [])
    if provider in ("peft", "peft-dora"):
        import peft  # optional extra "bench"

        dora = provider == "peft-dora"
        holder = nn.Module()
        holder.proj = nn.Linear(K, N, device=w.weight.device, dtype=w.weight.dtype)
        cfg = peft.LoraConfig(r=r, lora_alpha=w.scaling * r, lora_dropout=w.dropout, target_modules=["proj"],
                              use_dora=dora)
        model = peft.get_peft_model(holder, cfg)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.base_layer.weight = nn.Parameter(w.weight, requires_grad=False)
            layer.base_layer.bias = nn.Parameter(w.bias, requires_grad=False)
            layer.lora_A["default"].weight = nn.Parameter(w.lora_A.clone())
            layer.lora_B["default"].weight = nn.Parameter(w.lora_B.clone())
            if dora:
                layer.lora_magnitude_vector["default"].weight = nn.Parameter(w.magnitude.clone())
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return layer, params + ([layer.lora_magnitude_vector["default"].weight] if dora else [])
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def _build_4bit(provider: str, w: Weights) -> tuple[Callable, list[torch.Tensor]]:
    """The LoRA providers over the 4-bit weight ``w.w4`` (every one the same bytes)."""
    from .linear4bit import Linear4bit

    r = w.lora_A.shape[0]
    if provider in FASTLORA_BACKENDS:
        m = LoRALinear4bit(Linear4bit(w.w4, w.bias), r=r, alpha=w.scaling * r, dropout=w.dropout,
                           backend=FASTLORA_BACKENDS[provider])
        with torch.no_grad():
            m.lora_A = nn.Parameter(w.lora_A.clone())
            m.lora_B = nn.Parameter(w.lora_B.clone())
        return m, [m.lora_A, m.lora_B]
    if provider == "peft":
        import peft

        holder = nn.Module()
        holder.proj = bnb_linear4bit(w.w4, w.bias)
        holder.is_loaded_in_4bit = True  # what PEFT reads to wrap a bitsandbytes Linear4bit
        cfg = peft.LoraConfig(r=r, lora_alpha=w.scaling * r, lora_dropout=w.dropout, target_modules=["proj"])
        layer = peft.get_peft_model(holder, cfg).base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight = nn.Parameter(w.lora_A.clone())
            layer.lora_B["default"].weight = nn.Parameter(w.lora_B.clone())
        return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    raise ValueError(f"provider {provider!r} does not run over a 4-bit base; expected one of {PROVIDERS_4BIT}")


def _share(m: nn.Module, w: Weights) -> None:
    with torch.no_grad():
        m.weight = nn.Parameter(w.weight, requires_grad=False)
        m.bias = nn.Parameter(w.bias, requires_grad=False)
        m.lora_A = nn.Parameter(w.lora_A.clone())
        m.lora_B = nn.Parameter(w.lora_B.clone())


def provider_available(provider: str, device: torch.device, base: str = "dense") -> str | None:
    """None if the provider can run here (over a ``base`` weight), else why not."""
    if base != "dense" and provider not in PROVIDERS_4BIT:
        return f"not over a 4-bit base (those are {', '.join(PROVIDERS_4BIT)})"
    if base != "dense" and provider == "peft":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return ("bitsandbytes not installed (pip install bitsandbytes, or from a fastlora checkout "
                    "pip install -e '.[qlora]')")
    if provider in ("peft", "peft-dora"):
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft not installed (pip install peft, or from a fastlora checkout pip install -e '.[bench]')"
    if provider in ("fastlora-fused", "fastlora-split"):
        from .routes import triton_kernels
        kernels = triton_kernels()
        if kernels is None:
            return "triton not installed"
        if device.type != "cuda" and not kernels.INTERPRETED:
            return "the Triton routes need CUDA (or TRITON_INTERPRET=1)"
    if provider == "compiled" and device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile needs triton on CUDA"
    return None


# ------------------------------------------------------------------------------------------------
# timing


def sample_stats(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of timing samples."""
    q = statistics.quantiles(samples_ms, n=10) if len(samples_ms) >= 2 else [samples_ms[0]] * 9
    return statistics.median(samples_ms), q[1], q[7]


# ATen calls that allocate or make views: no kernel launched
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "view", "_unsafe_view", "reshape",
              "_reshape_alias", "t", "transpose", "permute", "as_strided", "select", "slice",
              "expand", "unsqueeze", "squeeze", "detach", "alias", "lift_fresh"}


class KernelCalls(TorchDispatchMode):
    """The ATen calls of a region that launch kernels (cuBLAS, sums, casts, copies: every call
    below autograd but allocations and views), by name in ``calls``: with a call's Triton launches,
    what its host time pays for (benchmarks/gpu_diag.py, tests/launch_check.py --count)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_KERNEL:
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def time_cuda(fn: Callable, graph: bool, rep: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn`` on the current CUDA device: with ``graph``, its replay
    from a CUDA graph (GPU time alone, what a launch-bound call costs once captured), else its
    eager calls (host time included where the host is slower than the GPU)."""
    import triton.testing

    if graph:
        fn()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            ms = triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return tuple(ms)
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def _peak_mb(fn: Callable) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@dataclass
class Spec:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    mode: str
    dropout: float
    base: str = "dense"


def _callables(provider: str, spec: Spec, device, n_sets: int):
    """Timed closure(s) for one provider, plus its output/grad check closure."""
    sets = []
    for i in range(n_sets):
        w = make_weights(spec.K, spec.N, spec.r, spec.dtype, device, spec.dropout, seed=i,
                         base="dense" if provider == "base" else spec.base)  # the floor: 16-bit
        module, params = build(provider, w)
        sets.append((w, module, params))
    g = torch.Generator(device="cpu").manual_seed(123)
    x = torch.randn(spec.M, spec.K, generator=g).to(device=device, dtype=spec.dtype).requires_grad_(True)
    dy = torch.randn(spec.M, spec.N, generator=g).to(device=device, dtype=spec.dtype)
    inference = spec.mode == "fwd" and device.type == "cuda" and spec.M <= 64
    counter = [0]

    def next_set():
        counter[0] = (counter[0] + 1) % n_sets
        return sets[counter[0]]

    if spec.mode == "fwd":
        if inference:
            def fn():
                with torch.no_grad():
                    for _, module, _ in sets:  # a CUDA graph replays all sets; time is per set
                        module(x)
        else:
            def fn():
                return next_set()[1](x)
    elif spec.mode == "bwd":
        outs = [(module(x), [x, *params]) for _, module, params in sets]

        def fn():
            y, inputs = outs[counter[0]]
            counter[0] = (counter[0] + 1) % n_sets
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)
    else:
        def fn():
            _, module, params = next_set()
            return torch.autograd.grad(module(x), [x, *params], dy)

    def check() -> float:
        """max |provider - ref64| / max |ref64| over y and, with backward, dx, dA, dB (DoRA: dm)
        (dropout disabled: the masks of different providers differ by design)."""
        w, module, params = sets[0]
        if provider == "base":
            return 0.0
        was_training = getattr(module, "training", True)
        _set_dropout(module, 0.0)
        try:
            y = module(x)
            xd = x.detach().double().requires_grad_(True)
            ref = [t.double().requires_grad_(True) for t in (w.lora_A, w.lora_B, w.magnitude)]
            if provider in DORA_PROVIDERS:
                y64 = dora_linear_reference(xd, w.frozen, w.bias, ref[0], ref[1], w.scaling, ref[2],
                                            upcast=True)
            else:
                y64 = lora_linear_reference(xd, w.frozen, w.bias, ref[0], ref[1], w.scaling, upcast=True)
                ref = ref[:2]
            errs = [_rel(y, y64)]
            if spec.mode != "fwd":
                got = torch.autograd.grad(y, [x, *params], dy)
                want = torch.autograd.grad(y64, [xd, *ref], dy.double())
                errs += [_rel(a, b) for a, b in zip(got, want)]
            return max(errs)
        finally:
            _set_dropout(module, spec.dropout)
            if hasattr(module, "train"):
                module.train(was_training)

    w = sets[0][0]
    held = w.w4.nbytes() if w.w4 is not None else w.weight.numel() * w.weight.element_size()
    return fn, check, inference, held / 2**20


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.detach().abs().max().item() or 1.0
    err = (got.detach().double() - ref.detach().double()).abs().max().item()
    return err / scale if math.isfinite(err) else math.inf


def _set_dropout(module, p: float) -> None:
    """Dropout of a provider module, whatever its kind (ours, the reference, PEFT's, compiled)."""
    target = getattr(module, "_orig_mod", module)
    if isinstance(target, (LoRALinear, LoRALinear4bit)):
        target.dropout = p
    elif isinstance(target, LoRALinearReference):
        target.dropout.p = p
    elif hasattr(target, "lora_dropout"):
        for d in target.lora_dropout.values():
            if isinstance(d, nn.Dropout):
                d.p = p


def _n_weight_sets(spec: Spec, device) -> int:
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    set_bytes = (spec.N * spec.K + spec.r * (spec.N + spec.K)) * spec.dtype.itemsize
    if spec.base != "dense":  # the 4-bit providers read half a byte a weight: more sets
        return max(1, min(16, math.ceil(2 * l2 / (set_bytes / 4))))
    return max(1, min(8, math.ceil(2 * l2 / set_bytes)))


def run(shapes: list[tuple[int, int, int]], ranks: list[int], dtype: torch.dtype, modes: list[str],
        providers: list[str], device: torch.device, dropout: float = 0.0, cpu_rounds: int = 15,
        cuda_rep: float = 100, progress: Callable[[str], None] | None = None,
        cuda_rounds: int = 1, base: str = "dense") -> list[Row]:
    """One Row per (shape, rank, mode, provider). ``cuda_rep``: ms of timed repeats on CUDA, in
    ``cuda_rounds`` interleaved rounds; ``base``: the frozen weight, "dense" or 4-bit ("nf4",
    "fp4")."""
    rows: list[Row] = []
    jobs = [(s, r, m) for s in shapes for r in ranks for m in modes]
    for i, ((M, K, N), r, mode) in enumerate(jobs):
        spec = Spec(M, K, N, r, dtype, mode, dropout, base)
        if progress:
            progress(f"[{i + 1}/{len(jobs)}] M={M} {K}->{N} r={r} {mode}")
        rows += _run_one(spec, providers, device, cpu_rounds, cuda_rep, cuda_rounds)
    return rows


def _run_one(spec: Spec, providers: list[str], device, cpu_rounds: int, cuda_rep: float,
             cuda_rounds: int = 1) -> list[Row]:
    dname = next(k for k, v in DTYPES.items() if v == spec.dtype)
    base = dict(shape=f"{spec.M},{spec.K},{spec.N}", M=spec.M, in_features=spec.K, out_features=spec.N,
                rank=spec.r, dtype=dname, mode=spec.mode, dropout=spec.dropout, base=spec.base)
    n_sets = _n_weight_sets(spec, device)
    rows, timed = {}, {}
    for p in providers:
        why = provider_available(p, device, spec.base)
        if why:
            rows[p] = Row(**base, provider=p, status="unavailable", note=why)
            continue
        try:
            fn, check, inference, weight_mb = _callables(p, spec, device, n_sets)
            err = check()
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            rows[p] = Row(**base, provider=p, status="error", note=f"{type(e).__name__}: {e}"[:200])
            continue
        tol = CHECK_RTOL[spec.dtype]
        if not err <= tol:
            rows[p] = Row(**base, provider=p, status="wrong", max_rel_err=err,
                          note=f"max rel err {err:.3g} > {tol:g} vs float64 reference")
            continue
        rows[p] = Row(**base, provider=p, status="ok", max_rel_err=err, weight_mb=weight_mb,
                      note="inference, CUDA graph" if inference else "")
        timed[p] = (fn, inference)

    if device.type == "cuda" and cuda_rounds > 1:
        medians = {p: [] for p in timed}
        for _ in range(cuda_rounds):  # interleaved: every provider once a round
            for p, (fn, inference) in timed.items():
                medians[p].append(time_cuda(fn, inference, cuda_rep / cuda_rounds)[0] / (n_sets if inference else 1))
        for p, (fn, _) in timed.items():
            rows[p].ms, rows[p].ms_p20, rows[p].ms_p80 = sample_stats(medians[p])
            rows[p].mem_over_base_mb = _peak_mb(fn)
    elif device.type == "cuda":
        for p, (fn, inference) in timed.items():
            med, p20, p80 = (t / (n_sets if inference else 1) for t in time_cuda(fn, inference, cuda_rep))
            rows[p].ms, rows[p].ms_p20, rows[p].ms_p80 = med, p20, p80
            rows[p].mem_over_base_mb = _peak_mb(fn)
    if device.type == "cuda":
        if "base" in timed:
            for p in timed:
                rows[p].mem_over_base_mb -= rows["base"].mem_over_base_mb if p != "base" else 0.0
            rows["base"].mem_over_base_mb = 0.0
    else:
        samples = {p: [] for p in timed}
        for fn, _ in timed.values():  # warm-up (and torch.compile) outside the timing
            fn()
            fn()
        for _ in range(cpu_rounds):       # interleaved: one sample of each provider per round
            for p, (fn, _) in timed.items():
                t0 = time.perf_counter()
                fn()
                samples[p].append((time.perf_counter() - t0) * 1e3)
        for p in timed:
            rows[p].ms, rows[p].ms_p20, rows[p].ms_p80 = sample_stats(samples[p])

    for p, row in rows.items():
        if row.status != "ok":
            continue
        dora = p in DORA_PROVIDERS
        row.tflops = flops(spec.M, spec.K, spec.N, spec.r, spec.mode, p != "base", dora) / (row.ms * 1e-3) / 1e12
        if "base" in timed:
            row.ratio_to_base = row.ms / rows["base"].ms
        peer = "peft-dora" if dora else "peft"
        if peer in timed:
            row.speedup_over_peft = rows[peer].ms / row.ms
        if p == "fastlora-dora" and "fastlora" in timed:
            row.ratio_to_lora = row.ms / rows["fastlora"].ms
    return [rows[p] for p in providers if p in rows]


# ------------------------------------------------------------------------------------------------
# reporting


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = _cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "machine": machine, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "commit": commit}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def format_table(rows: list[Row], env: dict) -> str:
    head = (f"fastlora bench | {env['machine']} ({env['device']}) | torch {env['torch']} | "
            f"triton {env['triton']} | commit {env['commit']} | {env['date']}")
    dora = any(r.provider in DORA_PROVIDERS for r in rows)
    four_bit = any(r.base != "dense" for r in rows)  # then: the base and the frozen weight's bytes
    cols = ["shape", "r", "dtype", *(["base"] if four_bit else []), "mode", "provider", "ms", "p20-p80",
            "x base", "x peft", *(["x lora"] if dora else []), "TFLOP/s", "+MB",
            *(["W MB"] if four_bit else []), "status"]
    lines = [[r.shape, str(r.rank), r.dtype, *([r.base] if four_bit else []), r.mode, r.provider,
              fmt_number(r.ms, ".4g"), f"{fmt_number(r.ms_p20, '.4g')}-{fmt_number(r.ms_p80, '.4g')}",
              fmt_number(r.ratio_to_base, ".3f"), fmt_number(r.speedup_over_peft, ".2f"),
              *([fmt_number(r.ratio_to_lora, ".3f")] if dora else []),
              fmt_number(r.tflops, ".3g"), fmt_number(r.mem_over_base_mb, ".1f"),
              *([fmt_number(r.weight_mb, ".3g")] if four_bit else []),
              r.status + (f" ({r.note})" if r.note and r.status != "ok" else "")] for r in rows]
    return text_table(head, cols, lines)


def text_table(head: str, cols: list[str], lines: list[list[str]]) -> str:
    """``head``, then the columns right-aligned (the last left-aligned) under a rule."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]

    def fmt(vals):
        return "  ".join(v.rjust(w) if i < len(vals) - 1 else v for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([head, fmt(cols), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def fmt_number(v: float, spec: str) -> str:
    """``v`` formatted, or "-" when it was not measured (NaN)."""
    return "-" if v is None or math.isnan(v) else format(v, spec)


def write_json(path: str, rows: list, env: dict) -> None:
    """``{"environment": env, "rows": [...]}``, rows being dataclasses; NaN written as null."""
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": [_jsonable(dataclasses.asdict(r)) for r in rows]}, f, indent=1)


def _jsonable(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_csv(path: str, rows: list, env: dict) -> None:
    """One line per row (dataclasses of one type), the environment repeated on each."""
    import csv

    fields = [f.name for f in dataclasses.fields(rows[0])] + list(env) if rows else list(env)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**dataclasses.asdict(r), **env})


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or a RuntimeError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib, or from a fastlora "
                           "checkout pip install -e '.[bench]')") from e
    return plt


def plot(path: str, rows: list[Row]):
    """Ratio to base against M, one panel per (shape, rank, dtype, mode, dropout), a line per
    provider; saved to ``path``. Returns the figure."""
    plt = pyplot()
    panels = sorted({(r.in_features, r.out_features, r.rank, r.dtype, r.mode, r.dropout) for r in rows})
    cols = min(3, len(panels)) or 1
    nrows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        sel = [r for r in rows if (r.in_features, r.out_features, r.rank, r.dtype, r.mode, r.dropout) == key
               and r.status == "ok" and not math.isnan(r.ratio_to_base)]
        for prov in PROVIDERS:
            pts = sorted((r.M, r.ratio_to_base) for r in sel if r.provider == prov)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{key[0]}->{key[1]} r={key[2]} {key[3]} {key[4]}"
                     + (f" dropout {key[5]:g}" if key[5] else ""), fontsize=9)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("time / base F.linear")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def progress_printer(stream=sys.stderr) -> Callable[[str], None]:
    """A one-line progress display (rewritten in place on a terminal)."""
    tty = stream.isatty()

    def show(msg: str) -> None:
        stream.write(("\r\033[K" if tty else "") + msg + ("" if tty else "\n"))
        stream.flush()

    return show
