"""bitsandbytes' 4-bit weight format (NF4 / FP4), read and written bit for bit in plain PyTorch.

For a frozen weight W [N, K] of dtype ``dtype`` (float16, bfloat16 or float32), flattened row-major
and cut into blocks of ``blocksize`` elements (blocks never straddle rows here: blocksize divides K):

    packed  uint8 [N K / 2, 1]      two 4-bit codes a byte: element 2i in the high nibble, 2i+1 low
    absmax  float32 [N K / bs]      the largest |W| of each block
    code    float32 [16]            what a 4-bit code stands for, in [-1, 1]: NF4 (quantiles of a
                                    normal distribution) or FP4 (1 sign, 2 exponent, 1 mantissa bit)

    W[i] = code[q_i] * absmax[i // bs]          in float32, rounded once to the dtype asked for

Nested absmax (bitsandbytes' ``compress_statistics``, QLoRA's double quantization): absmax is
stored as 8-bit codes of absmax - offset, in blocks of ``nested.blocksize`` (256) with their own
float32 absmax:

    absmax[j] = code8[qa_j] * scale[j // 256] + offset       float32, rounded after each operation

with code8 bitsandbytes' signed 8-bit dynamic map and offset = mean(absmax).

Reading needs no bitsandbytes: ``Weight4bit.from_bnb`` takes a ``Params4bit`` (or its
``QuantState``) by its attributes. ``quantize`` writes the same bytes as bitsandbytes'
``quantize_4bit`` run on the CPU (tests/test_quant4bit.py holds both directions against it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

QUANT_TYPES = ("nf4", "fp4")
# The block sizes bitsandbytes accepts for 4-bit weights.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# The dtypes a 4-bit weight dequantizes to (bitsandbytes' QuantState.dtype).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Block size of the nested (8-bit) absmax, as bitsandbytes writes it.
NESTED_BLOCKSIZE = 256

# NF4: the 16 quantiles bitsandbytes' create_normal_map(0.9677083) gives, as float32 literals.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# FP4 by bit pattern (sign, 2 exponent bits, 1 mantissa bit), divided by 12 below. Code 8 is +0.0,
# as bitsandbytes' table has it (its CUDA kernel writes -0.0 there: equal, not the same bits).
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_table(quant_type: str, device=None) -> Tensor:
    """The 16 float32 values a 4-bit code of ``quant_type`` stands for, indexed by the code."""
    check_quant_type(quant_type, "code_table")
    values = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32, device=device)
    return values / values.abs().max()  # FP4 to [-1, 1] (a float32 division, as bitsandbytes)


def dynamic_map(device=None) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()): 256 sorted float32 values in
    [-1, 1], a dynamic exponent (1e-6 .. 1) and a fraction sharing 7 bits; the nested absmax's code."""
    parts = []
    for i in range(7):  # exponent i: 2^i fraction values, both signs
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        parts += [(10 ** (-6 + i)) * means, (-(10 ** (-6 + i))) * means]
    values = torch.cat(parts + [torch.tensor([0.0, 1.0])])
    return values.sort().values.to(device)


# ------------------------------------------------------------------------------------------------
# the description


@dataclass(frozen=True, eq=False)
class NestedAbsmax:
    """A nested absmax's scales: ``absmax[j] = code[q[j]] * scale[j // blocksize] + offset``
    (float32), the codes q being the Weight4bit's ``absmax``."""
    scale: Tensor      # float32 [ceil(blocks / blocksize)]
    code: Tensor       # float32 [256]
    offset: Tensor     # float32, one element
    blocksize: int


