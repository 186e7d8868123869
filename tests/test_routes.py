"""Which route runs: the committed route table (data with its provenance), backend="triton"
choosing per pass from it, the rule where it is silent, and what a training step launches."""
import dataclasses
import json

import pytest
import torch

import fastlora
from fastlora import route_table
from helpers import HAS_TRITON, count_launches

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

RUN_KEYS = {"generation", "device", "capability", "torch", "triton", "date", "command", "entries"}
ENTRY_KEYS = {"dtype", "M", "N", "K", "rank", "dropout", "pass", "route", "gemm", "ms"}


def test_the_committed_table_is_data_with_its_provenance():
    with open(route_table.TABLE_PATH, encoding="utf-8") as f:
        table = json.load(f)
    assert table["format"] == 1 and isinstance(table["runs"], list)
    for run in table["runs"]:
        assert RUN_KEYS <= set(run), f"a run lacks {RUN_KEYS - set(run)}"
        for e in run["entries"]:
            assert ENTRY_KEYS <= set(e) and e["pass"] in ("fwd", "bwd", "step")
            assert e["route"] in (("function", "autograd") if e["pass"] == "step" else ("fused", "split", "torch"))
            timed = {k.split()[0] for k in e["ms"]}
            assert e["route"] == min(timed, key=lambda r: min(
                v for k, v in e["ms"].items() if k.split()[0] == r))  # the fastest was recorded
    route_table.load.cache_clear()
    assert isinstance(route_table.load(route_table.TABLE_PATH), dict)


def test_the_rule_where_the_table_is_silent():
    assert route_table.RULE(1) == route_table.RULE(255) == "fused"
    assert route_table.RULE(256) == route_table.RULE(8192) == "split"
    choice = route_table.choose("fwd", torch.device("cpu"), torch.float32, 300, 7, 5, 3, False)
    assert choice == route_table.Choice("split", None, measured=False)


def _installed(entries, tmp_path, monkeypatch):
    """A fixture's body: a one-run route table of ``entries`` for the interpreter, read in place of
    the committed one until the test ends."""
    path = tmp_path / "route_table.json"
    path.write_text(json.dumps({"format": 1, "runs": [dict(
        generation="interpreter", device="test", capability=[0, 0], torch="-", triton="-",
        date="2026-01-01T00:00:00+00:00", command="test", entries=entries)]}))
    monkeypatch.setattr(route_table, "TABLE_PATH", str(path))
    route_table.load.cache_clear()
    yield
    route_table.load.cache_clear()


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A route table for the interpreter: the forward of a 37 x 40 -> 24 r=3 problem on the split
    route, its backward on the fused route with a 16x16x16 GEMM (the rule says fused for both)."""
    entries = [dict(dtype="fp32", M=37, N=24, K=40, rank=3, dropout=False, route="split", gemm=None,
                    ms={"split": 1.0, "fused": 2.0}, **{"pass": "fwd"}),
               dict(dtype="fp32", M=37, N=24, K=40, rank=3, dropout=False, route="fused",
                    gemm=dict(block_m=16, block_n=16, block_k=16, group_m=2),
                    ms={"split": 2.0, "fused": 1.0}, **{"pass": "bwd"})]
    yield from _installed(entries, tmp_path, monkeypatch)


def _calls(monkeypatch):
    """The routes' forward/backward calls, by route and pass, and the GEMM configs passed."""
    from fastlora import triton_routes
    calls = []
    for cls in (triton_routes.FusedRoute, triton_routes.SplitRoute):
        for name in ("forward", "backward"):
            orig = getattr(cls, name)

            def spy(self, *args, _orig=orig, _name=name, **kwargs):
                calls.append((self.name, _name, kwargs.get("gemm")))
                return _orig(self, *args, **kwargs)
            monkeypatch.setattr(cls, name, spy)
    return calls


