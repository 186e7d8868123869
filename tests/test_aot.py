"""Every kernel in its production configs compiles for sm_80 and sm_90 without a GPU
(triton.compile) and fits shared memory; in bfloat16 at ranks up to TUNED_RANK (what backend="auto"
runs on a GPU) it spills no registers (ptxas's report: a triton without a ptxas fails the test, it does not skip it), on
sm_90 its GEMMs use wgmma and the persistent GEMM's TMA configs load through the copy engine
(cp.async.bulk.tensor). float32 and float64 (the Triton routes only when forced; IEEE dots run on
FMA units) and ranks above TUNED_RANK must compile and fit; tests/aot.py --summary lists their
spills. The 4-bit forms (the dequantize kernel, the GEMM reading W in 4 bits) hold no fused
multiply-add. A pass split over chunks arrives at its counter with an acquire-release atomic at GPU
scope and reads its partials past L1.

The compiles run in a subprocess: this test process defined the kernels in interpreter mode."""

import pytest
import torch

from helpers import HAS_TRITON, run_compiled

if not HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

import aot  # noqa: E402
from fastlora.kernels import TUNED_RANK, configs  # noqa: E402

pytestmark = pytest.mark.slow

ITEMS = aot.all_items()
SMEM = {cap[0] * 10 + cap[1]: smem for cap, _, smem, _ in aot.GPUS}


@pytest.fixture(scope="module")
def compiled():
    return run_compiled("aot.py", timeout=1800)


def test_warp_specialized_candidates_only_where_triton_compiles_them():
    ws = [it for kind, it in ITEMS if kind == "gemm" and it[0].warp_specialize]
    assert bool(ws) == configs.WARP_SPECIALIZE


def test_the_production_configs_include_the_persistent_tma_gemm():
    tma = [it for kind, it in ITEMS if kind == "gemm" and it[0].tma and it[3] == 90]
    assert tma, "no sm_90 production config takes the TMA path: the checks below would not see it"


@pytest.mark.parametrize("kind,item", ITEMS, ids=[aot.item_id(k, it) for k, it in ITEMS])
def test_production_config_compiles_without_spills(compiled, kind, item):
    if kind == "dequant":  # any dtype: no spills, and no fused multiply-add (bit-exactness)
        info = compiled[aot.item_id(kind, item)]["dequant"]
        assert info["spills"] == 0 and not info["fma"], info
        return
    if kind == "sum":  # dY B's split partials' sum: any dtype, no spills
        info = compiled[aot.item_id(kind, item)]["sum"]
        assert info["spills"] == 0, info
        return
    dtype, cap = item[2], item[3]
    if kind == "pass":
        dtype, cap = item[3], item[4]
    for form, info in compiled[aot.item_id(kind, item)].items():
        assert info["shared"] <= SMEM[cap], f"{form}: {info['shared']} B shared memory"
        block_r = item[1] if kind in ("gemm", "gemm4bit") else item[2]
        if dtype in (torch.bfloat16, torch.float16) and block_r <= TUNED_RANK:  # what "auto" runs
            assert info["spills"] == 0, f"{form}: {info['spills']} bytes spilled ({info['registers']} registers)"
        if form.endswith("_split"):  # partials visible to the last program: its arrival releases
            # every thread's stores (after a barrier) and acquires the others', its loads skip L1
            assert info["arrival"], f"{form}: no acquire-release atomic add at GPU scope in the PTX"
            assert info["l2_loads"], f"{form}: the partials not read with ld.global.cg"
        if kind == "gemm4bit":  # launched without contraction: the nested absmax rounds twice
            assert not info["fma"], f"{form}: a fused multiply-add in the 4-bit GEMM"
        if kind in ("gemm", "gemm4bit") and cap == 90 and dtype in (torch.bfloat16, torch.float16):
            if item[0].block_m >= 64:  # a warpgroup's wgmma needs 64 rows
                assert info["wgmma"], f"{form}: no wgmma in the sm_90 PTX"
            if item[0].tma:
                assert info["tma"], f"{form}: no cp.async.bulk.tensor in the sm_90 PTX"
            if item[0].warp_specialize:  # (a tuning candidate only under WARP_SPECIALIZED_TRITON)
                assert info["setmaxnreg"], f"{form}: not warp-specialized (no setmaxnreg in the PTX)"
