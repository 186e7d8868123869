"""Where the host time of one training step goes, per provider (a launch-bound problem: M=16,
4096 -> 4096, r=16, bf16, by default). For each provider: microseconds per step with the GPU
idle (host time, no synchronisation inside the loop), then the Python functions (cProfile,
by own time) and the ATen ops (torch.profiler, CPU side, by self time) that spend it.

Usage: python benchmarks/host_profile.py [--providers peft fastlora-torch ...] [--M 16] [--top 18]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from fastlora.bench import build, make_weights

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--providers", nargs="+", default=["base", "peft", "fastlora-torch", "fastlora-fused",
                                                   "fastlora-split"])
ap.add_argument("--M", type=int, default=16)
ap.add_argument("--features", type=int, default=4096)
ap.add_argument("--top", type=int, default=18)
ap.add_argument("--steps", type=int, default=200)
args = ap.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
w = make_weights(args.features, args.features, 16, dtype, device, dropout=0.0)
x = torch.randn(args.M, args.features, device=device, dtype=dtype, requires_grad=True)
dy = torch.randn(args.M, args.features, device=device, dtype=dtype)

for provider in args.providers:
    module, params = build(provider, w)

    def step(module=module, params=params):
        return torch.autograd.grad(module(x), [x, *params], dy)

    for _ in range(10):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    host = (time.perf_counter() - t0) / args.steps * 1e6
    sync()
    wall = (time.perf_counter() - t0) / args.steps * 1e6
    print(f"\n##### {provider}: {host:.1f} us/step host, {wall:.1f} us/step wall "
          f"(M={args.M}, {args.features}x{args.features}, r=16, {dtype})")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    sync()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    text = out.getvalue()
    print(text[text.find("   ncalls"):].rstrip())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        for _ in range(20):
            step()
        sync()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                  max_name_column_width=48))