def test_triton_backend_chooses_each_pass_from_the_table(table, monkeypatch):
    calls = _calls(monkeypatch)
    layer = fastlora.LoRALinear(40, 24, r=3, backend="triton", init_lora_weights=False)
    x = torch.randn(37, 40, requires_grad=True)
    layer(x).sum().backward()
    assert calls == [("split", "forward", None),
                     ("fused", "backward", dict(block_m=16, block_n=16, block_k=16, group_m=2))]
    calls.clear()
    layer(torch.randn(38, 40)).sum().backward()  # M=38: the same bucket (64)
    assert [c[:2] for c in calls] == [("split", "forward"), ("fused", "backward")]
    calls.clear()
    layer(torch.randn(300, 40)).sum().backward()  # not in the table: the rule
    assert [c[:2] for c in calls] == [("split", "forward"), ("split", "backward")]


@pytest.fixture
def torch_table(tmp_path, monkeypatch):
    """A route table that measured the torch route fastest for a 37 x 40 -> 24 r=3 problem's
    forward and backward, without dropout and (as the tuner never writes) with it."""
    entries = [dict(dtype="fp32", M=37, N=24, K=40, rank=3, dropout=d, route="torch", gemm=None,
                    ms={"split": 2.0, "fused": 3.0, "torch": 1.0}, **{"pass": p})
               for d in (False, True) for p in ("fwd", "bwd")]
    yield from _installed(entries, tmp_path, monkeypatch)


def _triton_and_torch_steps(x, **kw):
    """A training step (loss sum(y^2)) of one 40 -> 24 r=3 LoRALinear through backend="triton" and
    through backend="torch": (the triton layer, the torch one, each one's [y, dx, dA, dB], the
    triton y's grad_fn)."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(40, 24, r=3, backend="triton", init_lora_weights=False, **kw)
    ref = fastlora.LoRALinear(40, 24, r=3, backend="torch", init_lora_weights=False, **kw)
    ref.load_state_dict(layer.state_dict())
    grads, grad_fns = [], []
    for m in (layer, ref):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        grad_fns.append(y.grad_fn)
        y.square().sum().backward()
        grads.append([y.detach(), xi.grad, m.lora_A.grad, m.lora_B.grad])
    return layer, ref, grads, grad_fns[0]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_table_can_choose_the_torch_route_but_not_where_its_mask_differs(torch_table, monkeypatch, use_dora):
    """Where the table measured the torch route fastest, backend="triton" launches no kernel for
    x (DoRA's norm pass over W aside) and computes what backend="torch" does; LoRA under dropout
    takes split here, where the torch route's mask (numpy's on the CPU) is not the kernels' (on
    CUDA it is: tests/test_gpu.py)."""
    launches = count_launches(monkeypatch)
    x = torch.randn(37, 40)
    layer, ref, grads, _ = _triton_and_torch_steps(x, use_dora=use_dora)
    assert launches == (["xa_kernel"] if use_dora else [])  # DoRA's weight pass (its norm)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if use_dora:
        torch.testing.assert_close(layer.lora_magnitude_vector.grad, ref.lora_magnitude_vector.grad,
                                   rtol=1e-5, atol=1e-6)
        return  # (DoRA under dropout runs its products on drop(x) without dropout: any route)
    layer.dropout = 0.1
    layer.train()
    layer(x.clone().requires_grad_(True)).sum().backward()
    assert launches == ["xa_kernel", "reduce_kernel", "reduce_kernel"]  # the split route's


@pytest.fixture
def step_table(tmp_path, monkeypatch):
    """A route table that measured a 37 x 40 -> 24 r=3 training step faster through autograd's
    path, its passes each on the split route (the rule would say fused)."""
    entries = [dict(dtype="fp32", M=37, N=24, K=40, rank=3, dropout=False, route="split", gemm=None,
                    ms={"split": 1.0, "fused": 2.0}, **{"pass": p}) for p in ("fwd", "bwd")]
    entries.append(dict(dtype="fp32", M=37, N=24, K=40, rank=3, dropout=False, route="autograd",
                        gemm=None, ms={"function": 2.0, "autograd": 1.0}, **{"pass": "step"}))
    yield from _installed(entries, tmp_path, monkeypatch)


def test_the_table_can_choose_autograds_path_for_a_training_step(step_table, monkeypatch):
    """Where the table measured autograd's path faster for a step, backend="triton" trains through
    the torch route's forward ops with PyTorch's backward nodes (no kernel, no Function) and gets
    backend="torch"'s gradients; without a gradient to take, under dropout (no entry, and on the
    CPU the torch route's mask is not the kernels'), for DoRA, and at a size the table does not
    hold, it takes the Function and the passes' routes."""
    launches = count_launches(monkeypatch)
    x = torch.randn(37, 40)
    layer, _, grads, grad_fn = _triton_and_torch_steps(x)
    assert "LoRALinearFunction" not in type(grad_fn).__name__, grad_fn
    assert launches == []
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def function_path(y):
        return "LoRALinearFunction" in type(y.grad_fn).__name__

    with torch.no_grad():  # inference: the forward pass's route (split), one launch
        layer(x)
    assert launches == ["xa_kernel"]
    launches.clear()
    layer.requires_grad_(False)  # nothing to train: the same
    assert layer(x).grad_fn is None and launches == ["xa_kernel"]
    layer.requires_grad_(True)
    layer.lora_A.requires_grad_(False)  # (x and B still train: autograd's path)
    assert not function_path(layer(x.clone().requires_grad_(True)))
    layer.lora_A.requires_grad_(True)
    layer.dropout = 0.1
    layer.train()
    assert function_path(layer(x))
    layer.dropout = 0.0
    assert function_path(layer(torch.randn(300, 40)))  # a size the table does not hold
    dora = fastlora.LoRALinear(40, 24, r=3, backend="triton", init_lora_weights=False, use_dora=True)
    assert function_path(dora(x))


