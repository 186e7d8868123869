"""Correctness checks shared by the test suite and ``fastlora check``.

The three-way bound (as flash-attention tests): for every output and gradient,

    |fastlora - ref64|_max  <=  2 * |torch_d - ref64|_max  +  atol[d] * max(1, |ref64|_max)

where ref64 is the float64 reference on the same (dtype-d rounded) inputs and torch_d is the same
plain-PyTorch reference computed in dtype d: fastlora may be at most about twice as wrong as
PyTorch itself in that dtype. It adapts to the shape and cannot be loosened into meaninglessness.
A DoRA case (``Case(dora=True)``) holds the magnitude's gradient to the same bound, against PEFT's
formula (``dora_linear_reference``). A QLoRA case (``Case(quant=("nf4", 64, True))``) quantizes W
to 4 bits: the references run on the dequantized W, fastlora on the 4-bit one
(``lora_linear_4bit``, which the 4-bit GEMM reads as it is stored).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from . import dora
from .functional import draw_seed, lora_linear
from .routes import Dropout, resolve
from .reference import dora_linear_reference, lora_linear_reference

# Absolute slack, relative to the output's scale, for when PyTorch's own error happens to be ~0.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    R: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype | None = None   # None: the adapters share x's dtype
    bias: bool = True
    bias_grad: bool = False                    # make the (normally frozen) bias trainable
    layout: str = "contiguous"                 # "contiguous" | "3d" | "transposed" | "sliced"
    scaling: float = 0.5
    dropout_p: float = 0.0
    dora: bool = False                         # DoRA: a magnitude vector, and its gradient
    quant: tuple[str, int, bool] | None = None  # W in 4 bits: (quant_type, blocksize, double_quant)

    @property
    def id(self) -> str:
        name = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
                torch.bfloat16: "bf16"}
        s = f"M{self.M}-K{self.K}-N{self.N}-r{self.R}-{name[self.dtype]}"
        if self.adapter_dtype is not None:
            s += f"-adapters_{name[self.adapter_dtype]}"
        s += "" if self.bias else "-nobias"
        s += "-biasgrad" if self.bias_grad else ""
        s += "" if self.layout == "contiguous" else f"-{self.layout}"
        s += f"-s{self.scaling:g}" if self.scaling != 0.5 else ""
        s += f"-p{self.dropout_p:g}" if self.dropout_p else ""
        s += "-dora" if self.dora else ""
        if self.quant is not None:
            s += f"-{self.quant[0]}bs{self.quant[1]}{'n' if self.quant[2] else ''}"
        return s


@dataclass
class Result:
    case: str
    backend: str
    tensor: str
    err: float
    bound: float
    torch_err: float = field(default=0.0)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.err) and self.err <= self.bound


def make_inputs(case: Case, device, seed: int = 0) -> dict:
    """Random inputs for ``case`` (B non-zero so every gradient path is exercised)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    M, K, N, R = case.M, case.K, case.N, case.R
    adt = case.adapter_dtype or case.dtype

    def rnd(*shape, scale=1.0, dtype=case.dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    if case.layout == "transposed":
        x = rnd(K, M).T                      # last dim not unit-stride: the op copies it
    elif case.layout == "sliced":
        x = rnd(M, K + 5)[:, 2:K + 2]         # row stride K + 5, offset start
    elif case.layout == "3d":
        assert M % 3 == 0, "3d layout splits M into 3 x M/3"
        x = rnd(3, M // 3, K)
    else:
        x = rnd(M, K)
    inputs = dict(
        x=x, weight=rnd(N, K, scale=K ** -0.5), bias=rnd(N) if case.bias else None,
        lora_A=rnd(R, K, scale=K ** -0.5, dtype=adt), lora_B=rnd(N, R, scale=R ** -0.5, dtype=adt),
        dy=rnd(*x.shape[:-1], N),
    )
    if case.dora:  # a trained-looking magnitude: the norm of W + s B A, each feature rescaled
        w, a, b = (inputs[k].double() for k in ("weight", "lora_A", "lora_B"))
        norm = torch.linalg.norm(w + case.scaling * (b @ a), dim=1)
        inputs["magnitude"] = (norm * (0.5 + torch.rand(N, generator=g, dtype=torch.float64).to(norm.device))
                               ).to(adt)
    if case.quant is not None:  # the references' W is the 4-bit one dequantized
        from .quant4bit import quantize
        inputs["weight_4bit"] = quantize(inputs["weight"].float(), *case.quant)
        inputs["weight"] = inputs["weight_4bit"].dequantize(case.dtype)
    return inputs


def dropout_keep_mask(backend_name: str, seed: torch.Tensor, x2d: torch.Tensor, p: float) -> torch.Tensor:
    """The boolean keep-mask a backend derives from ``seed`` for a 2-D x."""
    if backend_name == "torch":
        from .torch_route import TorchRoute
        return TorchRoute.keep_mask(Dropout(seed, p), x2d.shape, x2d.device)
    from . import kernels
    return kernels.dropout_mask(seed, tuple(x2d.shape), p)


def three_way(case: Case, backend: str, device="cpu", seed: int = 0) -> list[Result]:
    """Run ``case`` through fastlora (``backend``), the reference in the case's dtype and the
    float64 reference; return one Result per output/gradient."""
    inp = make_inputs(case, device, seed)
    x, dy = inp["x"], inp["dy"]
    params = {k: inp[k] for k in ("weight", "bias", "lora_A", "lora_B", "magnitude") if k in inp}
    grads_of = (["x", "lora_A", "lora_B"] + (["bias"] if case.bias and case.bias_grad else [])
                + (["magnitude"] if case.dora else []))

    def leaves(dtype=None):
        out = {"x": x.detach().clone().requires_grad_(True)}
        for k, v in params.items():
            out[k] = None if v is None else v.detach().clone().requires_grad_(k in grads_of)
        if dtype is not None:  # float64 leaves from the same rounded values
            out = {k: None if v is None else v.detach().to(dtype).requires_grad_(v.requires_grad)
                   for k, v in out.items()}
        return out

    mask = None
    if case.dropout_p > 0:
        impl_name = resolve(backend, x, case.R)
        torch.manual_seed(seed)
        drawn = draw_seed(x.device)
        mask = dropout_keep_mask(impl_name, drawn, x.reshape(-1, case.K), case.dropout_p).reshape(x.shape)

    fl = leaves()
    torch.manual_seed(seed)  # the op draws the same dropout seed as above
    if case.quant is not None:
        from .linear4bit import lora_linear_4bit
        assert not case.dora, "no DoRA over a 4-bit base"
        y = lora_linear_4bit(fl["x"], inp["weight_4bit"], fl["bias"], fl["lora_A"], fl["lora_B"],
                             case.scaling, dropout_p=case.dropout_p, training=True, backend=backend)
    else:
        y = lora_linear(fl["x"], fl["weight"], fl["bias"], fl["lora_A"], fl["lora_B"], case.scaling,
                        dropout_p=case.dropout_p, training=True, backend=backend,
                        magnitude=fl.get("magnitude"))
    y.backward(dy)

    outs = {}
    for tag, dtype, upcast in (("torch", None, False), ("ref64", torch.float64, True)):
        lv = leaves(dtype)
        common = (lv["x"], lv["weight"], lv["bias"], lv["lora_A"], lv["lora_B"], case.scaling)
        if case.dora:
            yr = dora_linear_reference(*common, lv["magnitude"], dropout_mask=mask,
                                       dropout_p=case.dropout_p, upcast=upcast)
        else:
            yr = lora_linear_reference(*common, dropout_mask=mask, dropout_p=case.dropout_p,
                                       upcast=upcast)
        yr.backward(dy.to(yr.dtype))
        outs[tag] = {"y": yr, **{k: lv[k].grad for k in grads_of}}
    got = {"y": y, **{k: fl[k].grad for k in grads_of}}

    results = []
    for name, value in got.items():
        ref = outs["ref64"][name].double()
        torch_err = (outs["torch"][name].double() - ref).abs().max().item()
        err = (value.double() - ref).abs().max().item() if value is not None else math.inf
        if value is not None and value.dtype != _expected_dtype(name, case):
            err = math.inf  # a gradient in the wrong dtype is a failure, whatever its values
        bound = 2 * torch_err + ATOL[case.dtype] * max(1.0, ref.abs().max().item())
        results.append(Result(case.id, backend, name, err, bound, torch_err))
    return results


def three_way_pooled(case: Case, backend: str, device="cpu", seeds=(0, 1, 2)) -> list[Result]:
    """``three_way`` on several input draws, with PyTorch's own error pooled over them.

    When a handful of roundings dominate an output's error (a few elements, or r = 1 so that every
    element shares the rounding of one dY B value), one draw's max error is a small sample and
    PyTorch's can land near zero by chance; the bound then asks fastlora to be luckier than
    PyTorch rather than as accurate. Here each draw's error is held to twice the largest PyTorch
    error over the draws (the same atol). On large outputs this equals ``three_way``."""
    runs = [three_way(case, backend, device, seed) for seed in seeds]
    worst: dict[str, float] = {}
    for results in runs:
        for r in results:
            worst[r.tensor] = max(worst.get(r.tensor, 0.0), r.torch_err)
    return [Result(r.case, r.backend, r.tensor, r.err, r.bound + 2 * (worst[r.tensor] - r.torch_err),
                   worst[r.tensor])
            for results in runs for r in results]


def _expected_dtype(name: str, case: Case) -> torch.dtype:
    if name in ("lora_A", "lora_B", "magnitude"):
        return case.adapter_dtype or case.dtype
    return case.dtype


def gradcheck(backend: str, device="cpu", dropout_p: float = 0.0, fast_mode: bool = False,
              dora: bool = False) -> bool:
    """torch.autograd.gradcheck of lora_linear in float64 on a tiny problem (all inputs but the
    frozen weight, including a trainable bias; with ``dora``, the magnitude too).

    DoRA's backward is the derivative of y with the norm ||W + s B A||_row held constant (it is
    detached, as in the paper and PEFT), which finite differences in A and B would move: the norm is
    frozen at its value for the unperturbed A and B (``frozen_weight_norm``), so that the function
    checked is the one whose derivative is claimed."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_(grad)

    x, w, b, a, bb = rnd(5, 7), rnd(6, 7, grad=False), rnd(6), rnd(3, 7), rnd(6, 3)
    m = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_(True)

    def f(x, b, a, bb, *m):
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(1)  # the same dropout mask in every evaluation
            return lora_linear(x, w, b, a, bb, 0.3, dropout_p=dropout_p, backend=backend,
                               magnitude=m[0] if m else None)

    if not dora:
        return torch.autograd.gradcheck(f, (x, b, a, bb), fast_mode=fast_mode)
    norm = torch.linalg.norm(w + 0.3 * (bb @ a), dim=1).detach()
    with frozen_weight_norm(norm):
        return torch.autograd.gradcheck(f, (x, b, a, bb, m), fast_mode=fast_mode)


@contextlib.contextmanager
def frozen_weight_norm(norm: torch.Tensor):
    """DoRA's ||W + s B A||_row is ``norm`` (in the accumulator dtype) whatever A and B are, inside
    the block: the norm as the backward sees it, a constant (for gradcheck)."""
    real = dora.weight_norm
    dora.weight_norm = lambda route, weight, lora_A, lora_B, scaling: norm.to(weight.device)
    try:
        yield
    finally:
        dora.weight_norm = real

