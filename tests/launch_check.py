"""fastlora's kernel launches through Triton's ``JITFunction.run`` and through kernels/launch.py's
remembered path, side by side, without a GPU: a stand-in driver reports an sm_90 device, the kernels
compile for it for real, and each compiled kernel's launcher records its call instead of running.

Prints JSON: per launch, whether both paths chose the same compiled kernel and handed its launcher
the same arguments, whether the remembered path served the repeat without Triton's binder, and
the host time of each path per launch (microseconds, the launch itself a no-op); per training step
of each route (``step_replays``), the same comparison over its sequence of launches. Runs without
TRITON_INTERPRET (tests/test_launch.py starts it in a subprocess); ``--times`` prints the times as a
table instead; ``--step`` prints the host time of a whole training step through each Triton route
(16 x 256, bf16, r=16) with launches through Triton's path and through ``launch``; ``--count`` its
launches (Triton's and the other ATen calls that launch kernels) at 16 x 256 and 2048 x 4096."""
import dataclasses
import functools
import inspect
import json
import statistics
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from fastlora import kernels
from fastlora.kernels import configs, dequant, gemm, launch, passes
from fastlora.linear4bit import packed_4bit
from fastlora.quant4bit import quantize


class StandInDriver:
    """What Triton's launch path asks of the driver, for one sm_90 device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


CALLS = []   # (compiled kernel, arguments) per launcher call, while RECORD
RECORD = True
BINDS = []   # one entry per JITFunction.run


def stand_in_gpu() -> None:
    """Triton's launch path against the stand-in driver: compiled kernels load nothing and their
    launchers record (or, RECORD off, skip) the call; fastlora's launchers see an H100."""
    driver.set_active(StandInDriver())
    CompiledKernel._init_handles = lambda self: None  # nothing to load: no GPU
    CompiledKernel.run = property(lambda self: lambda *args: CALLS.append((self, args)) if RECORD else None)
    info = configs.DeviceInfo((9, 0), 132, 232448)  # an H100's
    for module in (configs, gemm):
        module.device_info = lambda device: info
    for module in (gemm, passes, dequant):
        module.check_device = lambda *tensors: None
    cuda = torch.device("cuda", 0)  # the config functions' GPU rules, not the interpreter's
    for name in ("gemm_config", "xa_config", "reduce_config"):
        rule = getattr(configs, name)
        i = list(inspect.signature(rule).parameters).index("device")
        on_gpu = functools.wraps(rule)(lambda *a, _rule=rule, _i=i, **k: _rule(*a[:_i], cuda, *a[_i + 1:], **k))
        for module in (configs, kernels, gemm, passes):
            if hasattr(module, name):
                setattr(module, name, on_gpu)


def main() -> None:
    # on a Triton release not (yet) in VERIFIED_TRITON the path is off; replayed all the same, so
    # that the test can say whether the release may join the list
    assert launch._specialize is not None and not launch.INTERPRETED
    verified, launch.ENABLED = launch.ENABLED, True
    stand_in_gpu()
    if "--step" in sys.argv:
        return step_times()
    if "--count" in sys.argv:
        return step_counts()
    run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: (BINDS.append(self), run(self, *a, **k))[1]

    recorded = []
    for module in (gemm, passes, dequant):
        module.launch = lambda kernel, grid, *args, **kwargs: recorded.append((kernel, grid, args, kwargs))
    names = scenarios(recorded)
    for module in (gemm, passes, dequant):
        module.launch = launch.launch

    results = []
    for name, (kernel, grid, args, kwargs) in zip(names, recorded):
        CALLS.clear()
        kernel[grid](*args, **kwargs)
        theirs = CALLS[-1]
        launch.launch(kernel, grid, *args, **kwargs)   # the first time: Triton's path, remembered
        binds = len(BINDS)
        launch.launch(kernel, grid, *args, **kwargs)   # a repeat
        ours = CALLS[-1]
        results.append({
            "launch": name, "kernel": kernel.fn.__name__,
            "direct": len(BINDS) == binds,
            "same_kernel": ours[0] is theirs[0],
            "same_args": same(ours[1], theirs[1]),
            "compiled": id(theirs[0]),
            "arg_types": sorted({type(a).__name__ for a in args}),
            "triton_us": host_us(kernel[grid], args, kwargs),
            "launch_us": host_us(launch.launch, (kernel, grid, *args), kwargs),
        })
    steps = step_replays()
    if "--times" in sys.argv:
        print(f"triton {triton.__version__} ({'verified' if verified else 'not in VERIFIED_TRITON'})")
        for r in results:
            print(f"{r['launch']:28s} {r['kernel']:22s} Triton's path {r['triton_us']:5.1f} us, "
                  f"launch {r['launch_us']:5.1f} us")
    else:
        print(json.dumps({"triton": triton.__version__, "verified": verified, "launches": results,
                          "steps": steps}))


