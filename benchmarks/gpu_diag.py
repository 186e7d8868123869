"""GPU diagnostics: operand layouts/configs of the GEMM kernel against an fp32 reference, and the
host (launch) overhead of one training step at small M. Prints one line per probe."""
import time

import torch

import fastlora
from fastlora.kernels import GemmConfig, lora_gemm, lora_skinny


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def layouts():
    dev = "cuda"
    for dt in (torch.bfloat16, torch.float16):
        for M, K, N, R in ((63, 1000, 600, 3), (63, 1024, 640, 3), (63, 1000, 600, 16), (300, 1000, 600, 3),
                           (2048, 1000, 600, 3)):
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
            w = torch.randn(N, K, device=dev, dtype=dt, generator=g) * K ** -0.5
            a = torch.randn(R, K, device=dev, dtype=dt, generator=g) * K ** -0.5
            b = torch.randn(N, R, device=dev, dtype=dt, generator=g)
            dy = torch.randn(M, N, device=dev, dtype=dt, generator=g)
            ref_y = x.float() @ w.float().T + 0.5 * (x.float() @ a.float().T) @ b.float().T
            ref_dx = dy.float() @ w.float() + 0.5 * (dy.float() @ b.float()) @ a.float()
            for cfg in (None, GemmConfig(16, 32, 128, num_warps=4, num_stages=5),
                        GemmConfig(64, 32, 128, num_warps=4, num_stages=5), GemmConfig(128, 128, 64, num_warps=8, num_stages=3)):
                tag = "default" if cfg is None else f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
                y, _ = lora_gemm(x, w, a, b, None, 0.5, config=cfg)
                dx, dyb = lora_gemm(dy, w.T, b.T, a.T, None, 0.5, config=cfg)
                xs = torch.randn(M, K + 5, device=dev, dtype=dt)[:, 2:K + 2]
                xs.copy_(x)
                ys, _ = lora_gemm(xs, w, a, b, None, 0.5, config=cfg)
                print(f"layout {str(dt)[6:]} M{M} K{K} N{N} r{R} {tag:12s} y {rel(y, ref_y):.2e} "
                      f"dx {rel(dx, ref_dx):.2e} dyb {rel(dyb, dy.float() @ b.float()):.2e} "
                      f"y(sliced x) {rel(ys, ref_y):.2e}")


def overhead():
    dev = "cuda"
    for M in (16, 8192):
        layer = fastlora.LoRALinear(4096, 4096, r=16, device=dev, dtype=torch.bfloat16, init_lora_weights=False)
        x = torch.randn(M, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, 4096, device=dev, dtype=torch.bfloat16)
        for name, fn in (
            ("lora_linear fwd", lambda: layer(x)),
            ("fwd+bwd", lambda: torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], dy)),
            ("F.linear fwd", lambda: torch.nn.functional.linear(x, layer.weight)),
            ("lora_gemm launch", lambda: lora_gemm(x.detach(), layer.weight, layer.lora_A, layer.lora_B, None, 1.0)),
            ("lora_skinny launch", lambda: lora_skinny(dy, dy[:, :16], 1.0)),
        ):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n * 1e6
            print(f"overhead M{M} {name:20s} host {host:8.1f} us/call  wall {wall:8.1f} us/call")


if __name__ == "__main__":
    layouts()
    overhead()
