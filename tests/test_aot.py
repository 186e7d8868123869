"""Every kernel in its production configs compiles for sm_80 and sm_90 without a GPU
(triton.compile), uses wgmma for bf16/fp16 on sm_90, fits shared memory and spills no registers.

The compiles run in a subprocess: this test process defined the kernels in interpreter mode."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

import aot  # noqa: E402

ITEMS = [("gemm", it) for it in aot.production_gemm_configs()] + \
        [("skinny", it) for it in aot.production_skinny_configs()]
SMEM = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, os.path.join(here, "aot.py")], env=env, cwd=here,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind,item", ITEMS, ids=[aot.item_id(k, it) for k, it in ITEMS])
def test_production_config_compiles_without_spills(compiled, kind, item):
    dtype, cap = item[2], item[3]
    for mode, info in compiled[aot.item_id(kind, item)].items():
        assert info["shared"] <= SMEM[cap], f"{mode}: {info['shared']} B shared memory"
        if info["spills"] >= 0:  # -1: ptxas not shipped with this triton
            assert info["spills"] == 0, f"{mode}: {info['spills']} bytes spilled ({info['registers']} registers)"
        if cap == 90 and dtype in (torch.bfloat16, torch.float16) and kind == "gemm" and item[0].block_m >= 64:
            assert info["wgmma"], f"{mode}: no wgmma in the sm_90 PTX"  # (a warpgroup needs 64 rows)