@pytest.fixture
def dropout_step_table(tmp_path, monkeypatch):
    """A route table that measured a 37 x 40 -> 24 r=3 training step with dropout faster through
    autograd's path."""
    entries = [dict(dtype="fp32", M=37, N=24, K=40, rank=3, dropout=True, route="autograd", gemm=None,
                    ms={"function": 2.0, "autograd": 1.0}, **{"pass": "step"})]
    yield from _installed(entries, tmp_path, monkeypatch)


def test_under_dropout_autograds_path_draws_the_kernels_mask(dropout_step_table, monkeypatch):
    """Where the torch route draws the kernels' mask (CUDA; here the interpreter stands in), a step
    with dropout the table measured faster through autograd's path takes it, and computes what the
    Function on the Triton routes computes from the same seed: the same mask."""
    from fastlora import autograd, torch_route
    for module in (autograd, torch_route):
        monkeypatch.setattr(module, "draws_kernels_mask", lambda device: True)
    x = torch.randn(37, 40)
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(40, 24, r=3, dropout=0.3, backend="triton", init_lora_weights=False)
    out = []
    for step_entry in (True, False):
        if not step_entry:  # the same step through the Function (the rule's fused route)
            monkeypatch.setattr(route_table, "autograd_step", lambda *a: False)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout seed drawn both times
        y = layer(xi)
        assert ("LoRALinearFunction" in type(y.grad_fn).__name__) != step_entry, y.grad_fn
        y.square().sum().backward()
        out.append([y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()])
        layer.zero_grad()
    for got, want in zip(*out):
        torch.testing.assert_close(got, want)  # (float32: the two sum in different orders)


@pytest.mark.slow  # a fresh interpreter, about 5 s
def test_the_tuner_dry_runs_on_the_cpu_and_writes_a_table_the_routes_read(tmp_path, monkeypatch):
    """benchmarks/tune_routes.py --dry-run: the tuner's own code through Triton's interpreter at
    tiny sizes (timed by the wall clock, so which route wins means nothing); a GPU run is the same
    code at real sizes."""
    import os
    import subprocess
    import sys
    out = tmp_path / "table.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "tune_routes.py"), "--dry-run",
                          "--out", str(out)], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # (written through a renamed temporary)
    table = json.loads(out.read_text())
    (run_,) = table["runs"]
    assert run_["generation"] == "interpreter" and run_["command"].endswith("--dry-run")
    passes = {(e["M"], e["dropout"], e["pass"]) for e in run_["entries"]}
    assert passes == {(1, False, "fwd"), (64, False, "fwd"), (64, False, "bwd"), (64, True, "fwd"),
                      (64, True, "bwd"), (64, False, "step")}
    for e in run_["entries"]:
        if e["pass"] != "step":  # decoding is timed as graph replays
            assert e["timing"] == ("graph" if e["M"] == 1 else "eager"), e
        assert set(k.split()[0] for k in e["ms"]) == (
            {"function", "autograd"} if e["pass"] == "step" else
            {"split", "fused"} | (set() if e["dropout"] else {"torch"}))  # the CPU's mask is not the kernels'
    monkeypatch.setattr(route_table, "TABLE_PATH", str(out))
    route_table.load.cache_clear()
    try:
        step = next(e for e in run_["entries"] if e["pass"] == "step")
        assert route_table.autograd_step(torch.device("cpu"), torch.float32, 64, 32, 48, 16, False) == (
            step["route"] == "autograd")
        assert route_table.choose("bwd", torch.device("cpu"), torch.float32, 64, 32, 48, 16, True).measured
    finally:
        route_table.load.cache_clear()