@dataclass(frozen=True, eq=False)
class Weight4bit:
    """A frozen weight [N, K] in bitsandbytes' 4-bit layout (see the module docstring).

    ``absmax`` is the float32 absmax [N K / blocksize], or the uint8 codes of a nested one
    (``nested`` then holds the rest). ``dtype`` is the quant state's: what ``dequantize()`` gives by
    default. ``code`` [16] is the quant state's table (bitsandbytes writes the NF4/FP4 one), on
    the weight's device. Every inconsistency between the fields is a ValueError or TypeError when
    one is made.
    """
    packed: Tensor
    absmax: Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: Tensor
    nested: Optional[NestedAbsmax] = None

    def __post_init__(self):
        if isinstance(self.shape, (tuple, list, torch.Size)):
            object.__setattr__(self, "shape", tuple(self.shape))
        check_format(self)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def blocks(self) -> int:
        return self.shape[0] * self.shape[1] // self.blocksize

    def absmax_float(self) -> Tensor:
        """The float32 absmax [blocks], decoding a nested one (two roundings, no fused multiply-add,
        as bitsandbytes computes it)."""
        if self.nested is None:
            return self.absmax
        n = self.nested
        scale = n.scale.repeat_interleave(n.blocksize)[: self.blocks]
        return (n.code[self.absmax.long()] * scale).add_(n.offset)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """W [N, K] in ``dtype`` (default: the quant state's), computed in plain PyTorch; equal bit for
        bit to bitsandbytes' dequantize_4bit to that dtype."""
        dtype = dtype or self.dtype
        # every byte's two values at once: a [256, 2] table of (high nibble, low nibble) values
        byte = torch.arange(256, device=self.device)
        pairs = torch.stack((self.code[byte >> 4], self.code[byte & 15]), dim=1)
        w = pairs[self.packed.reshape(-1).int()].reshape(self.blocks, self.blocksize)
        return w.mul_(self.absmax_float()[:, None]).reshape(self.shape).to(dtype)

    def nbytes(self) -> int:
        """Bytes the format holds (every tensor of ``tensors()``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        """The format's tensors by name (the nested ones prefixed ``nested_``)."""
        out = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.nested is not None:
            out.update(nested_scale=self.nested.scale, nested_code=self.nested.code,
                       nested_offset=self.nested.offset)
        return out

    def same_layout(self, other: "Weight4bit") -> bool:
        """True when ``other`` has this weight's shape, dtype, blocksize, quant type and nesting: its
        tensors can be copied into this one's."""
        return (self.shape == other.shape and self.dtype == other.dtype
                and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and (self.nested is None) == (other.nested is None)
                and (self.nested is None or self.nested.blocksize == other.nested.blocksize))

    @torch.no_grad()
    def copy_(self, other: "Weight4bit") -> None:
        """Write ``other``'s codes and scales into this weight's tensors, in place (same layout)."""
        if not self.same_layout(other):
            raise ValueError(f"Weight4bit.copy_: layouts differ ({describe(self)} vs {describe(other)})")
        mine, theirs = self.tensors(), other.tensors()
        for name, t in mine.items():
            t.copy_(theirs[name].reshape(t.shape))

    @classmethod
    def from_bnb(cls, weight) -> "Weight4bit":
        """The weight of a bitsandbytes ``Linear4bit``: its ``Params4bit`` (a uint8 tensor with a
        ``quant_state``) or a ``Linear4bit`` itself, read by attribute (bitsandbytes need not be
        importable). The tensors are shared, not copied."""
        return from_bnb(weight)


def describe(w: Weight4bit) -> str:
    """A one-line description of a 4-bit weight's layout."""
    nested = f", nested absmax in blocks of {w.nested.blocksize}" if w.nested is not None else ""
    return (f"{w.quant_type} [{w.shape[0]}, {w.shape[1]}] {str(w.dtype).replace('torch.', '')}, "
            f"blocks of {w.blocksize}{nested}")


# ------------------------------------------------------------------------------------------------
# checks


def check_quant_type(quant_type, caller: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{caller}: unsupported quant_type {quant_type!r}; fastlora reads and writes "
                         f"bitsandbytes' {' and '.join(repr(q) for q in QUANT_TYPES)}")
    return quant_type