def step_times(M: int = 16, features: int = 256, steps: int = 1500) -> None:
    """Host time of a LoRALinear training step (bf16, r=16) through each Triton route, launches
    made through Triton's path and through ``launch``, interleaved twice (medians, us); the fused
    route also with its dX GEMM reading dY B from the dY pass (per-column-block partials and their
    sum) instead of computing it in its K loop (the rule's at this M)."""
    global RECORD
    RECORD = False
    kernels.INTERPRETED = True  # the routes take CPU tensors (the kernels themselves are compiled)
    import fastlora
    rule = kernels.gemm_config

    def dyb_read(*a, grad_input=False, **k):
        return dataclasses.replace(rule(*a, grad_input=grad_input, **k), xa_in_loop=not grad_input)

    print(f"triton {triton.__version__}, launches no-ops (split's base GEMMs run on this CPU)")
    for route, name, config in (("fused", "fused", rule), ("fused", "fused, dY B read", dyb_read),
                                ("split", "split", rule)):
        kernels.gemm_config = config
        layer = fastlora.LoRALinear(features, features, r=16, backend=route, dtype=torch.bfloat16,
                                    init_lora_weights=False)
        x = torch.randn(M, features, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, features, dtype=torch.bfloat16)
        times = {False: [], True: []}
        for enabled in (False, True, False, True):
            launch.ENABLED = enabled
            for _ in range(30):
                torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], dy)
            ts = []
            for _ in range(steps):
                t = time.perf_counter()
                torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], dy)
                ts.append(time.perf_counter() - t)
            times[enabled].append(statistics.median(ts) * 1e6)
        print(f"{name:16s} {M} x {features}: Triton's path " + " ".join(f"{t:.0f}" for t in times[False])
              + " us a step, launch " + " ".join(f"{t:.0f}" for t in times[True]))
    kernels.gemm_config = rule


def step_counts(sizes=((16, 256), (2048, 4096))) -> None:
    """A training step's launches through each Triton route (bf16, r=16, the config functions'
    H100 rules): its Triton launches and its other ATen calls that launch kernels (allocations and
    views left out), at M x features each of ``sizes``."""
    global RECORD
    RECORD = False
    kernels.INTERPRETED = True  # the routes take CPU tensors (the kernels themselves are compiled)
    import fastlora
    from fastlora.bench import KernelCalls
    names = []
    for module in (gemm, passes):
        module.launch = lambda kernel, grid, *a, **k: (names.append(kernel.fn.__name__),
                                                       launch.launch(kernel, grid, *a, **k))

    print(f"triton {triton.__version__}; a training step's launches (H100 rules)")
    for M, features in sizes:
        for route in ("fused", "split"):
            layer = fastlora.LoRALinear(features, features, r=16, backend=route, dtype=torch.bfloat16,
                                        init_lora_weights=False)
            x = torch.randn(M, features, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(M, features, dtype=torch.bfloat16)
            torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], dy)
            names.clear()
            with KernelCalls() as aten:
                torch.autograd.grad(layer(x), [x, layer.lora_A, layer.lora_B], dy)
            print(f"{route:5s} {M:5d} x {features:5d}: {len(names)} Triton launches "
                  f"({' '.join(names)}), {len(aten.calls)} other kernels ({' '.join(aten.calls)})")


