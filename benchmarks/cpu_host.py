"""Where the torch route's autograd path stops paying: a LoRALinear training step (forward and the
backward of x, A and B) through the hand-written backward and through autograd's, interleaved,
at sizes from host-bound to BLAS-bound. The crossover sets fastlora/torch_route.py's AUTOGRAD_FROM.

    python benchmarks/cpu_host.py [--rounds 200]

Prints one line per size: M*K*N, the two medians (us) and autograd's time over the hand-written's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastlora
from fastlora import torch_route

SIZES = [(64, 64), (128, 128), (256, 256), (128, 512), (512, 512), (256, 1024), (1024, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds at the smallest size")
    args = ap.parse_args()
    torch.manual_seed(0)
    for M, K in SIZES:
        layer = fastlora.LoRALinear(K, K, r=16, init_lora_weights=False, backend="torch")
        x = torch.randn(M, K, requires_grad=True)
        dy = torch.randn(M, K)

        def step(autograd_from: int, layer=layer, x=x, dy=dy) -> float:
            torch_route.AUTOGRAD_FROM = autograd_from
            t0 = time.perf_counter()
            torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], dy)
            return (time.perf_counter() - t0) * 1e6

        rounds = max(10, args.rounds * 64**3 // (M * K * K))
        paths = {"hand-written": -1, "autograd": 2**62}
        samples = {name: [] for name in paths}
        for limit in paths.values():  # warm-up
            step(limit)
        for _ in range(rounds):
            for name, limit in paths.items():
                samples[name].append(step(limit))
        hand, auto = (statistics.median(samples[n]) for n in paths)
        print(f"M={M:5d} K=N={K:5d}  M*K*N=2^{(M * K * K).bit_length() - 1:2d}  hand-written "
              f"{hand:9.0f} us  autograd {auto:9.0f} us  autograd/hand {auto / hand:.3f}")


if __name__ == "__main__":
    main()
