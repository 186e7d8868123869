"""GPU diagnostics: the two ceilings measured in this run, each piece against its ceiling, and host
time. One line per probe (benchmarks/gpu_check.sh keeps them in machine.txt).

- ceilings: device-to-device copy bandwidth (bytes read + written) and cuBLAS's bf16 GEMM rate;
- the fused GEMM's main loop against cuBLAS (forward and dX, M=8192, 4096x4096, r=16), in the
  rule's config (the pointer path since session 7) and the persistent TMA one;
- the memory-bound passes (xa, dY, x with dx0) in TB/s against the copy bandwidth (the bar: 70%),
  timed as CUDA graph replays (GPU time alone), the eager time (host included) beside it: the
  H200 run of 2026-11-29 timed them eagerly only, at 0.07-0.23 ms a pass, the order of a call's
  host time there, so its 0.12-0.25 of the copy bandwidth may be the host's, not the kernels';
- host time per call at M=16 and 2048 for each route (and the torch route through autograd's
  path; and the fused route with its launches through Triton's JITFunction.run, against
  kernels/launch.py's remembered path), against F.linear's and PEFT's, with the Triton launches
  of one call counted and its other ATen calls that launch kernels (cuBLAS, sums, casts, copies:
  every call below autograd but allocations and views), each some microseconds of host time.
"""
import functools
import time

import torch
import triton
import triton.testing

import fastlora.kernels.launch as launch_path
from fastlora import kernels as K
from fastlora import torch_route
from fastlora.bench import KernelCalls, build, make_weights, time_cuda
from sweep_passes import pass_problems  # (benchmarks/, beside this file)

DEV = "cuda"
BF16 = torch.bfloat16


def ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60)