def step_replays() -> list:
    """Whole training steps (bf16 layers, 64 x 128, r=16) through each Triton route, with and
    without dropout, DoRA, a 4-bit base: the launches of a step made through Triton's path, then
    (after a step that fills the remembered path) through ``launch``; per step, whether the two
    sequences launch the same compiled kernels with alike arguments (tensors by dtype, shape,
    strides and 16-byte alignment: each step allocates its own) and whether every launch of the
    second skipped Triton's binder. A step of each kind runs first (DoRA's ||W_n||^2 is computed
    once, then cached)."""
    import fastlora
    kernels.INTERPRETED = True  # the routes take CPU tensors (the kernels themselves are compiled)
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(1)

    def lora(route, **kw):
        return fastlora.LoRALinear(128, 128, r=16, backend=route, dtype=bf, init_lora_weights=False, **kw)

    def qlora(route):
        base = fastlora.quantize_4bit(torch.nn.Linear(128, 128, dtype=bf), quant_type="nf4")
        return fastlora.LoRALinear4bit(base, r=16, backend=route, init_lora_weights=False)

    layers = {f"{route}{name}": make(route) for route in ("fused", "split") for name, make in (
        ("", lambda r: lora(r)), (", dropout", lambda r: lora(r, dropout=0.1)),
        (", DoRA", lambda r: lora(r, use_dora=True)))}
    layers["fused, 4-bit W"] = qlora("fused")
    out = []
    for name, layer in layers.items():
        layer.train()
        x = torch.randn(64, 128, generator=g).to(bf).requires_grad_(True)
        dy = torch.randn(64, 128, generator=g).to(bf)
        params = [x, *(p for p in layer.parameters() if p.requires_grad)]
        seq = {}
        for enabled in (False, False, True, True):  # (the first warms DoRA's cached norm up)
            launch.ENABLED = enabled
            CALLS.clear()
            binds = len(BINDS)
            torch.manual_seed(0)
            torch.autograd.grad(layer(x), params, dy)
            seq[enabled] = ([(c, alike(args)) for c, args in CALLS], len(BINDS) - binds)
        (theirs, _), (ours, bound) = seq[False], seq[True]
        out.append({"step": name, "launches": len(ours), "same": ours == theirs, "direct": bound == 0})
    launch.ENABLED = True
    return out


