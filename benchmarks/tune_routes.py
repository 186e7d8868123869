"""Time every Triton route on this GPU and write the route table that backend="auto" reads.

    python benchmarks/tune_routes.py [--out fastlora/route_table.json] [--quick]

For each problem (bf16; M from decode to long prefill; Llama projection shapes; r = 16, 64;
dropout off and on) and each pass (forward; backward of x, A and B) it times the split route, the
fused route under a few launch configs and the torch route (cuBLAS for every product: the fewest
launches; under dropout with the kernels' mask, drawn once a pass), after checking each against
the split route's result, and records the fastest: route, the fused route's best config, and every
time measured (a decoding forward, M <= 16, as CUDA graph replays: GPU time alone, as the decode
bar measures it and as a served model runs; everything else eagerly, host time included). After
each problem's backward, whole training steps: the hand-written backward (the passes as just
chosen) against autograd's path (fastlora/autograd.py takes it where it won; under dropout only on
CUDA, where both draw the kernels' mask). The problems the bars measure come first, and the table
is written after every entry: a run cut short keeps what matters most.
The run is added to the table with the device, its generation, torch's
and triton's versions, the date and this command; runs of other GPUs are kept, and where two runs
cover a key the newest wins (fastlora/route_table.py). Under five minutes on an H100.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time

import torch


DECODE_M = 16  # forwards of at most this many rows are timed as CUDA graph replays


def fresh(drop):
    """A new Dropout with ``drop``'s seed and p (None stays None): an empty mask cache."""
    from fastlora.routes import Dropout
    return None if drop is None else Dropout(drop.seed, drop.p)


def check_close(got, ref, what: str) -> None:
    """Raise unless a pass's outputs equal the split route's to bf16 rounding (gradients not asked
    for, None, are skipped)."""
    got = got if len(ref) > 1 else got[:1]
    for a, b in zip(got, ref):
        if b is None:
            continue
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        if not err < 2e-2:
            raise AssertionError(f"the {what} differs from the split route by {err:.3g}")