def ceilings():
    n = 1 << 30
    a = torch.empty(n // 2, dtype=BF16, device=DEV)
    b = torch.empty_like(a)
    t = ms(lambda: b.copy_(a))
    copy = 2 * a.numel() * 2 / (t * 1e-3) / 1e12
    x = torch.randn(8192, 4096, device=DEV, dtype=BF16)
    w = torch.randn(4096, 4096, device=DEV, dtype=BF16)
    t = ms(lambda: torch.nn.functional.linear(x, w))
    gemm = 2 * 8192 * 4096 * 4096 / (t * 1e-3) / 1e12
    print(f"ceiling copy {copy:.2f} TB/s (read + write); cuBLAS bf16 8192x4096x4096 {gemm:.0f} TFLOP/s ({t:.4f} ms)")
    return copy, t


def main_loop(cublas_ms):
    M, N, Kd, R = 8192, 4096, 4096, 16
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(M, Kd, device=DEV, dtype=BF16, generator=g)
    w = torch.randn(N, Kd, device=DEV, dtype=BF16, generator=g) * Kd ** -0.5
    a = torch.randn(R, Kd, device=DEV, dtype=BF16, generator=g) * Kd ** -0.5
    b = torch.randn(N, R, device=DEV, dtype=BF16, generator=g)
    xa = x.float() @ a.float().T
    dy = torch.randn(M, N, device=DEV, dtype=BF16, generator=g)
    dyb = dy.float() @ b.float()
    cfg = K.gemm_config(M, N, Kd, R, BF16, x.device)
    # the warp-specialized form (where Triton gives it: kernels/configs.py), which the quick tuner
    # run does not time
    ws = K.GemmConfig(128, 128, 64, num_warps=4, num_stages=4, tma=True, xa_in_loop=False,
                      warp_specialize=True)
    # the persistent TMA config (the rule's before the H200's table timed the pointer path faster)
    tma = K.GemmConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True, epilogue_subtile=True,
                       xa_in_loop=False)
    probes = [("fwd, xa read", cfg, lambda: K.lora_gemm(x, w, b, None, 1.0, xa=xa)),
              ("fwd, xa in loop", cfg, lambda: K.lora_gemm(x, w, b, None, 1.0, u=a, config=cfg)),
              ("dX", cfg, lambda: K.lora_gemm(dy, w, a, None, 1.0, grad_input=True, xa=dyb)),
              ("dX, dY B in loop", cfg, lambda: K.lora_gemm(dy, w, a, None, 1.0, grad_input=True, u=b,
                                                            config=cfg)),
              ("fwd, xa read, tma", tma, lambda: K.lora_gemm(x, w, b, None, 1.0, xa=xa, config=tma)),
              ("dX, tma", tma, lambda: K.lora_gemm(dy, w, a, None, 1.0, grad_input=True, xa=dyb, config=tma))]
    if K.configs.WARP_SPECIALIZE:
        probes += [("fwd, xa read, ws", ws, lambda: K.lora_gemm(x, w, b, None, 1.0, xa=xa, config=ws)),
                   ("dX, ws", ws, lambda: K.lora_gemm(dy, w, a, None, 1.0, grad_input=True, xa=dyb, config=ws))]
    for name, used, fn in probes:
        try:
            t = ms(fn)
        except Exception as e:  # (a config that fails to compile there): said, the rest still run
            print(f"main loop {name:16s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        print(f"main loop {name:16s} {t:.4f} ms = {cublas_ms / t:.2f} of cuBLAS's rate  ({used})")


def passes(copy_tbs):
    for name, _, call, nbytes in pass_problems():  # (sweep_passes.py's list, the rule's configs)
        fn = functools.partial(call, None)
        t = ms(fn)
        try:
            g = time_cuda(fn, graph=True, rep=20)[0]  # GPU time alone: the kernels' own bandwidth
        except Exception as e:  # said, and the rest of the diagnostics still run
            print(f"pass {name:28s} eager {t:.4f} ms; graph capture failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:100]}")
            continue
        bw = nbytes / (g * 1e-3) / 1e12
        print(f"pass {name:28s} {g:.4f} ms  {bw:.2f} TB/s = {bw / copy_tbs:.2f} of copy "
              f"(graph replay; eager {t:.4f} ms, host included)")


def host_time(features: int = 4096, sizes=(16, 2048), n: int = 100):
    """Host microseconds per call (the loop's time with nothing synchronised inside it) against its
    wall time (synchronised at the end: where wall ~ host the host is the bottleneck), at M=16
    (launch-bound) and M=2048, 4096 -> 4096, r=16: base, PEFT, each route and the torch route
    through autograd's path, with the Triton launches of one call counted."""
    launches = []
    for module in (K.gemm, K.passes):  # every launch goes through kernels/launch.py's launch
        def counting(kernel, grid, *args, _orig=module.launch, **kwargs):
            launches.append(kernel.__name__)
            return _orig(kernel, grid, *args, **kwargs)
        module.launch = counting
    weights = make_weights(features, features, 16, BF16, torch.device(DEV), dropout=0.0)
    hand_written_from = torch_route.AUTOGRAD_FROM
    remembered = launch_path.ENABLED
    for M in sizes:
        x = torch.randn(M, features, device=DEV, dtype=BF16, requires_grad=True)
        dy = torch.randn(M, features, device=DEV, dtype=BF16)
        for provider in ("base", "peft", "fastlora-torch", "torch-autograd", "fastlora-fused",
                         "fused-via-jit", "fastlora-split", "fastlora"):
            # the torch route through autograd's path at any size (its rule takes it up to 2^26);
            # fused-via-jit: the fused route with every launch through Triton's JITFunction.run
            torch_route.AUTOGRAD_FROM = 2**62 if provider == "torch-autograd" else hand_written_from
            launch_path.ENABLED = remembered and provider != "fused-via-jit"
            built = {"torch-autograd": "fastlora-torch", "fused-via-jit": "fastlora-fused"}.get(provider, provider)
            try:
                module, params = build(built, weights)
            except Exception as e:  # (PEFT not installed, say): said, the others still measured
                print(f"host M{M} {provider}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue

            def fwd(module=module, x=x):
                return module(x)

            def step(module=module, params=params, x=x, dy=dy):
                return torch.autograd.grad(module(x), [x, *params], dy)

            for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                launches.clear()
                with KernelCalls() as aten:
                    fn()
                n_launch = len(launches)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                host = (time.perf_counter() - t0) / n * 1e6
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / n * 1e6
                print(f"host M{M:<5d} {provider:15s} {name:8s} {host:7.1f} us/call host, {wall:7.1f} wall, "
                      f"{n_launch} Triton launches, {len(aten.calls)} other kernels ({' '.join(aten.calls)})")
    torch_route.AUTOGRAD_FROM = hand_written_from
    launch_path.ENABLED = remembered


if __name__ == "__main__":
    copy_tbs, cublas_ms = ceilings()
    main_loop(cublas_ms)
    passes(copy_tbs)
    host_time()
