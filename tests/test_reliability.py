"""Reliability: bitwise determinism, property-based accuracy (hypothesis) against the float64
reference within the three-way bound, and a 500-step training loop without memory growth or a
gradient leak into the frozen base."""
import gc
import os
import tracemalloc
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlora
from helpers import BACKENDS, DEVICE, ROUTES, assert_within_bound
from fastlora.checks import Case, three_way_pooled

F16, F32, F64 = torch.float16, torch.float32, torch.float64


# ------------------------------------------------------------------------------------------------
# determinism

@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_bitwise_deterministic(backend, p):
    """The same inputs and seed give the same bits in the output and every gradient, run after run
    (on the CPU; tests/test_gpu.py repeats this on CUDA at production sizes)."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(40, 24, r=5, alpha=8, dropout=p, backend=backend,
                                init_lora_weights=False, device=DEVICE)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 11, 40, device=DEVICE)
    runs = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        torch.manual_seed(5)
        y = layer(xi)
        y.backward(torch.cos(y.detach()))
        runs.append([y.detach(), xi.grad] + [t.grad.clone() for t in (layer.lora_A, layer.lora_B,
                                                                       layer.bias)])
    for other in runs[1:]:
        for name, a, b in zip(("y", "x", "lora_A", "lora_B", "bias"), runs[0], other):
            assert torch.equal(a, b), f"{name} differs between runs"


# ------------------------------------------------------------------------------------------------
# property-based accuracy

# Every compared tensor (y [M, N], dx [M, K], dA [R, K], dB [N, R], dbias [N]) gets at least this
# many elements; M = 1, r = 1 and K = 1 all occur, but not together with another tiny size. On one
# element a max error is a single sample of rounding (magnified by any cancellation in a sum), and
# no bound built on PyTorch's own error can tell accuracy from luck there: float32 dA with K = r = 1
# failed for both backends with errors of a few ulps.
MIN_ELEMENTS = 16


def _grow(d: int, other: int) -> int:
    """d, or the least size with d * other >= MIN_ELEMENTS."""
    return max(d, -(-MIN_ELEMENTS // other))


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([F64, F32, F16]))
    layout = draw(st.sampled_from(["contiguous", "3d", "transposed", "sliced"]))
    M = draw(st.integers(1, 40))
    if layout == "3d":
        M = 3 * max(1, M // 3)
    R = draw(st.integers(1, 20))
    K = _grow(_grow(draw(st.integers(1, 48)), R), M)
    N = _grow(_grow(draw(st.integers(1, 48)), R), M)
    bias = draw(st.booleans())
    bias_grad = bias and draw(st.booleans())
    return Case(
        M=M, K=K, N=max(N, MIN_ELEMENTS) if bias_grad else N, R=R, dtype=dtype,
        adapter_dtype=draw(st.sampled_from([None, F32])) if dtype == F16 else None,
        bias=bias, bias_grad=bias_grad, layout=layout,
        scaling=draw(st.one_of(st.just(0.0), st.floats(-4.0, 4.0, allow_nan=False).filter(bool))),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25])),
    )


# CI draws a fixed sample (derandomize); FASTLORA_EXPLORE=2000 draws that many fresh examples.
_EXPLORE = int(os.environ.get("FASTLORA_EXPLORE", "0"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ROUTES)
@settings(max_examples=_EXPLORE or 40, derandomize=not _EXPLORE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(case=cases(), seed=st.integers(0, 2**16))
def test_property_three_way_bound(backend, case, seed):
    """Random shapes (odd, tiny, rank above K), dtypes, layouts (3-D, transposed, sliced), scaling
    (zero, negative), float32 adapters over float16 and dropout: every output and gradient within
    the three-way bound, with PyTorch's own error pooled over three input draws (three_way_pooled:
    with r = 1 or few elements one draw's PyTorch error can be lucky. Single-draw runs of 3000 to
    6000 examples failed 2 to 7 float16 examples, by up to 1.5x; pooled, 6000 torch-backend and
    1000 Triton-backend examples passed)."""
    results = three_way_pooled(case, backend, device=DEVICE, seeds=(seed, seed + 1, seed + 2))
    assert_within_bound(results, case.id)


# ------------------------------------------------------------------------------------------------
# a long training loop

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
@pytest.mark.parametrize("backend", BACKENDS)
def test_500_steps_no_memory_growth_no_leak_into_frozen_weight(backend):
    """500 Adam steps with dropout; memory is measured after a 50-step warm-up:

    - no step's input outlives its step (a retained graph or saved tensor would keep it);
    - the resident set grows by less than 8 MiB over 450 steps (a retained graph would hold 450
      inputs of 256 KiB, 112 MiB, with the torch backend);
    - the number of gc-tracked Python objects does not grow (a leaked ctx, dict or options object
      per step would add 450);
    - torch backend, under tracemalloc: the Python heap grows by less than 64 KiB over the last
      300 steps (~220 bytes a step). torch's own pools fill for a while (measured: 50 KiB in the
      first 150 steps, 30 KiB in the next 300, flat after), hence the window and the bound;
    - the frozen weight and bias neither get a gradient nor change.
    """
    torch.manual_seed(0)
    M = 512 if backend == "torch" else 64  # the interpreter pays ~50 ms a step whatever the size
    layer = fastlora.LoRALinear(128, 64, r=8, alpha=16, dropout=0.1, backend=backend, device=DEVICE)
    frozen = (layer.weight.detach().clone(), layer.bias.detach().clone())
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-3)
    target = torch.randn(M, 64, device=DEVICE)
    alive = weakref.WeakSet()  # the step inputs still alive (a dead one leaves no trace)
    losses = [0.0] * 500  # allocated up front: no growth of its own
    use_tracemalloc = backend == "torch"

    def step(i):
        x = torch.randn(M, 128, device=DEVICE)
        alive.add(x)
        loss = (layer(x) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[i] = loss.item()

    for i in range(50):
        step(i)
    gc.collect()
    rss0, objects0 = _rss_bytes(), len(gc.get_objects())
    if use_tracemalloc:
        tracemalloc.start()
    try:
        for i in range(50, 500):
            step(i)
            if i == 199:
                gc.collect()
                heap0 = tracemalloc.get_traced_memory()[0]
        gc.collect()
        heap_growth = tracemalloc.get_traced_memory()[0] - heap0
    finally:
        tracemalloc.stop()
    rss_growth = _rss_bytes() - rss0
    object_growth = len(gc.get_objects()) - objects0
    print(f"RSS +{rss_growth / 2**20:.2f} MiB, gc objects {object_growth:+d}" +
          (f", heap +{heap_growth / 2**10:.1f} KiB" if use_tracemalloc else ""))

    assert len(alive) == 0, f"{len(alive)} inputs kept alive after their step"
    assert rss_growth < 8 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB"
    assert object_growth < 50, f"{object_growth} more Python objects"
    if use_tracemalloc:
        assert heap_growth < 64 * 2**10, f"Python heap grew by {heap_growth / 2**10:.1f} KiB"
    assert layer.weight.grad is None and layer.bias.grad is None
    assert torch.equal(layer.weight, frozen[0]) and torch.equal(layer.bias, frozen[1])
    assert losses[-1] < losses[0]
