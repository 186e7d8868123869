"""Kernel launches with less host time than ``kernel[grid](...)``: Triton's own choice, remembered.

``JITFunction.run`` binds and specialises every argument again at each launch (a generated
binder over all of a kernel's parameters, then a cache key hashing them all) before it calls the
compiled kernel's launcher. With the launch itself a no-op (a stand-in driver, no GPU: the harness
of tests/launch_check.py, ``--times``), that path took about 21 us for the GEMM's 50 parameters
and 16 us for a reduction pass's 36 on this project's 2-core CPU, triton 3.6 and 3.9 alike, and a
training step makes three to six launches. ``launch`` keeps, per kernel and device, the compiled
kernel that Triton's own path chose for

- the constexpr parameters' and the options' values (num_warps, ...), as passed;
- each runtime argument's specialisation, from Triton's own specialiser with the parameter's own
  flags (a pointer's dtype and 16-byte alignment, an integer's width and whether it is 1 or
  divisible by 16, a tensor descriptor's block shape), so an argument that would compile
  differently never meets a kernel compiled for another;
- the knobs Triton folds into its options at each launch (debug, instrumentation),

and on a repeat calls that kernel's launcher with the arguments ``JITFunction.run`` passes it
(about 11 and 9 us in the same harness). Everything else takes ``kernel[grid]``, which compiles when it
must, and its choice is remembered: the first launch of each key, a Triton version whose launch
path tests/launch_check.py has not replayed against ``JITFunction.run``, the interpreter, a kernel
with pre-run hooks or global values, and a stages-inspection hook.
"""
from __future__ import annotations

from itertools import repeat

import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .common import INTERPRETED

try:  # what JITFunction's binder calls for each runtime argument (triton >= 3.4)
    from triton._C.libtriton import native_specialize_impl as _specialize
except ImportError:  # pragma: no cover - older triton: Triton's own path only
    _specialize = None

# the Triton releases whose JITFunction.run tests/launch_check.py replays against ``launch``
VERIFIED_TRITON = ("3.6", "3.7", "3.8", "3.9")
ENABLED = (not INTERPRETED and _specialize is not None
           and ".".join(triton.__version__.split(".")[:2]) in VERIFIED_TRITON)


class _Plan:
    """A kernel on a device: the specialiser flags of its leading runtime parameters, the backend
    whose specialiser Triton calls, and by key the compiled kernels its launches chose, each with
    the values of the parameters after the positional ones (the key fixes them: constexprs)."""

    def __init__(self, kernel, backend):
        params = kernel.params
        self.names = [p.name for p in params]
        self.runtime = {p.name for p in params if not p.is_constexpr}
        lead = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        self.lead = lead  # the runtime parameters before the first constexpr
        self.is_const = [p.is_const for p in params[:lead]]
        self.specialize = [not p.do_not_specialize for p in params[:lead]]
        self.align = [not p.do_not_specialize_on_alignment for p in params[:lead]]
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.backend = backend
        self.compiled = {}

    def key(self, args: tuple, kwargs: dict) -> tuple:
        # (map, not a comprehension: 3.9 against 6.2 us for the GEMM's 26 arguments)
        return (tuple(map(_specialize, repeat(self.backend), args, self.is_const, self.specialize, self.align)),
                tuple(kwargs.items()), knobs.runtime.debug, knobs.compilation.instrumentation_mode,
                getattr(knobs.compilation, "fpsan_homomorphic_casts", None))

    def remember(self, compiled, args: tuple, kwargs: dict) -> None:
        """Keep ``compiled`` for calls like this one, when their key holds every argument: each
        positional one a leading runtime parameter's, each keyword one a constexpr or an option
        (other calls always take Triton's path)."""
        if len(args) == self.lead and not any(name in self.runtime for name in kwargs):
            tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])
            self.compiled[self.key(args, kwargs)] = (compiled, tail)


_PLANS: dict = {}


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``triton.jit`` kernel, a grid tuple, the runtime
    arguments by position and the constexprs and options by keyword (see the module docstring)."""
    if not ENABLED or not isinstance(kernel, JITFunction):  # (a test's wrapper, say)
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    plan = _PLANS.get((id(kernel), device))
    plain = not kernel.pre_run_hooks and getattr(knobs.runtime, "add_stages_inspection_hook", None) is None
    if plan is not None and plain:
        hit = plan.compiled.get(plan.key(args, kwargs))
        if hit is not None:
            compiled, tail = hit
            bound = (*args, *tail)  # what Triton's binder returns: every parameter, in order
            stream = driver.active.get_current_stream(device)
            compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                         stream, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid, stream, *bound),
                         knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)
            return
    compiled = kernel[grid](*args, **kwargs)
    if compiled is None or not plain or kernel.used_global_vals:
        return
    if plan is None:  # (kernels live as long as their modules: their ids stay theirs)
        plan = _PLANS[(id(kernel), device)] = _Plan(kernel, kernel.device_caches[device][3])
    plan.remember(compiled, args, kwargs)
