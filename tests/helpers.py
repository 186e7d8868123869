"""What the tests share: the device and Triton facts, the backends to run, the bound check's
failure message and a small model. (tests/conftest.py sets TRITON_INTERPRET before anything here
imports the kernels, and holds the fixtures.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastlora

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

try:
    import fastlora.kernels  # noqa: F401
    HAS_TRITON = True
except ImportError:  # a machine without triton still runs the fallback's tests
    HAS_TRITON = False

def run_compiled(script: str, timeout: int):
    """The JSON that ``script`` (a file of tests/) prints, run in a subprocess without
    TRITON_INTERPRET: the kernels compiled, not interpreted (this process defined them in
    interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, os.path.join(here, script)], env=env, cwd=here,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


# Every route, for the correctness suite: each must pass it on its own.
ROUTES = ["torch", "fused", "split"] if HAS_TRITON else ["torch"]
# The backends a user names, for the tests of what is built on lora_linear ("triton" picks a
# Triton route per call).
BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]


def full_suite_only(values, inner):
    """``values`` as pytest params, those not in ``inner`` marked slow: the inner loop
    (pytest -m "not slow") runs ``inner``, README's command all of them."""
    return [pytest.param(v, marks=() if v in inner else pytest.mark.slow) for v in values]


def assert_within_bound(results, what: str = "") -> None:
    """Fail with every output/gradient of ``results`` (fastlora.checks.Result) past its bound."""
    failed = [f"{r.tensor}: err {r.err:.3g} > bound {r.bound:.3g} (torch's own {r.torch_err:.3g})"
              for r in results if not r.ok]
    assert not failed, (f"{what}: " if what else "") + "; ".join(failed)


def count_launches(monkeypatch):
    """Triton kernel launches, by kernel name."""
    from fastlora.kernels import gemm, passes
    launches = []
    for module, name in ((gemm, "lora_gemm_kernel"), (passes, "xa_kernel"), (passes, "reduce_kernel"),
                         (passes, "sum_parts_kernel")):
        kernel = getattr(module, name)

        class Counting:
            def __getitem__(self, grid, _kernel=kernel, _name=name):
                def launch(*args, **kwargs):
                    launches.append(_name)
                    return _kernel[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(module, name, Counting())
    return launches


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d // 2, bias=False)
        self.out_proj = nn.Linear(d // 2, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.out_proj(torch.tanh(self.v_proj(self.q_proj(x)))))


class Net(nn.Module):
    """Two blocks and an output head, reachable through get_output_embeddings as in transformers."""

    def __init__(self, d=16, vocab=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


def lora_paths(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, fastlora.LoRALinear))


def with_random_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, fastlora.LoRALinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model


class DoubledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward, which a LoRALinear (F.linear) would drop."""

    def forward(self, x):
        return 2 * super().forward(x)


class TaggedLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward."""
