"""Sweep the memory-bound passes' launch configs on a GPU, against the copy bandwidth of the run.

    python benchmarks/sweep_passes.py [--quick]

The H200 run of 2026-11-29 measured the passes at 0.12-0.25 of the copy bandwidth (the bar is
0.70) with the rule's configs (kernels/configs.py: gpu_xa_config, gpu_reduce_config), which were
never swept on a GPU. For each pass at M=8192, 4096 -> 4096, r=16, bf16 (the xa pass, with and
without dropout; the dY pass; the x pass for dA, with dx0, with dx0 and dropout) this times the
rule's config and its neighbours, one change each (rows, columns, warps, stages, splits doubled or
halved, the split passes' register cap lifted, and two pairs), checks each against the rule's
result, and prints TB/s and the fraction of the copy bandwidth. Each config is timed as a CUDA
graph replay: the GPU's time alone, since an eager call's host time (tens of microseconds) rivals
a pass's work at this size. A config that does not compile or fit is reported and skipped. Every
neighbour compiles first (about a second each under triton 3.6): ~45 compiles, 1-2 minutes.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import triton.testing

from fastlora import kernels as K
from fastlora.bench import time_cuda
from fastlora.kernels import configs

DEV, BF16 = "cuda", torch.bfloat16
M, N, KD, R = 8192, 4096, 4096, 16


def neighbours(cfg: configs.PassConfig, quick: bool) -> list[configs.PassConfig]:
    """``cfg`` and configs one change away (rows, cols, warps, stages, splits; a split pass also
    with ptxas's own register choice instead of the cap), then two pairs."""
    r = dataclasses.replace
    out = [cfg,
           r(cfg, block_rows=cfg.block_rows * 2), r(cfg, block_cols=cfg.block_cols * 2),
           r(cfg, num_warps=cfg.num_warps * 2), r(cfg, splits=cfg.splits * 2)]
    if cfg.splits > 1 and cfg.maxnreg is not None:
        out.append(r(cfg, maxnreg=None))
    if not quick:
        out += [r(cfg, block_rows=max(16, cfg.block_rows // 2)), r(cfg, block_cols=max(16, cfg.block_cols // 2)),
                r(cfg, num_stages=cfg.num_stages + 1), r(cfg, splits=max(1, cfg.splits // 2)),
                r(cfg, block_rows=cfg.block_rows * 2, num_warps=cfg.num_warps * 2),
                r(cfg, block_cols=cfg.block_cols * 2, num_warps=cfg.num_warps * 2)]
    return list(dict.fromkeys(out))


def pass_problems() -> list:
    """The passes at M=8192, 4096 -> 4096, r=16, bf16: (name, the rule's config, a call with a
    config (None: the rule's), bytes it moves). benchmarks/gpu_diag.py times the same list."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(M, KD, device=DEV, dtype=BF16, generator=g)
    a = torch.randn(R, KD, device=DEV, dtype=BF16, generator=g) * KD ** -0.5
    b = torch.randn(N, R, device=DEV, dtype=BF16, generator=g)
    dy = torch.randn(M, N, device=DEV, dtype=BF16, generator=g)
    xa = torch.randn(M, R, device=DEV, generator=g)
    dyb = torch.randn(M, R, device=DEV, generator=g)
    drop = (torch.tensor([1], device=DEV), 0.1)
    return [
        ("xa", K.xa_config(M, KD, R, BF16, x.device), lambda c: K.xa_pass(x, a, config=c), x.numel() * 2),
        ("xa dropout", K.xa_config(M, KD, R, BF16, x.device, dropout=True),
         lambda c: K.xa_pass(x, a, dropout=drop, config=c), x.numel() * 2),
        ("dY (dY B, dB)", K.reduce_config(M, N, R, BF16, x.device, rank_out=True),
         lambda c: K.dy_pass(dy, xa, b, 1.0, config=c), dy.numel() * 2),
        ("x (dA)", K.reduce_config(M, KD, R, BF16, x.device),
         lambda c: K.x_pass(x, dyb, a, 1.0, config=c), x.numel() * 2),
        ("x (dA, dx0)", K.reduce_config(M, KD, R, BF16, x.device, expand=True),
         lambda c: K.x_pass(x, dyb, a, 1.0, need_dx=True, config=c), 2 * x.numel() * 2),
        ("x (dA, dx0) dropout", K.reduce_config(M, KD, R, BF16, x.device, dropout=True, expand=True),
         lambda c: K.x_pass(x, dyb, a, 1.0, need_dx=True, dropout=drop, config=c), 2 * x.numel() * 2),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="five configs a pass (six if it splits) instead of eleven (twelve)")
    args = ap.parse_args()
    src, dst = torch.empty(1 << 29, dtype=BF16, device=DEV), torch.empty(1 << 29, dtype=BF16, device=DEV)
    copy = 2 * src.numel() * 2 / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3) / 1e12
    print(f"copy {copy:.2f} TB/s (read + write)")
    passes = pass_problems()
    for name, rule, call, nbytes in passes:
        ref = call(rule)
        for cfg in neighbours(rule, args.quick):
            tag = "rule" if cfg == rule else "    "
            try:
                got = call(cfg)
                for u, v in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
                    if v is not None and not torch.allclose(u.float(), v.float(), rtol=1e-2, atol=1e-2):
                        raise AssertionError("differs from the rule's config")
                t = time_cuda(lambda call=call, cfg=cfg: call(cfg), graph=True, rep=40)[0]
            except Exception as e:  # reported, not fatal: the sweep goes on
                print(f"{name:22s} {tag} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            bw = nbytes / (t * 1e-3) / 1e12
            print(f"{name:22s} {tag} {t:.4f} ms {bw:5.2f} TB/s = {bw / copy:.2f} of copy  {cfg}")


if __name__ == "__main__":
    main()