@pytest.mark.parametrize("backend,in_loop,fwd,bwd", [
    ("fused", True, ["lora_gemm_kernel"], ["lora_gemm_kernel", "reduce_kernel", "reduce_kernel"]),
    ("fused", False, ["lora_gemm_kernel"], ["reduce_kernel", "sum_parts_kernel", "lora_gemm_kernel",
                                            "reduce_kernel"]),
    ("split", None, ["xa_kernel"], ["reduce_kernel", "sum_parts_kernel", "reduce_kernel"]),
])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_launches_of_a_training_step(backend, in_loop, fwd, bwd, splits, monkeypatch):
    """A step's Triton launches (100 output features: two column blocks for the dY pass): fused
    forward 1 (x A^T in the GEMM's loop); its backward 3: the dX GEMM computing dY B in its K loop
    (the config's xa_in_loop), the dY pass for dB alone, the x pass for dA; reading dY B instead,
    the dY pass (dY B, dB) and the sum of its two column blocks' dY B partials, the dX GEMM, the x
    pass; split forward 1 (the x pass; cuBLAS does the rest) and backward 3 (the dY pass, the sum,
    the x pass for dA and dx0). The same launches when every pass splits its reduction in 3 chunks
    (the GPU rules' configs above a few hundred rows): their partials are summed in the pass."""
    from fastlora import kernels
    from fastlora.kernels import passes
    if splits > 1:
        for name in ("xa_config", "reduce_config"):
            rule = getattr(passes, name)
            monkeypatch.setattr(passes, name, lambda *a, _rule=rule, **k: dataclasses.replace(
                _rule(*a, **k), block_rows=16, block_cols=16, splits=splits))
    if in_loop is not None:
        rule = kernels.gemm_config
        monkeypatch.setattr(kernels, "gemm_config", lambda *a, grad_input=False, **k: dataclasses.replace(
            rule(*a, grad_input=grad_input, **k), xa_in_loop=in_loop or not grad_input))
    launches = count_launches(monkeypatch)
    layer = fastlora.LoRALinear(40, 100, r=3, backend=backend, init_lora_weights=False)
    x = torch.randn(37, 40, requires_grad=True)
    y = layer(x)
    assert launches == fwd
    launches.clear()
    y.sum().backward()
    assert launches == bwd


@pytest.mark.parametrize("grad_input,dropout", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M", [1, 64, 8192])
@pytest.mark.parametrize("R", [16, 64])
def test_the_tuning_candidates_fit_shared_memory(M, R, grad_input, dropout):
    """The tuner compiles only configs that fit (on 2026-11-29 the H200 lost a compile to each of
    three that did not); tests/aot.py compiles the same candidates and checks ptxas agrees."""
    from fastlora.kernels import configs
    h100 = configs.DeviceInfo((9, 0), 132, 232448)
    # ptxas (triton 3.6) put this one at 241696 bytes: the model must not take it for a fit
    over = configs.GemmConfig(128, 256, 64, num_warps=8, num_stages=4, tma=True, epilogue_subtile=True,
                              xa_in_loop=False)
    assert configs.gemm_smem_bytes(over, 16, 2) > h100.smem
    cands = configs.gemm_candidates(M, R, 2, h100, grad_input=grad_input, dropout=dropout)
    assert cands and len(set(cands)) == len(cands)
    assert all(configs.gemm_smem_bytes(c, R, 2) <= h100.smem for c in cands)
    assert over not in cands