def check_blocksize(blocksize, in_features: int, caller: str) -> int:
    """``blocksize`` if bitsandbytes accepts it and it divides a row of ``in_features`` elements."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{caller}: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if in_features % blocksize:
        raise ValueError(f"{caller}: blocksize {blocksize} does not divide the row (in_features "
                         f"{in_features}); fastlora's 4-bit weights keep each block inside one row "
                         f"(bitsandbytes' own CPU kernels mis-read blocks that straddle rows)")
    return blocksize


def _expect(t, name: str, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Weight4bit: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"Weight4bit: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"Weight4bit: the quant state does not match the weight: {name} holds "
                         f"{t.numel()} values where {_NEEDS[name]} needs {numel}")


_NEEDS = {"packed": "the shape (two 4-bit codes a byte)", "absmax": "the shape and blocksize",
          "code": "a 4-bit table", "nested scale": "the nested blocksize", "nested code": "an 8-bit table",
          "nested offset": "the nesting"}


def check_format(w: Weight4bit) -> None:
    """Every field of ``w`` consistent with the others (shapes, dtypes, devices); no data is read."""
    check_quant_type(w.quant_type, "Weight4bit")
    shape = tuple(w.shape)
    if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"Weight4bit: shape must be (out_features, in_features), two positive ints, "
                         f"got {w.shape!r}")
    if w.dtype not in DTYPES:
        raise TypeError(f"Weight4bit: dtype (the quant state's) must be float16, bfloat16 or float32, "
                        f"got {w.dtype}")
    check_blocksize(w.blocksize, shape[1], "Weight4bit")
    numel = shape[0] * shape[1]
    _expect(w.packed, "packed", torch.uint8, numel // 2)
    blocks = numel // w.blocksize
    _expect(w.code, "code", torch.float32, 16)
    if w.nested is None:
        _expect(w.absmax, "absmax", torch.float32, blocks)
        tensors = [w.packed, w.absmax, w.code]
    else:
        n = w.nested
        if not isinstance(n.blocksize, int) or isinstance(n.blocksize, bool) or n.blocksize < 1:
            raise ValueError(f"Weight4bit: the nested absmax's blocksize must be a positive int, "
                             f"got {n.blocksize!r}")
        _expect(w.absmax, "absmax", torch.uint8, blocks)
        _expect(n.scale, "nested scale", torch.float32, math.ceil(blocks / n.blocksize))
        _expect(n.code, "nested code", torch.float32, 256)
        _expect(n.offset, "nested offset", torch.float32, 1)
        tensors = [w.packed, w.absmax, w.code, n.scale, n.code, n.offset]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"Weight4bit: the format's tensors must share a device, got "
                         f"{sorted(str(d) for d in devices)}")


# ------------------------------------------------------------------------------------------------
# reading bitsandbytes' objects (by attribute; bitsandbytes is not imported)


def is_bnb_4bit(module_or_weight) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (or its ``Params4bit``) holding a quantized weight."""
    weight = getattr(module_or_weight, "weight", module_or_weight)
    qs = getattr(weight, "quant_state", None)
    return (isinstance(weight, Tensor) and qs is not None and hasattr(qs, "absmax")
            and hasattr(qs, "quant_type") and hasattr(qs, "blocksize"))


def from_bnb(weight) -> Weight4bit:
    """``Weight4bit.from_bnb``: see there."""
    if isinstance(weight, torch.nn.Module):
        weight = getattr(weight, "weight", None)
    qs = getattr(weight, "quant_state", None) if isinstance(weight, Tensor) else None
    if qs is None:
        raise TypeError(f"Weight4bit.from_bnb: expected a bitsandbytes Params4bit (a quantized 4-bit "
                        f"weight with a quant_state), got {type(weight).__name__}"
                        + (" without a quant_state (not quantized yet: move it to its device first)"
                           if isinstance(weight, Tensor) else ""))
    data = weight.detach()
    if getattr(qs, "packing_format_for_cpu", False):
        return _from_bnb_cpu_layout(data, qs)
    if data.dtype != torch.uint8:  # quant_storage: the same bytes in a wider dtype
        data = data.contiguous().view(torch.uint8)
    shape = tuple(int(n) for n in qs.shape) if qs.shape is not None else ()
    nested = None
    if getattr(qs, "nested", False):
        s2 = qs.state2
        offset = qs.offset
        if not isinstance(offset, Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=data.device)
        nested = NestedAbsmax(scale=s2.absmax, code=s2.code, offset=offset.reshape(1),
                              blocksize=s2.blocksize)
    return Weight4bit(packed=data, absmax=qs.absmax, shape=shape, dtype=qs.dtype, blocksize=qs.blocksize,
                      quant_type=qs.quant_type, code=_code(qs, data.device), nested=nested)


