"""Time the kernels' pieces under candidate configs against their cuBLAS floors (GPU only).

    python benchmarks/sweep_configs.py [--quick] [--json PATH]

For each problem it times: the base F.linear (forward floor), dY @ W (dX floor), then the fused
forward and the dX kernel under each candidate GemmConfig, and dA/dB under skinny configs. Prints
one table; the chosen configs in kernels/configs.py come from these runs (benchmarks/NOTES.md).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.testing

from fastlora.kernels import GemmConfig, SkinnyConfig, gemm_config, lora_gemm, lora_skinny, skinny_config


def bench(fn, graph=False):
    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            return triton.testing.do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8])[0]
    return triton.testing.do_bench(fn, warmup=25, rep=80, quantiles=[0.5, 0.2, 0.8])[0]


def gemm_candidates(M):
    if M <= 64:
        bm = 16 if M <= 16 else 64
        return [GemmConfig(bm, 32, 128, num_warps=4, num_stages=5), GemmConfig(bm, 64, 128, num_warps=4, num_stages=4),
                GemmConfig(bm, 32, 256, num_warps=4, num_stages=3), GemmConfig(bm, 16, 256, num_warps=4, num_stages=4),
                GemmConfig(bm, 64, 64, num_warps=4, num_stages=6)]
    return [GemmConfig(128, 128, 64, num_warps=8, num_stages=4), GemmConfig(128, 128, 64, num_warps=8, num_stages=3),
            GemmConfig(128, 128, 64, num_warps=8, num_stages=4, tiles_n=2),
            GemmConfig(128, 128, 64, num_warps=8, num_stages=4, tiles_n=4),
            GemmConfig(128, 256, 64, num_warps=8, num_stages=3), GemmConfig(128, 256, 64, num_warps=8, num_stages=4),
            GemmConfig(256, 128, 64, num_warps=8, num_stages=3), GemmConfig(128, 128, 128, num_warps=8, num_stages=3),
            GemmConfig(128, 128, 64, num_warps=4, num_stages=4), GemmConfig(128, 128, 64, group_m=16, num_warps=8, num_stages=4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    problems = [(8192, 4096, 4096, 16), (2048, 4096, 14336, 16), (8192, 4096, 4096, 64), (16, 4096, 4096, 16),
                (1, 4096, 14336, 16)]
    if args.quick:
        problems = problems[:1] + problems[3:4]
    out = []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"{'problem':26s} {'piece':8s} {'config':44s} {'ms':>8s} {'x floor':>8s} {'TFLOP/s':>8s}")
    for M, K, N, r in problems:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
        w = torch.randn(N, K, device=dev, dtype=dt, generator=g) * K ** -0.5
        b = torch.randn(N, device=dev, dtype=dt, generator=g)
        A = torch.randn(r, K, device=dev, dtype=dt, generator=g) * K ** -0.5
        Bm = torch.randn(N, r, device=dev, dtype=dt, generator=g)
        dy = torch.randn(M, N, device=dev, dtype=dt, generator=g)
        name = f"M{M} {K}->{N} r{r}"
        decode = M <= 64
        ref = x.float() @ w.float().T + b.float() + 2.0 * (x.float() @ A.float().T) @ Bm.float().T
        floor_f = bench(lambda: torch.nn.functional.linear(x, w, b), graph=decode)
        floor_b = bench(lambda: dy @ w, graph=decode)
        fl = 2 * M * K * N
        print(f"{name:26s} {'fwd':8s} {'cuBLAS F.linear':44s} {floor_f:8.4f} {1:8.3f} {fl / floor_f / 1e9:8.1f}")
        print(f"{name:26s} {'dX':8s} {'cuBLAS dY @ W':44s} {floor_b:8.4f} {1:8.3f} {fl / floor_b / 1e9:8.1f}")
        out.append(dict(problem=name, piece="fwd", config="cublas", ms=floor_f))
        out.append(dict(problem=name, piece="dX", config="cublas", ms=floor_b))
        default = gemm_config(M, N, K, r, dt, dev)
        cands = [default] + [c for c in gemm_candidates(M) if c != default]
        for cfg in cands:
            tag = ("*" if cfg == default else " ") + f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} t{cfg.tiles_n} g{cfg.group_m}"
            try:
                y, _ = lora_gemm(x, w, A, Bm, b, 2.0, config=cfg)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if not err < 2e-2:
                    print(f"{name:26s} {'fwd':8s} {tag:44s} WRONG rel err {err:.3g}")
                    continue
                t = bench(lambda: lora_gemm(x, w, A, Bm, b, 2.0, config=cfg), graph=decode)
                print(f"{name:26s} {'fwd':8s} {tag:44s} {t:8.4f} {t / floor_f:8.3f} {fl / t / 1e9:8.1f}")
                out.append(dict(problem=name, piece="fwd", config=tag, ms=t, ratio=t / floor_f))
                t = bench(lambda: lora_gemm(dy, w.T, Bm.T, A.T, None, 2.0, config=cfg), graph=decode)
                print(f"{name:26s} {'dX':8s} {tag:44s} {t:8.4f} {t / floor_b:8.3f} {fl / t / 1e9:8.1f}")
                out.append(dict(problem=name, piece="dX", config=tag, ms=t, ratio=t / floor_b))
            except Exception as e:  # a config the compiler rejects is a finding, not a crash
                print(f"{name:26s} {'fwd':8s} {tag:44s} ERROR {type(e).__name__}: {str(e)[:80]}")
        xa = (x.float() @ A.float().T)
        dyb = (dy.float() @ Bm.float())
        for piece, l, s in (("dB", dy, xa), ("dA", x, dyb)):
            sd = skinny_config(M, l.shape[1], r, dt, dev)
            for cfg in [sd, SkinnyConfig(32, 128, sd.splits * 2, 4, 3), SkinnyConfig(64, 128, sd.splits, 4, 3),
                        SkinnyConfig(32, 64, sd.splits * 2, 4, 3), SkinnyConfig(32, 128, max(1, sd.splits // 2), 4, 4)]:
                tag = ("*" if cfg == sd else " ") + f"{cfg.block_t}x{cfg.block_p} split{cfg.splits} w{cfg.num_warps} s{cfg.num_stages}"
                t = bench(lambda: lora_skinny(l, s, 2.0, config=cfg), graph=decode)
                gb = (l.numel() * l.element_size()) / t / 1e6
                print(f"{name:26s} {piece:8s} {tag:44s} {t:8.4f} {'':8s} {gb:7.0f}GB/s")
                out.append(dict(problem=name, piece=piece, config=tag, ms=t, gbps=gb))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
