"""GPU-only checks: bf16 numerics (the interpreter's bf16 arithmetic is wrong), production configs
at real sizes, determinism, float64 gradcheck of the compiled kernels, 64-bit offsets."""
import pytest
import torch

import fastlora
from helpers import HAS_CUDA, HAS_TRITON, assert_within_bound
from fastlora.checks import Case, gradcheck, three_way

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")]

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

GPU_CASES = [
    Case(M, K, N, r, dt) for M, K, N, r in ((1, 4096, 4096, 16), (63, 1000, 600, 3), (2048, 4096, 4096, 16),
                                            (1000, 4096, 11008, 64), (777, 1024, 1536, 128),
                                            (300, 512, 700, 256))
    for dt in (BF16, F16)
] + [
    Case(512, 1024, 768, 16, F32), Case(257, 300, 200, 16, F64),
    Case(1024, 2048, 2048, 16, BF16, adapter_dtype=F32, bias_grad=True),
    Case(999, 1024, 1024, 16, BF16, dropout_p=0.1),
    Case(1026, 1024, 1024, 64, BF16, dropout_p=0.3, layout="3d"),
    Case(512, 1000, 1000, 16, BF16, layout="transposed"),
    Case(512, 1000, 1000, 16, BF16, layout="sliced"),
]


DORA_GPU_CASES = [
    Case(1, 4096, 4096, 16, BF16, dora=True), Case(2048, 4096, 4096, 16, BF16, dora=True),
    Case(1000, 4096, 11008, 64, BF16, dora=True), Case(777, 1024, 1536, 128, F16, dora=True),
    Case(1024, 2048, 2048, 16, BF16, adapter_dtype=F32, bias_grad=True, dora=True),
    Case(999, 1024, 1024, 16, BF16, dropout_p=0.1, dora=True),
]


TRITON_ROUTES = ["fused", "split"]


def test_split_passes_sum_their_partials_in_the_last_program():
    """Every pass split in many chunks at a real size (each output block's partials summed by the
    program that finishes last, found by an atomic counter): against float64 with memory that was
    NaN before (an output block never summed would show), bit for bit the same over repeats
    (programs finish in another order each time), and every counter left zero. First in the file:
    its code has not run on a GPU before."""
    import dataclasses

    from fastlora import kernels
    from fastlora.kernels import passes
    M, N, K, R = 8192, 4096, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=BF16, generator=g)
    dy = torch.randn(M, N, device="cuda", dtype=BF16, generator=g)
    a = torch.randn(R, K, device="cuda", dtype=BF16, generator=g) * K ** -0.5
    b = torch.randn(N, R, device="cuda", dtype=BF16, generator=g)
    xa = torch.randn(M, R, device="cuda", dtype=F32, generator=g)
    gs, bias = torch.rand(N, device="cuda", generator=g) + 0.5, torch.randn(N, device="cuda", dtype=BF16, generator=g)
    seed = torch.tensor([11], device="cuda")
    keep = kernels.dropout_mask(seed, (M, K), 0.1).double() / 0.9
    # (the passes' dots take xa, or dY B, in x's dtype)
    xd, dyd, ad, xad = x.double(), dy.double(), a.double(), xa.to(BF16).double()

    def split(cfg, n):
        return dataclasses.replace(cfg, splits=n)

    xa_cfg = split(kernels.xa_config(M, K, R, BF16, x.device), 8)
    dy_cfg = split(kernels.reduce_config(M, N, R, BF16, x.device), 16)
    xp_cfg = split(kernels.reduce_config(M, K, R, BF16, x.device, dropout=True), 16)
    dora_cfg = split(kernels.reduce_config(M, N, R, BF16, x.device, dora=True), 16)
    runs = {
        "xa": (lambda: kernels.xa_pass(x, a, also=BF16, config=xa_cfg), (xd @ ad.T,) * 2),
        "dB": (lambda: kernels.dy_pass(dy, xa, b, 0.5, need_dyb=False, config=dy_cfg)[1:],
               (0.5 * dyd.T @ xad,)),
        "dA, dropout": (lambda: kernels.x_pass(x, xa, a, 0.5, dropout=(seed, 0.1), config=xp_cfg)[1:],
                        (0.5 * xad.T @ (keep * xd),)),
        "DoRA's dm": (lambda: kernels.dora_dy_pass(dy, xa, b, 0.5, gs, dy, bias, need_dyb=False,
                                                   need_db=False, need_scaled=False, config=dora_cfg)[3:],
                      ((dyd * (dyd - bias.double())).sum(0),)),
    }
    for name, (run, wants) in runs.items():
        torch.full((1 << 28,), float("nan"), device="cuda")  # (freed: the allocator's next blocks)
        first = [t.clone() for t in run()]
        for got, want in zip(first, wants):
            assert torch.isfinite(got).all(), f"{name}: an output block never written"
            tol = 2e-2 if got.dtype == BF16 else 1e-4
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        for _ in range(10):
            assert all(torch.equal(f, t) for f, t in zip(first, run())), f"{name}: not the same bits"
    torch.cuda.synchronize()
    assert all(not c.any() for c in passes._COUNTERS.values()), "a counter left non-zero"


