"""The ``fastlora`` command: ``demo`` (default), ``bench`` and ``check``.

Every argument is checked when the command line is parsed, before any work: a bad one is a one-line
``fastlora COMMAND: error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch


def _device(device: torch.device | None) -> torch.device:
    """``--device`` as parsed, or the default: cuda if present, else cpu."""
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------
# demo


def demo(args) -> int:
    """Wrap an nn.Linear, print what trains, and fit a low-rank change of its output."""
    import fastlora

    device = _device(args.device)
    torch.manual_seed(0)
    d_in, d_out, r = 512, 512, 8
    base = torch.nn.Linear(d_in, d_out, device=device)
    layer = fastlora.LoRALinear.from_linear(base, r=r, alpha=16)
    print(layer)
    print(fastlora.count_parameters(layer))
    from .routes import resolve
    print(f"device: {device}, route: {resolve(layer.backend, base.weight, r)}")

    # the task: the base layer plus an unknown rank-4 update; only the adapters may learn it
    target_delta = (torch.randn(d_out, 4, device=device) @ torch.randn(4, d_in, device=device)) * 0.05
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    start = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(256, d_in, device=device)
        with torch.no_grad():
            target = base(x) + x @ target_delta.T
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0 or (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.5f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.2f} s; the frozen weight has no "
          f"gradient: {base.weight.grad is None}")
    return 0


# ------------------------------------------------------------------------------------------------
# bench


# --dora times the providers interleaved on CUDA too: its bar is a ratio of two providers' times.
DORA_CUDA_ROUNDS = 5


def bench(args) -> int:
    from . import bench as B
    from . import bench_model as BM

    device = _device(args.device)
    cuda = device.type == "cuda"
    dtype = B.DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    progress = B.progress_printer() if not args.quiet else None
    if args.model:  # a whole decoder's training step (fastlora/bench_model.py)
        default = BM.DORA_DEFAULT if args.dora else [p for p in BM.PROVIDERS if p not in BM.DORA_PROVIDERS]
        rows = BM.run(args.model, args.providers or list(default), device, dtype,
                      tokens=args.tokens or (8192 if cuda else 512), seq=args.seq or (2048 if cuda else 128),
                      rank=(args.rank or [16])[0], layers=args.layers, cpu_rounds=args.rounds,
                      progress=progress, base=args.base)
        table, plot = BM.format_table, BM.plot
    else:
        if args.shape:
            shapes = args.shape
        else:
            preset = args.preset or ("llama" if cuda else "small")
            ms = args.M or ([1, 16, 256, 2048, 8192] if cuda else [256, 2048])
            shapes = [(m, k, n) for k, n in B.PRESETS[preset] for m in ms]
        if args.dora:
            providers = args.providers or list(B.DORA_DEFAULT)
        elif args.base != "dense":  # QLoRA: the floor, PEFT over bitsandbytes, and fastlora
            providers = args.providers or ["base", "peft", "fastlora"]
        else:
            providers = args.providers or (["base", "reference", "peft", *B.FASTLORA_BACKENDS] if cuda
                                           else ["base", "reference", "peft", "fastlora"])
        rows = B.run(shapes, args.rank or [16], dtype, args.mode or ["fwd", "full"], providers, device,
                     dropout=args.dropout, cpu_rounds=args.rounds, cuda_rep=args.rep, progress=progress,
                     cuda_rounds=DORA_CUDA_ROUNDS if args.dora else 1, base=args.base)
        table, plot = B.format_table, B.plot
    if progress:
        progress("done")
        sys.stderr.write("\n")
    env = B.environment(device)
    print(table(rows, env))
    if args.json:
        B.write_json(args.json, rows, env)
    if args.csv:
        B.write_csv(args.csv, rows, env)
    if args.plot:
        plot(args.plot, rows)
    return 1 if any(r.status in ("wrong", "error") for r in rows) else 0


# ------------------------------------------------------------------------------------------------
# check


CHECK_SHAPES = [(1, 97, 40, 1), (63, 97, 40, 3), (97, 45, 70, 16), (63, 33, 40, 64)]
CHECK_SHAPES_GPU = [(1, 4096, 4096, 16), (97, 1000, 600, 16), (2048, 4096, 11008, 16), (300, 512, 700, 128)]


def _check_cases(cuda: bool, quick: bool) -> list:
    """``fastlora check``'s rows; ``quick``: a row of each kind, in the dtype fastlora is for, with
    the GPU-sized shapes (benchmarks/gpu_check.sh's, whose time is short)."""
    from .checks import Case

    mixed = torch.bfloat16 if cuda else torch.float16
    nf4 = ("nf4", 64, True)
    qlora_gpu = [Case(M, 4096, 1536, 16, torch.bfloat16, adapter_dtype=torch.float32, quant=nf4)
                 for M in (16, 1024)] if cuda else []
    if quick:
        shapes = [CHECK_SHAPES[1]] + (CHECK_SHAPES_GPU[1:] if cuda else [])
        return [Case(M, K, N, r, mixed) for M, K, N, r in shapes] + [
            Case(63, 97, 40, 16, mixed, adapter_dtype=torch.float32, bias_grad=True),
            Case(63, 33, 40, 3, mixed, dropout_p=0.3, layout="3d"),
            Case(97, 45, 70, 16, mixed, dora=True), Case(63, 33, 40, 3, mixed, dropout_p=0.3, dora=True),
            Case(63, 128, 40, 16, mixed, quant=nf4)] + qlora_gpu
    dtypes = [torch.float64, torch.float32, torch.float16] + ([torch.bfloat16] if cuda else [])
    shapes = CHECK_SHAPES + (CHECK_SHAPES_GPU if cuda else [])
    cases = [Case(M, K, N, r, dt) for M, K, N, r in shapes for dt in dtypes]
    cases += [Case(63, 97, 40, 16, mixed, adapter_dtype=torch.float32, bias_grad=True),
              Case(63, 33, 40, 3, torch.float32, layout="transposed"),
              Case(63, 33, 40, 3, torch.float64, dropout_p=0.3, layout="3d")]
    # DoRA (docs/dora.md): the magnitude's gradient held to the same bound
    cases += [Case(97, 45, 70, 16, dt, dora=True) for dt in dtypes]
    cases += [Case(63, 97, 40, 16, mixed, adapter_dtype=torch.float32, bias_grad=True, dora=True),
              Case(63, 33, 40, 3, torch.float64, dropout_p=0.3, dora=True)]
    # QLoRA (docs/qlora.md): W in 4 bits, NF4 and FP4, plain and nested absmax, the 4-bit GEMM's
    # forms (x A^T in the loop at decode sizes, read above them; the dropout epilogue)
    cases += [Case(M, 128, 40, 16, dt, quant=q) for M in (1, 63) for dt in (torch.float32, mixed)
              for q in (nf4, ("fp4", 64, False))]
    cases += [Case(63, 128, 40, 16, mixed, adapter_dtype=torch.float32, bias_grad=True, quant=nf4),
              Case(63, 64, 24, 3, torch.float32, layout="3d", dropout_p=0.3, quant=("nf4", 32, True))]
    return cases + qlora_gpu


def _default_check_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def check(args) -> int:
    from . import checks
    from .checks import gradcheck

    device = _device(args.device)
    cuda = device.type == "cuda"
    backend = args.backend or _default_check_backend(device)
    cases = _check_cases(cuda, args.quick)
    print(f"fastlora check on {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), "
          f"backend {backend}, torch {torch.__version__}")
    print(f"{'case':48s} {'tensor':9s} {'error':>10s} {'bound':>10s}  result")
    failures = 0
    for dora, dropout_p in ((False, 0.0), (False, 0.4), (True, 0.0), (True, 0.4)):
        t0 = time.perf_counter()
        try:
            ok = gradcheck(backend, device=device, dropout_p=dropout_p, dora=dora)
        except Exception as e:  # gradcheck raises on mismatch
            ok, why = False, str(e).splitlines()[0][:60]
        else:
            why = ""
        failures += not ok
        name = f"gradcheck float64{' DoRA' if dora else ''} dropout={dropout_p}"
        print(f"{name:48s} {'all':9s} {'':>10s} {'':>10s}  {'PASS' if ok else 'FAIL ' + why}"
              f"  ({time.perf_counter() - t0:.1f} s)")
    for case in cases:
        try:
            results = checks.three_way(case, backend, device=device)
        except Exception as e:  # a case that cannot run is a failure, reported with the rest
            failures += 1
            print(f"{case.id:48s} {'-':9s} {'':>10s} {'':>10s}  FAIL {type(e).__name__}: {str(e)[:80]}")
            continue
        for r in results:
            failures += not r.ok
            print(f"{r.case:48s} {r.tensor:9s} {r.err:10.3g} {r.bound:10.3g}  {'PASS' if r.ok else 'FAIL'}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------


# Argument types: each turns a string into the value or raises ArgumentTypeError, which argparse
# reports as "argument --NAME: MESSAGE".


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        shape = tuple(int(v) for v in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected M,IN,OUT (three positive ints), got {text!r}")
    return shape


def _device_arg(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch "
                                         f"{torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} "
                                         f"CUDA device(s)")
    return device


def _output_file(text: str) -> str:
    """A path to write after the run: its directory must exist now, so a long run is not lost."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory!r} does not exist (for {text!r})")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    return text


def _plot_file(text: str) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("needs matplotlib (pip install matplotlib, or from a "
                                         "fastlora checkout pip install -e '.[bench]')")
    return _output_file(text)


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose error is one line, ``PROG: error: MESSAGE``, and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastlora", description="Fused LoRA linear layers: demo, benchmark, check.")
    sub = p.add_subparsers(dest="command")
    device_help = "cpu, cuda or cuda:N (default: cuda if present)"

    d = sub.add_parser("demo", help="wrap a linear layer and train its adapters for a few steps (default)")
    d.add_argument("--device", type=_device_arg, help=device_help)
    d.add_argument("--steps", type=_positive_int, default=60)

    b = sub.add_parser("bench", help="time LoRA layers against the frozen base F.linear and peers")
    b.add_argument("--preset", choices=["llama-7b", "llama3-8b", "llama", "small", "bars"],
                   help="projection shapes of a model (default: llama on GPU, small on CPU)")
    rows = b.add_mutually_exclusive_group()  # --M sets the rows of the preset shapes, --shape its own
    rows.add_argument("--M", type=_positive_int, nargs="+", help="rows (batch x sequence) for the preset shapes")
    rows.add_argument("--shape", type=_shape, action="append",
                      help="M,IN,OUT (repeatable); overrides --preset")
    b.add_argument("--rank", type=_positive_int, nargs="+", help="LoRA ranks (default 16)")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], help="default: bf16 on GPU, fp32 on CPU")
    b.add_argument("--mode", choices=["fwd", "bwd", "full"], nargs="+", help="default: fwd full")
    b.add_argument("--dropout", type=_probability, default=0.0)
    b.add_argument("--base", choices=["dense", "nf4", "fp4"], default="dense",
                   help="the frozen weight: dense (16-bit, default) or 4-bit in bitsandbytes' format "
                        "(QLoRA; the floor stays the dense base; peft then needs bitsandbytes)")
    b.add_argument("--providers", nargs="+", metavar="PROVIDER",
                   help="layer bench: base reference peft compiled fastlora fastlora-fused "
                        "fastlora-split fastlora-torch fastlora-dora peft-dora (default: base "
                        "reference peft fastlora, and on CUDA the three fastlora-ROUTE ones; "
                        "'compiled' compiles per shape: slow); --model: floor peft fastlora "
                        "fastlora-from-peft fastlora-dora peft-dora (default: all but the DoRA ones)")
    b.add_argument("--dora", action="store_true",
                   help="DoRA: default providers base fastlora fastlora-dora peft-dora (--model: "
                        "floor fastlora fastlora-dora peft-dora), timed interleaved on CUDA too; "
                        "'x lora' is fastlora-dora's time over fastlora's")
    b.add_argument("--model", choices=["tiny", "llama3-8b"],
                   help="time a whole decoder's training step instead (tiny: CPU-sized; llama3-8b: "
                        "Llama-3-8B-wide layers, a few of them)")
    b.add_argument("--tokens", type=_positive_int, help="--model: tokens a step (default 8192 on CUDA, 512 on CPU)")
    b.add_argument("--seq", type=_positive_int, help="--model: sequence length (default 2048 on CUDA, 128 on CPU)")
    b.add_argument("--layers", type=_positive_int, help="--model: decoder layers (default: the model's)")
    b.add_argument("--rep", type=_positive_int, default=100, help="CUDA: ms of timed repeats a measurement")
    b.add_argument("--device", type=_device_arg, help=device_help)
    b.add_argument("--rounds", type=_positive_int, default=15, help="CPU: interleaved timing rounds")
    b.add_argument("--json", type=_output_file, help="write the rows as JSON")
    b.add_argument("--csv", type=_output_file, help="write the rows as CSV")
    b.add_argument("--plot", type=_plot_file, help="draw ratio-to-base against M (needs matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress line")
    b.set_defaults(bench_parser=b)

    c = sub.add_parser("check", help="correctness checks on this device; exits non-zero on any failure")
    c.add_argument("--device", type=_device_arg, help=device_help)
    c.add_argument("--backend", choices=["triton", "fused", "split", "torch"],
                   help="default: triton on CUDA, torch on CPU (triton on CPU needs TRITON_INTERPRET=1)")
    c.add_argument("--quick", action="store_true",
                   help="a few rows of each kind (bfloat16 on CUDA, float16 on the CPU; the larger "
                        "shapes; DoRA, QLoRA, dropout, mixed dtypes): benchmarks/gpu_check.sh's")
    c.set_defaults(check_parser=c)
    return p


def _backend_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (the operator's own message, whole), or None. An
    empty input resolves the backend and launches nothing."""
    import fastlora

    t = torch.zeros(1, 1, device=device)
    try:
        fastlora.lora_linear(torch.zeros(0, 1, device=device), t, None, t, t, 1.0, backend=backend)
    except ValueError as err:
        return str(err)
    return None


def _check_providers(args) -> None:
    """--providers names providers of the bench being run (the layer's or, with --model, the model's)."""
    from . import bench as B
    from . import bench_model as BM

    known = BM.PROVIDERS if args.model else B.PROVIDERS
    unknown = [p for p in args.providers or [] if p not in known]
    if unknown:
        args.bench_parser.error(f"argument --providers: {unknown[0]!r} is not a provider of the "
                                f"{'model' if args.model else 'layer'} bench; choose from {', '.join(known)}")
    dense_only = [p for p in args.providers or [] if not args.model and args.base != "dense"
                  and p not in B.PROVIDERS_4BIT]
    if dense_only:
        args.bench_parser.error(f"argument --providers: {dense_only[0]!r} does not run over a 4-bit base "
                                f"(--base {args.base}); choose from {', '.join(B.PROVIDERS_4BIT)}")
    if args.model and (args.shape or args.M or args.preset):
        args.bench_parser.error("argument --model: times a whole model; --shape, --M and --preset "
                                "are the layer bench's")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo", "bench", "check", "-h", "--help"):
        argv = ["demo", *argv]  # demo is the default command
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        _check_providers(args)
    if args.command == "check":
        device = _device(args.device)
        problem = _backend_problem(args.backend or _default_check_backend(device), device)
        if problem:
            args.check_parser.error(problem)
    return {"demo": demo, "bench": bench, "check": check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
