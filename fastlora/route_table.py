"""Which route runs a pass under backend="triton" (what "auto" picks on a GPU), from measured data.

``route_table.json`` (beside this file) holds runs of ``benchmarks/tune_routes.py``: each names the
GPU, torch and triton versions, the date and the command, and lists for every problem it timed
the fastest route for each pass, "fused", "split" or "torch", and the fused route's best launch
config; and, for whole training steps, whether PyTorch's autograd differentiating
the torch route's forward ops ("autograd": C++ backward nodes, no Python backward) beat the
hand-written backward with the passes as chosen ("function"). A problem is keyed by

    (GPU generation, dtype, M bucket, out_features N, in_features K, rank bucket, dropout on/off,
     pass: "fwd", "bwd" or "step")

with M rounded up to a power of two and the rank to its kernel block (rank_block). Where several
runs cover a key, the newest wins. A problem the table does not hold falls back to ``RULE`` (and
a step to "function"). The table is read once, when a Triton route first asks.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

TABLE_PATH = os.path.join(os.path.dirname(__file__), "route_table.json")
ABOUT = ("Measured routes per GPU generation and problem, written by benchmarks/tune_routes.py "
         "(each run with its device, versions, date and command), read by fastlora/route_table.py.")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}
# Below this M the fused route's single launch wins, at or above it cuBLAS's main loop does (the
# one GPU measurement behind it: benchmarks/NOTES.md, README's GPU table).
SPLIT_FROM_M = 256


def RULE(M: int) -> str:
    """The route for a problem the table does not hold."""
    return "split" if M >= SPLIT_FROM_M else "fused"


@dataclass(frozen=True)
class Choice:
    route: str                       # "fused", "split" or "torch"
    gemm: Optional[dict] = None      # the fused route's measured launch config (GemmConfig fields)
    measured: bool = False           # False: from RULE


def generation(device: torch.device) -> str:
    """"sm90" for a compute capability 9.0 GPU; "interpreter" for Triton's CPU interpreter."""
    if device.type != "cuda":
        return "interpreter"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_generation(index)


@functools.lru_cache(maxsize=None)
def _cuda_generation(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def _pow2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def key(gen: str, dtype: str, M: int, N: int, K: int, R: int, dropout: bool, pass_: str) -> tuple:
    """The table key of a problem (M and R bucketed as the kernels bucket them)."""
    return (gen, dtype, _pow2(M), N, K, max(16, _pow2(R)), bool(dropout), pass_)


@functools.lru_cache(maxsize=4)
def load(path: str = TABLE_PATH) -> dict[tuple, dict]:
    """The table's entries by key, newest run last (so it wins)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != 1:
        raise ValueError(f"fastlora: {path} has route-table format {data.get('format')!r}, expected 1")
    entries = {}
    for run in sorted(data.get("runs", []), key=lambda r: r["date"]):
        for e in run["entries"]:
            k = key(run["generation"], e["dtype"], e["M"], e["N"], e["K"], e["rank"], e["dropout"],
                    e["pass"])
            entries[k] = e
    return entries


def autograd_step(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, R: int,
                  dropout: bool) -> bool:
    """Whether a training step was measured faster through autograd's path (the torch route's
    forward ops, differentiated by PyTorch) than through the hand-written backward."""
    entry = load(TABLE_PATH).get(key(generation(device), DTYPE_NAMES.get(dtype), M, N, K, R, dropout, "step"))
    return entry is not None and entry["route"] == "autograd"


def choose(pass_: str, device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, R: int,
           dropout: bool) -> Choice:
    """The route (and, where measured, the fused route's config) for one pass of one problem."""
    name = DTYPE_NAMES.get(dtype)
    entry = load(TABLE_PATH).get(key(generation(device), name, M, N, K, R, dropout, pass_))
    if entry is None:
        return Choice(RULE(M))
    return Choice(entry["route"], entry.get("gemm"), measured=True)