def alike(args: tuple) -> tuple:
    """A launcher call's arguments, tensors by what a kernel's specialisation and addressing see."""
    def one(i, a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
        if type(a).__name__ == "TensorDescriptor":
            return ("desc", one(0, a.base), tuple(a.shape), tuple(a.strides), tuple(a.block_shape))
        if i == 6:  # launch metadata: a fresh dict per launch
            return type(a)
        return a if isinstance(a, (int, float, str, bool, type(None))) else id(a)
    return tuple(one(i, a) for i, a in enumerate(args))


def same(a: tuple, b: tuple) -> bool:
    """The same launcher arguments: objects identical, numbers equal, launch metadata alike."""
    if len(a) != len(b):
        return False
    for i, (u, v) in enumerate(zip(a, b)):
        if i == 6:  # launch metadata: a fresh dict (or None) per launch
            if type(u) is not type(v):
                return False
        elif isinstance(u, (int, float, str, bool, type(None))):
            if type(u) is not type(v) or u != v:
                return False
        elif u is not v:
            return False
    return True


def host_us(call, args: tuple, kwargs: dict, reps: int = 300) -> float:
    """Median microseconds of ``call(*args, **kwargs)`` over 3 runs of ``reps``, nothing recorded."""
    global RECORD
    RECORD = False
    for _ in range(20):
        call(*args, **kwargs)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            call(*args, **kwargs)
        runs.append((time.perf_counter() - t) / reps * 1e6)
    RECORD = True
    return statistics.median(runs)


def scenarios(recorded: list) -> list:
    """Call each launcher on CPU tensors, its launches recorded into ``recorded``, not made;
    returns a name for each launch."""
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(dtype)

    def misaligned(*shape):  # one element past a 16-byte boundary
        return torch.randn(shape[0] * shape[1] + 1, generator=g).to(bf)[1:].view(*shape)

    M, N, K, R = 64, 96, 64, 16
    x, w, a, b, bias, dy = rnd(M, K), rnd(N, K), rnd(R, K), rnd(N, R), rnd(N), rnd(M, N)
    seed = torch.tensor([1234], dtype=torch.int64)
    xa = rnd(M, R, dtype=torch.float32)
    w4 = packed_4bit(quantize(torch.randn(N, K, generator=g), "nf4", 64, True))
    tma = configs.GemmConfig(64, 64, 64, tma=True, epilogue_subtile=True)
    # (where Triton warp-specializes it: configs.WARP_SPECIALIZE; else the TMA path)
    ws = configs.GemmConfig(128, 128, 64, num_warps=4, num_stages=4, tma=True, xa_in_loop=False,
                            warp_specialize=True)
    nested = (w4.scale, w4.code8, w4.offset, w4.nested_blocksize)
    calls = {
        "gemm forward": lambda: gemm.lora_gemm(x, w, b, bias, 0.5, u=a),
        "gemm forward, misaligned x": lambda: gemm.lora_gemm(misaligned(M, K), w, b, bias, 0.5, u=a),
        "gemm forward, TMA": lambda: gemm.lora_gemm(x, w, b, bias, 0.5, u=a, config=tma),
        "gemm dX, TMA": lambda: gemm.lora_gemm(dy, w, a, None, 0.5, grad_input=True, xa=xa, config=tma),
        "gemm forward, warp-specialized": lambda: gemm.lora_gemm(x, w, b, bias, 0.5, xa=xa, config=ws),
        "gemm forward, xa read": lambda: gemm.lora_gemm(x, w, b, None, 0.5, xa=xa),
        "gemm dX, dropout, W strided": lambda: gemm.lora_gemm(dy, w.T.contiguous().T, a, None, 0.5, grad_input=True,
                                                   xa=xa, dropout=(seed, 0.1)),
        "gemm 4-bit forward": lambda: gemm.lora_gemm(x, w4, b, bias, 0.5, u=a),
        "xa pass, dropout": lambda: kernels.xa_pass(x, a, dropout=(seed, 0.1)),
        "xa pass, K=17, M=1": lambda: kernels.xa_pass(rnd(1, 17), rnd(R, 17)),
        # K in 3 chunks: the partials summed by each row block's last program, in float32 and bfloat16
        "xa pass, split, x-dtype copy": lambda: kernels.xa_pass(x, a, also=bf,
                                                                config=configs.PassConfig(32, 16, splits=3)),
        "dy pass": lambda: kernels.dy_pass(dy, xa, b, 0.5),
        # rows in 2 chunks, columns in 3 blocks: dB's partials summed in the pass (in bfloat16), dY B's
        # by a launch
        "dy pass, split": lambda: kernels.dy_pass(dy, xa, b, 0.5, db_dtype=bf,
                                                  config=configs.PassConfig(32, 32, splits=2)),
        "x pass, dropout": lambda: kernels.x_pass(x, xa, a, 0.5, dropout=(seed, 0.1), need_dx=True),
        "dropout mask": lambda: kernels.dropout_mask(seed, (M, K), 0.1),
        "dequantize 4-bit": lambda: dequant.dequantize_4bit(w4.packed, w4.absmax, w4.code, (N, K), 64,
                                                            bf, nested=nested),
    }
    names = []
    for name, fn in calls.items():
        before = len(recorded)
        fn()
        names += [f"{name} #{i}" for i in range(len(recorded) - before)]
    return names


if __name__ == "__main__":
    main()