def _from_bnb_cpu_layout(data: Tensor, qs) -> Weight4bit:
    """A weight bitsandbytes repacked for its CPU inference kernel (``packing_format_for_cpu``: an
    eval-mode forward without gradients on a CPU with AVX512-BF16 does it, in place), read back
    into the standard layout. That repacking rounds absmax to bfloat16 and drops the nesting: this
    is what bitsandbytes computes with from then on, not the weight it was loaded as."""
    n, k = (int(s) for s in qs.shape)
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, k // 2) or n % 32 or k % 2:
        raise ValueError(f"Weight4bit.from_bnb: a weight in bitsandbytes' CPU layout must be uint8 "
                         f"[{n}, {k // 2}], got {data.dtype} {tuple(data.shape)}")
    # bitsandbytes' layout: rows in groups of 32, each group's 32 x 2 codes of a column pair in
    # 32 bytes, low nibbles the first 32 codes, high nibbles the next 32
    packed = data.reshape(-1, 32)
    codes = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(n // 32, k // 2, 32, 2)
    codes = codes.transpose(1, 2).reshape(-1)
    standard = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    absmax = qs.absmax.T.reshape(-1).float()  # [K / bs, N] bfloat16 -> per block, row-major
    dtype = getattr(qs, "original_dtype", torch.bfloat16)
    return Weight4bit(packed=standard, absmax=absmax.contiguous(), shape=(n, k), dtype=dtype,
                      blocksize=qs.blocksize, quant_type=qs.quant_type, code=_code(qs, data.device))


def _code(qs, device) -> Tensor:
    """A bitsandbytes quant state's 4-bit table: its own, or the standard one of its quant type."""
    return qs.code if isinstance(getattr(qs, "code", None), Tensor) else code_table(qs.quant_type, device)


# ------------------------------------------------------------------------------------------------
# writing


@torch.no_grad()
def quantize(weight: Tensor, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = True) -> Weight4bit:
    """``weight`` [N, K] (float16, bfloat16 or float32, finite) in the 4-bit format: the bytes
    bitsandbytes' ``quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type)`` writes on the CPU, on ``weight``'s device.

    4-bit codes: the nearest code value to W / absmax by the float32 midpoints of the sorted
    table (a value on a midpoint takes the lower one). Nested absmax: offset = mean(absmax), then
    8-bit codes of absmax - offset by bitsandbytes' CPU rule (0.50): the nearest code value looked
    up in a 65,536-entry table of [-1, 1], in blocks of 256. bitsandbytes' CUDA kernels search the
    codes exactly (and use literal thresholds for the 4-bit ones), so on a GPU a value within about
    1e-5 of a midpoint may get the neighbouring code there.
    """
    caller = "quantize_4bit"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{caller}: weight must be a torch.Tensor, got {type(weight).__name__}")
    check_quant_type(quant_type, caller)
    if weight.dtype not in DTYPES:
        raise TypeError(f"{caller}: weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{caller}: weight must be 2-D [out_features, in_features] and non-empty, "
                         f"got shape {tuple(weight.shape)}")
    check_blocksize(blocksize, weight.shape[1], caller)
    if not isinstance(double_quant, bool):
        raise ValueError(f"{caller}: double_quant must be True or False, got {double_quant!r}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{caller}: weight holds NaN or Inf, which no 4-bit code represents")
    device = weight.device
    blocks = weight.detach().reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
    code = code_table(quant_type, device)
    order = torch.argsort(code, stable=True)  # FP4's codes are by bit pattern, not by value
    ordered = code[order]
    q = order[torch.bucketize(scaled, (ordered[:-1] + ordered[1:]) / 2)].to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).reshape(-1, 1)
    nested = None
    if double_quant:
        offset = absmax.mean()
        q8, scale = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
        nested = NestedAbsmax(scale=scale, code=dynamic_map(device), offset=offset.reshape(1),
                              blocksize=NESTED_BLOCKSIZE)
        absmax = q8
    return Weight4bit(packed=packed, absmax=absmax, shape=tuple(weight.shape), dtype=weight.dtype,
                      blocksize=blocksize, quant_type=quant_type, code=code, nested=nested)


_LUT_SIZE = 65536


def _quantize_dynamic(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(uint8 codes, float32 absmax per block) of float32 ``x`` in the 8-bit dynamic map, blocks of
    ``blocksize`` (the last may be short), as bitsandbytes' CPU quantize_blockwise: x times the
    reciprocal of its block's absmax, clamped to [-1, 1], indexes a table of the nearest code at
    65,536 evenly spaced points of [-1, 1]; a block of zeros gets code 0."""
    dmap = dynamic_map(x.device)
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=x.device)) / (_LUT_SIZE - 1)
    # a point takes the code whose midpoint with the next code is the first not below it
    lut = torch.searchsorted(0.5 * (dmap[:-1] + dmap[1:]), points, side="left").to(torch.uint8)
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    index = (((blocks * inv[:, None]).clamp_(-1, 1) + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = lut[index]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].contiguous(), absmax

