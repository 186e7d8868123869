"""The CPU bar of issue 3, measured the way the issue asks: the full step (forward + backward) at
M=2048, in=out=1024, r=16, fp32, on this machine's CPU, as ``fastlora bench`` times it (providers
interleaved round by round, medians), repeated back to back because these shared machines drift.

    python benchmarks/cpu_bar.py --repeats 3 --rounds 41 --json benchmarks/results/cpu-bar-DATE.json

Prints one line per repeat (base ms, fastlora and PEFT as ratios to base) and writes every row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

from fastlora import bench

SHAPE, RANK = (2048, 1024, 1024), 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=41, help="interleaved timing rounds per repeat")
    ap.add_argument("--json", help="write the environment and every repeat's rows here")
    args = ap.parse_args()

    device = torch.device("cpu")
    env = bench.environment(device)
    runs, ratios = [], []
    for i in range(args.repeats):
        rows = bench.run([SHAPE], [RANK], torch.float32, ["full"], ["base", "peft", "fastlora"], device,
                         cpu_rounds=args.rounds)
        by = {r.provider: r for r in rows}
        ratios.append(by["fastlora"].ratio_to_base)
        print(f"repeat {i + 1}: base {by['base'].ms:.2f} ms, fastlora {by['fastlora'].ratio_to_base:.3f}x "
              f"base, peft {by['peft'].ratio_to_base:.3f}x base, fastlora "
              f"{by['fastlora'].speedup_over_peft:.3f}x faster than peft", flush=True)
        runs.append([bench._jsonable(dataclasses.asdict(r)) for r in rows])
    print(f"fastlora x base over repeats: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"description": f"CPU bar: python benchmarks/cpu_bar.py --repeats {args.repeats} "
                                      f"--rounds {args.rounds} (fp32, r=16, full, torch fallback)",
                       "environment": env, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