def problems(quick: bool, dry_run: bool = False):
    """The problems, those the bars measure first (M 2048 and 8192, then the rest of M >= 256, then
    decoding), so that a run cut short by its timeout has measured what matters most."""
    ms = [2048, 8192, 256, 16, 1] if quick else [2048, 8192, 4096, 1024, 256, 64, 16, 1]
    shapes = [(4096, 4096), (14336, 4096)] + ([] if quick else [(4096, 14336)])
    ranks, dropout_from = (16, 64), 256
    if dry_run:
        ms, shapes, ranks, dropout_from = [1, 64], [(32, 48)], (16,), 64
    for M in ms:
        for N, K in shapes:
            for r in ranks:
                for dropout in ((False, True) if M >= dropout_from else (False,)):
                    for pass_ in (("fwd", "bwd") if M >= 64 else ("fwd",)):
                        yield M, N, K, r, dropout, pass_


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="the table to update (default: fastlora's own)")
    ap.add_argument("--quick", action="store_true", help="fewer M and shapes (for a short device call)")
    ap.add_argument("--rep", type=float, default=40, help="ms of timed repeats per measurement")
    ap.add_argument("--dry-run", action="store_true",
                    help="the same code on the CPU through Triton's interpreter (TRITON_INTERPRET=1), "
                         "tiny float32 problems timed by the wall clock: a test of this script, no "
                         "measurement (needs --out)")
    args = ap.parse_args()
    if args.dry_run and not (args.out and os.environ.get("TRITON_INTERPRET") == "1"):
        print("tune_routes: --dry-run needs --out and TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not (args.dry_run or torch.cuda.is_available()):
        print("tune_routes: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from fastlora import route_table
    from fastlora.bench import time_cuda
    from fastlora.routes import Dropout, Needs, triton_kernels
    from fastlora.torch_route import TorchRoute, draws_kernels_mask
    from fastlora.triton_routes import FusedRoute, SplitRoute

    kernels = triton_kernels()
    fused, split, torch_route = FusedRoute(kernels), SplitRoute(kernels), TorchRoute()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    dtype_name = route_table.DTYPE_NAMES[dtype]

    def bench(fn, graph: bool = False) -> float:
        """ms a call: eager (host time included, as a training step runs), or with ``graph`` the
        replay of a CUDA graph of calls (GPU time alone, as decoding is served)."""
        if args.dry_run:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        if graph:
            return time_cuda(fn, graph=True, rep=min(args.rep, 10))[0]  # replays vary little
        return triton.testing.do_bench(fn, warmup=10, rep=args.rep)
    out_path = args.out or route_table.TABLE_PATH
    started = time.time()
    entries = []
    run = dict(generation=route_table.generation(dev),
               device="dry run" if args.dry_run else torch.cuda.get_device_name(dev),
               capability=[0, 0] if args.dry_run else list(torch.cuda.get_device_capability(dev)),
               torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(["python benchmarks/tune_routes.py"] + [a for a in ("--quick", "--dry-run")
                                                                       if getattr(args, a[2:].replace("-", "_"))]),
               entries=entries)
    table = {"format": 1, "runs": []}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            table = json.load(f)
    table["about"] = route_table.ABOUT
    table["runs"].append(run)

    def write():
        """After every entry: a run its timeout cuts short keeps what it measured. Written whole to
        a temporary file and renamed over the table, so that a kill never leaves half a table."""
        run["seconds"] = round(time.time() - started, 1)
        with open(out_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        os.replace(out_path + ".tmp", out_path)

    g = torch.Generator(device=dev).manual_seed(0)
    cache = {}

    def tensors(M, N, K, r):
        key = (M, N, K, r)
        if key not in cache:
            cache.clear()
            rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).to(dtype)  # noqa: E731
            cache[key] = dict(x=rnd(M, K), w=rnd(N, K, scale=K ** -0.5), b=rnd(N), A=rnd(r, K, scale=K ** -0.5),
                              B=rnd(N, r, scale=r ** -0.5), dy=rnd(M, N))
        return cache[key]

    # Whole training steps, as users run them: the Function, its passes taking the routes just
    # measured, against autograd's path (the torch route's forward ops; C++ backward nodes, no
    # Python backward), host time included; under dropout where the torch route draws the
    # kernels' mask (the same mask both ways, from one seed). Timed right after the problem's
    # backward entry, so a run its timeout cuts short keeps whole problems.
    from fastlora.autograd import LoRALinearFunction
    route_table.TABLE_PATH = out_path

    def time_step(M, N, K, r, dropout):
        if dropout and not draws_kernels_mask(dev):
            return
        route_table.load.cache_clear()  # the entries just written
        t = tensors(M, N, K, r)
        x, a, b = (t[k].detach().requires_grad_(True) for k in ("x", "A", "B"))
        p = 0.1 if dropout else 0.0
        seed = torch.tensor([1234], device=dev) if dropout else None
        paths = {"function": lambda: LoRALinearFunction.apply(x, t["w"], t["b"], a, b, 2.0, p, seed,
                                                              "triton", None),
                 "autograd": lambda: torch_route.autograd_forward(x, t["w"], t["b"], a, b, 2.0,
                                                                  Dropout(seed, p) if p else None)}
        steps = {k: (lambda f=f: torch.autograd.grad(f(), [x, a, b], t["dy"])) for k, f in paths.items()}
        try:
            check_close(steps["autograd"](), steps["function"](), "autograd path's step")
            times = {k: bench(f) for k, f in steps.items()}
        except Exception as e:  # said; the problem keeps the Function (no entry)
            print(f"  skipped the step {M}x{N}x{K} r={r} dropout={int(dropout)}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:120]}")
            return
        path = min(times, key=times.get)
        entries.append(dict(dtype=dtype_name, M=M, N=N, K=K, rank=r, dropout=dropout, **{"pass": "step"},
                            route=path, gemm=None, ms={k: round(v, 5) for k, v in times.items()}))
        write()
        print(f"{M:5d} {N:6d} {K:6d} {r:3d} {int(dropout):4d} step  function {times['function']:.4f} "
              f"ms, autograd's path {times['autograd']:.4f} ms: {path}")

    print(f"{'M':>5} {'N':>6} {'K':>6} {'r':>3} {'drop':>4} {'pass':>4}  {'split ms':>9} {'fused ms':>9} "
          f"{'torch ms':>9}  route  fused config")
    for M, N, K, r, dropout, pass_ in problems(args.quick, args.dry_run):
        t = tensors(M, N, K, r)
        drop = Dropout(torch.tensor([1234], device=dev), 0.1) if dropout else None
        xa = split.forward(t["x"], t["w"], t["b"], t["A"], t["B"], 2.0, drop)[1]
        needs = Needs(True, True, True)

        def call(route, gemm=None, pass_=pass_, t=t, xa=xa, drop=drop, needs=needs):
            """The pass as a closure over this problem's tensors."""
            kw = {"gemm": gemm} if gemm else {}
            if pass_ == "fwd":
                return lambda: route.forward(t["x"], t["w"], t["b"], t["A"], t["B"], 2.0, drop, **kw)
            return lambda: route.backward(t["dy"], t["x"], t["w"], t["A"], t["B"], xa, 2.0, drop,
                                          needs, **kw)

        ref = call(split)()
        ref = ref if pass_ == "bwd" else ref[:1]
        # decoding (a forward of at most DECODE_M rows) is timed as CUDA graph replays: an eager
        # call there is all host time, the same for every config, and would rank them by noise
        graph = pass_ == "fwd" and M <= DECODE_M
        try:
            times = {"split": bench(call(split), graph)}
        except Exception as e:  # a capture that fails: this problem timed eagerly, said
            if not graph:
                raise
            print(f"  graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                  f"timed eagerly")
            graph = False
            times = {"split": bench(call(split), graph)}
        if not dropout or draws_kernels_mask(dev):  # the torch route, where its mask is the kernels'
            # a Dropout a call, as a pass gets one: the route draws its mask once a pass (and
            # keeps it in the Dropout), so a shared one would time the draw only once
            if pass_ == "fwd":
                def torch_call(t=t, drop=drop):
                    y, xa_ = torch_route.forward(t["x"], t["w"], t["b"], t["A"], t["B"], 2.0, fresh(drop))
                    return y, xa_.float()  # kept in the accumulator dtype, as backend="triton" keeps it
            else:
                def torch_call(t=t, xa=xa, needs=needs, drop=drop):
                    return torch_route.backward(t["dy"], t["x"], t["w"], t["A"], t["B"], xa, 2.0,
                                                fresh(drop), needs)
            try:  # a wrong result (or a failure) is said and the route not timed, as a fused config's
                check_close(torch_call(), ref, "torch route")
                times["torch"] = bench(torch_call, graph)
            except Exception as e:
                print(f"  skipped the torch route: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        best_cfg, best_ms = None, float("inf")
        candidates = kernels.gemm_candidates(M, kernels.rank_block(r), dtype.itemsize,
                                             kernels.device_info(dev), grad_input=pass_ == "bwd",
                                             dropout=dropout, warp_specialized=not args.quick)
        for cfg in candidates[:2] if args.dry_run else candidates:
            gemm = dataclasses.asdict(cfg)
            try:
                check_close(call(fused, gemm)(), ref, "fused route")
                ms = bench(call(fused, gemm), graph)
            except Exception as e:  # a config that does not compile or is wrong is skipped, said
                print(f"  skipped {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            times[f"fused {cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages}"
                  f"{' tma' if cfg.tma else ''}{' sub' if cfg.epilogue_subtile else ''}"
                  f"{' xa-loop' if cfg.xa_in_loop else ''}{' ws' if cfg.warp_specialize else ''}"] = ms
            if ms < best_ms:
                best_cfg, best_ms = gemm, ms
        route = min((("fused", best_ms), ("split", times["split"]), ("torch", times.get("torch", math.inf))),
                    key=lambda kv: kv[1])[0]
        entries.append(dict(dtype=dtype_name, M=M, N=N, K=K, rank=r, dropout=dropout, **{"pass": pass_},
                            route=route, gemm=best_cfg, ms={k: round(v, 5) for k, v in times.items()},
                            timing="graph" if graph else "eager"))
        write()
        print(f"{M:5d} {N:6d} {K:6d} {r:3d} {int(dropout):4d} {pass_:>4}  {times['split']:9.4f} "
              f"{best_ms:9.4f} {times.get('torch', math.nan):9.4f}  {route:5s}  {best_cfg}")
        if pass_ == "bwd":
            time_step(M, N, K, r, dropout)
    print(f"{len(entries)} entries in {run['seconds']} s; written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
