"""kernels/launch.py against Triton's own launch path, without a GPU: tests/launch_check.py makes
each launcher's launches (GEMM forward and dX, pointers and tensor descriptors, 16-bit and 4-bit W,
every pass, the sum of split partials, the dropout mask, the dequantize kernel; then whole training steps of each route)
through ``JITFunction.run`` and through ``launch``, with a stand-in sm_90 driver (real compiles;
each compiled kernel's launcher records its call instead of making it). Both must pick the same
compiled kernel and hand it the same arguments, and a repeat must skip Triton's binder. The
subprocess runs without TRITON_INTERPRET: this test process defined the kernels in interpreter
mode."""

import pytest

from helpers import HAS_TRITON, run_compiled

if not HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

KERNELS = {"lora_gemm_kernel", "xa_kernel", "reduce_kernel", "sum_parts_kernel", "_dropout_mask_kernel",
           "dequant_4bit_kernel"}


@pytest.fixture(scope="module")
def replay():
    out = run_compiled("launch_check.py", timeout=900)
    if not out["verified"]:
        agree = all(r["same_kernel"] and r["same_args"] for r in out["launches"])
        agree = agree and all(r["same"] for r in out["steps"])
        pytest.skip(f"triton {out['triton']} is not in kernels/launch.py's VERIFIED_TRITON, so its "
                    f"remembered path is off there; the replay {'agreed' if agree else 'disagreed'} "
                    "with JITFunction.run")
    return out


@pytest.fixture(scope="module")
def launches(replay):
    return replay["launches"]


def test_each_launch_gets_tritons_kernel_and_arguments(launches):
    wrong = [r["launch"] for r in launches if not (r["same_kernel"] and r["same_args"])]
    assert not wrong, f"launch and JITFunction.run disagree on: {wrong}"


def test_a_repeated_launch_skips_tritons_binder(launches):
    bound = [r["launch"] for r in launches if not r["direct"]]
    assert not bound, f"repeats that went through JITFunction.run: {bound}"


def test_the_replay_covers_what_the_key_must_tell_apart(launches):
    by = {r["launch"]: r for r in launches}
    assert {r["kernel"] for r in launches} == KERNELS
    # the same constexprs, x 16-byte aligned or not: Triton compiles two kernels, so a key blind
    # to alignment would hand the second launch the first's kernel (and fail the test above)
    assert by["gemm forward #0"]["compiled"] != by["gemm forward, misaligned x #0"]["compiled"]
    assert any("TensorDescriptor" in r["arg_types"] for r in launches)


def test_training_steps_launch_as_through_tritons_path(replay):
    """Each route's training step (LoRA, dropout, DoRA; the fused route over a 4-bit W): the same
    compiled kernels with alike arguments, every launch of a repeated step past the binder."""
    steps = replay["steps"]
    assert len(steps) == 7 and all(r["launches"] >= 3 for r in steps)
    wrong = [r["step"] for r in steps if not (r["same"] and r["direct"])]
    assert not wrong, f"steps whose launches differ or were bound again: {wrong}"


def test_the_remembered_path_saves_host_time(launches):
    # the harness's no-op launch: Triton's path ~21 us a GEMM launch on a 2-core CI machine, ~11
    # through launch (a margin far above timing noise)
    gemm = [r for r in launches if r["kernel"] == "lora_gemm_kernel"]
    assert sum(r["launch_us"] for r in gemm) < 0.8 * sum(r["triton_us"] for r in gemm)