@pytest.mark.parametrize("route", TRITON_ROUTES)
@pytest.mark.parametrize("case", GPU_CASES + DORA_GPU_CASES, ids=lambda c: c.id)
def test_three_way_bound_on_gpu(case, route):
    assert_within_bound(three_way(case, route, device="cuda"))


@pytest.mark.parametrize("route", TRITON_ROUTES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradcheck_float64_compiled_kernels(dropout_p, route, dora):
    assert gradcheck(route, device="cuda", dropout_p=dropout_p, dora=dora)


@pytest.mark.parametrize("route", TRITON_ROUTES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_bitwise_deterministic(dropout_p, route):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=BF16, generator=g)
    layer = fastlora.LoRALinear(4096, 4096, r=16, alpha=32, dropout=dropout_p, device="cuda", dtype=BF16,
                                init_lora_weights=False, backend=route)
    runs = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        torch.manual_seed(5)
        y = layer(xi)
        y.backward(torch.ones_like(y))
        runs.append((y, xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_offsets_past_int32():
    """x with M * in >= 2**31 elements (4.3 GB of bf16)."""
    M, K, N, r = 2**31 // 16384 + 64, 16384, 64, 16
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * M * K * 2:
        pytest.skip("not enough GPU memory")
    x = torch.randn(M, K, device="cuda", dtype=BF16)
    w = torch.randn(N, K, device="cuda", dtype=BF16) * K ** -0.5
    a = torch.randn(r, K, device="cuda", dtype=BF16) * K ** -0.5
    b = torch.randn(N, r, device="cuda", dtype=BF16)
    a.requires_grad_(True)
    y = fastlora.lora_linear(x, w, None, a, b, 0.5)
    tail = slice(M - 300, M)  # rows whose offsets pass 2**31
    xt = x[tail].float()
    ref = xt @ w.float().T + 0.5 * (xt @ a.detach().float().T) @ b.float().T
    torch.testing.assert_close(y[tail].float(), ref, rtol=2e-2, atol=5e-2)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(a.grad).all()


def test_remembered_launches_tell_alignment_apart():
    """kernels/launch.py keys the kernels it remembers on Triton's specialisation: the same GEMM on
    an x 16-byte aligned, then 2 bytes past that (Triton compiles a kernel for each), then aligned
    again, each launched twice (the second through the remembered path), each right."""
    from fastlora import kernels
    M, K, N, r = 256, 512, 384, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(M * K + 1, device="cuda", dtype=BF16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=BF16, generator=g) * K ** -0.5
    a = torch.randn(r, K, device="cuda", dtype=BF16, generator=g) * K ** -0.5
    b = torch.randn(N, r, device="cuda", dtype=BF16, generator=g)
    for x in (buf[:-1].view(M, K), buf[1:].view(M, K), buf[:-1].view(M, K)):
        xf = x.float()
        ref = xf @ w.float().T + 0.5 * (xf @ a.float().T) @ b.float().T
        for _ in range(2):
            y, _ = kernels.lora_gemm(x, w, b, None, 0.5, u=a)
            torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def _assert_gemms_agree(config, reference):
    """lora_gemm in ``config(grad_input)`` against ``reference(grad_input)`` (None: the rule's
    config), forward and dX with dropout, at 2048 rows, 1024 -> 1536, r=16 (several tiles per
    SM): equal to bf16 rounding."""
    from fastlora import kernels
    M, K, N, r = 2048, 1024, 1536, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=BF16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=BF16, generator=g) * K ** -0.5
    a = torch.randn(r, K, device="cuda", dtype=BF16, generator=g) * K ** -0.5
    b = torch.randn(N, r, device="cuda", dtype=BF16, generator=g)
    bias = torch.randn(N, device="cuda", dtype=BF16, generator=g)
    dy = torch.randn(M, N, device="cuda", dtype=BF16, generator=g)
    xa, dyb = x.float() @ a.float().T, dy.float() @ b.float()
    seed = torch.tensor([3], device="cuda")
    for args, kw in (((x, w, b, bias, 0.5), dict(xa=xa)),
                     ((dy, w, a, None, 0.5), dict(grad_input=True, xa=dyb, dropout=(seed, 0.1)))):
        dx = kw.get("grad_input", False)
        got, _ = kernels.lora_gemm(*args, config=config(dx), **kw)
        want, _ = kernels.lora_gemm(*args, config=reference(dx), **kw)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_warp_specialized_gemm_on_gpu():
    """The warp-specialized GEMM form (where Triton gives it: kernels/configs.py) against the same
    tiles without it, forward and dX (with dropout)."""
    from fastlora import kernels
    if not kernels.configs.WARP_SPECIALIZE or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Triton warp-specializes the fused GEMM only under triton 3.6 on sm_90+")
    ws = kernels.GemmConfig(128, 128, 64, num_warps=4, num_stages=4, tma=True, xa_in_loop=False,
                            warp_specialize=True)
    plain = kernels.GemmConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True, xa_in_loop=False)
    _assert_gemms_agree(lambda dx: ws, lambda dx: plain)


def test_persistent_tma_gemm_matches_the_rule_config():
    """The persistent TMA config as the tuner times it (128x256 subtiled; 128x64 in dX's dropout
    form), the rule's on sm_90 until the H200's table timed the pointer path faster, against the
    rule's pointer config, which the three-way cases check against the float64 reference."""
    from fastlora import kernels
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tensor descriptors need sm_90+")
    info = kernels.device_info(torch.device("cuda"))

    def tma(dx):
        return next(c for c in kernels.gemm_candidates(2048, 16, 2, info, grad_input=dx, dropout=dx)
                    if c.tma and c.epilogue_subtile and not c.xa_in_loop and c.num_stages == 3)

    _assert_gemms_agree(tma, lambda dx: None)


@pytest.mark.parametrize("M", [16, 2048])
def test_dx_with_dyb_in_the_loop_matches_dyb_read(M):
    """dX's dY B computed in the GEMM's K loop against the same config reading dY B from float32:
    dx to bf16 rounding, dY B to float32 summation order, with and without the dropout epilogue;
    at M=16 the rule's config (which computes it in the loop), at M=2048 each of the tuner's
    in-loop candidates (pointers and TMA; a few compiles: gpu_check.sh's time)."""
    from fastlora import kernels
    K, N, r = 1024, 1536, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(M, N, device="cuda", dtype=BF16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=BF16, generator=g) * N ** -0.5
    a = torch.randn(r, K, device="cuda", dtype=BF16, generator=g) * K ** -0.5
    b = torch.randn(N, r, device="cuda", dtype=BF16, generator=g)
    dyb = dy.float() @ b.float()
    seed = torch.tensor([3], device="cuda")
    info = kernels.device_info(dy.device)
    for dropout in (None, (seed, 0.1)):
        if M <= 64:
            cfgs = [kernels.gemm_config(M, K, N, r, BF16, dy.device, grad_input=True,
                                        dropout=dropout is not None)]
        else:
            cfgs = [c for c in kernels.gemm_candidates(M, 16, 2, info, grad_input=True,
                                                       dropout=dropout is not None) if c.xa_in_loop]
        for cfg in cfgs:
            assert cfg.xa_in_loop, cfg
            got, got_dyb = kernels.lora_gemm(dy, w, a, None, 0.5, grad_input=True, u=b, dropout=dropout,
                                             config=cfg)
            want, _ = kernels.lora_gemm(dy, w, a, None, 0.5, grad_input=True, xa=dyb, dropout=dropout,
                                        config=cfg)
            torch.testing.assert_close(got_dyb, dyb, rtol=1e-4, atol=1e-3 * dyb.abs().max().item())
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def _graphed_step(layer, x, dy):
    """A training step (forward, backward) of ``layer`` captured in a CUDA graph after a warm-up
    on a side stream, as torch.cuda.graphs asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(dy)
    return graph, y


@pytest.mark.parametrize("route", TRITON_ROUTES + ["torch"])
def test_training_step_under_cuda_graph_capture(route):
    """Replays compute what eager calls compute, bit for bit, on new data in the static inputs."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(1024, 768, r=16, alpha=32, device="cuda", dtype=BF16,
                                init_lora_weights=False, backend=route)
    x = torch.randn(512, 1024, device="cuda", dtype=BF16, requires_grad=True)
    dy = torch.randn(512, 768, device="cuda", dtype=BF16)
    graph, y = _graphed_step(layer, x, dy)
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            dy.copy_(torch.randn_like(dy))
        graph.replay()
        torch.cuda.synchronize()
        got = [y.detach().clone(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
        xe = x.detach().clone().requires_grad_(True)
        a, b = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
        ye = fastlora.lora_linear(xe, layer.weight, layer.bias, a, b, layer.scaling, backend=route)
        ye.backward(dy)
        for name, g, e in zip(("y", "x", "lora_A", "lora_B"), got, (ye, xe.grad, a.grad, b.grad)):
            assert torch.equal(g, e.detach()), f"{name}: the replay differs from the eager call"


@pytest.mark.parametrize("route", TRITON_ROUTES + ["torch"])
def test_training_step_with_dropout_under_cuda_graph_capture(route):
    """The dropout seed is drawn inside the graph: each replay draws a new mask (the torch route's
    too: its mask comes from the kernels, with no host synchronisation to break the capture)."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(1024, 768, r=16, alpha=32, dropout=0.1, device="cuda", dtype=BF16,
                                init_lora_weights=False, backend=route)
    x = torch.randn(512, 1024, device="cuda", dtype=BF16, requires_grad=True)
    dy = torch.randn(512, 768, device="cuda", dtype=BF16)
    graph, y = _graphed_step(layer, x, dy)
    grads = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        grads.append(layer.lora_A.grad.clone())
    assert all(torch.isfinite(g).all() for g in grads) and not torch.equal(*grads)




def test_the_torch_route_draws_the_kernels_mask_on_cuda_without_a_synchronisation():
    """On CUDA the torch route's dropout mask is the one the kernels regenerate (so the route table
    may mix the routes' passes under dropout), drawn where the seed lies: a training step through
    it synchronises nothing, and equals the split route's step on the same seed."""
    from fastlora import kernels
    from fastlora.routes import Dropout
    from fastlora.torch_route import TorchRoute
    seed = torch.tensor([1234], device="cuda")
    keep = TorchRoute().keep_mask(Dropout(seed, 0.3), (300, 500), torch.device("cuda"))
    assert keep.dtype == torch.bool and torch.equal(keep, kernels.dropout_mask(seed, (300, 500), 0.3))
    torch.manual_seed(0)
    layers = {b: fastlora.LoRALinear(512, 256, r=16, dropout=0.2, device="cuda", dtype=BF16,
                                     init_lora_weights=False, backend=b) for b in ("torch", "split")}
    layers["split"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(1024, 512, device="cuda", dtype=BF16)
    out = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same seed drawn for both
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = layer(xi)
            y.backward(torch.ones_like(y))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out[name] = [y.detach().float(), xi.grad.float(), layer.lora_A.grad.float(), layer.lora_B.grad.float()]
    for got, want in zip(out["torch"], out["split"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
