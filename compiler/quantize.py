"""Group-wise quantizers. One function for every stage: the profiler measures ``||W - Q_b(W)||^2``
with exactly the quantizer the compiler ships, and the runtime dequantizes with ``dequantize``.

Groups run along the input (last) dimension of a ``[N, K]`` weight; a group size above K means one
group per row, and a K that is no multiple of the group size leaves a shorter last group.

Codes are unsigned, ``q in [0, 2**bits)``, and ``w ~= (q - zero) * scale`` per group. Symmetric
quantization fixes ``zero = 2**(bits-1)`` (the signed value offset to unsigned, as compressed-tensors
stores it) and writes no zero point.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import native
from .pack import SUPPORTED_BITS, pack_int32, packed_words

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [N, K] uint8, in [0, 2**bits)
    scale: torch.Tensor  # [N, G] float
    zero: torch.Tensor | None  # [N, G] uint8, None when symmetric
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _check_weight(w: torch.Tensor, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: got {bits}, expected one of {SUPPORTED_BITS}")
    if w.dim() != 2:
        raise ValueError(f"weight: got shape {tuple(w.shape)}, expected a 2-D [out, in] matrix")


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size], padding the last group by repeating its last column."""
    n, k = w.shape
    g = num_groups(k, group_size)
    if g * group_size != k:
        w = torch.cat([w, w[:, -1:].expand(n, g * group_size - k)], 1)
    return w.view(n, g, group_size)


def _params(wg: torch.Tensor, bits: int, symmetric: bool, ratio: float):
    qmax = 2**bits - 1
    if symmetric:
        # max(amax, -amin) == abs().amax() exactly, and two plain reductions beat abs() + amax (and aminmax)
        absmax = torch.maximum(wg.amax(-1), wg.amin(-1).neg()) * ratio
        scale = (absmax * 2 / qmax).clamp(min=1e-10)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = (wg.amin(-1) * ratio).clamp(max=0)
        hi = (wg.amax(-1) * ratio).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-10)
        zero = (-lo / scale).round().clamp(0, qmax)
    return scale, zero


def _codes(wg, scale, zero, bits):
    return (wg / scale[..., None]).add_(zero[..., None]).round_().clamp_(0, 2**bits - 1)


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
             clip_search: bool = False, scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of a ``[N, K]`` weight.

    With ``clip_search`` each group's range is shrunk by the ratio in ``CLIP_RATIOS`` that minimises
    its squared error. Scales are rounded to ``scale_dtype`` before the codes are chosen, so
    ``dequantize`` reproduces exactly what is stored. Example: ``quantize(w, 3, 128).codes.shape == w.shape``.
    """
    _check_weight(w, bits)
    n, k = w.shape
    group_size = min(group_size, k)
    wg = _grouped(w.detach().float(), group_size)
    best = None
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        scale, zero = _params(wg, bits, symmetric, ratio)
        scale = scale.to(scale_dtype).float().clamp(min=torch.finfo(scale_dtype).tiny)
        q = _codes(wg, scale, zero, bits)
        if not clip_search:  # one candidate: no error to compare
            best = [scale, zero, q, None]
            break
        err = ((q - zero[..., None]) * scale[..., None] - wg).pow(2).sum(-1)  # [N, G]
        if best is None:
            best = [scale, zero, q, err]
        else:
            better = err < best[3]
            best = [torch.where(better, a, b) for a, b in zip([scale, zero], best[:2])] + [
                torch.where(better[..., None], q, best[2]), torch.minimum(err, best[3])]
    scale, zero, q, _ = best
    codes = q.reshape(n, -1)[:, :k].to(torch.uint8)
    return QuantizedWeight(codes, scale.to(scale_dtype), None if symmetric else zero.to(torch.uint8),
                           bits, group_size)


BLOCK_ELEMENTS = 1 << 20  # weights per row block of ``quantize_packed``: bounds its fp32 temporaries


def quantize_packed(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                    clip_search: bool = False, scale_dtype: torch.dtype = torch.float16,
                    block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize`` then ``pack_int32``, one cache-sized block of rows at a time: ``(packed, scale, zero)``.

    Quantization is row-wise, so running it on row blocks gives the same bits as the whole matrix
    (``tests/compiler/test_streaming.py`` checks byte equality) while every fp32 temporary stays small
    and cache-resident; no ``[N, K]`` fp32 or uint8 code tensor is ever built. Without clip search the
    native kernel (``native.py``) does the same in one pass over the weights, bit for bit, where it builds.
    Raises ``NonFiniteWeights`` where a scale comes out NaN or infinite (no artifact should hold one).
    """
    _check_weight(w, bits)
    n, k = w.shape
    gs = min(group_size, k)
    g = num_groups(k, gs)
    packed = torch.empty(n, packed_words(k, bits), dtype=torch.int32)
    scale = torch.empty(n, g, dtype=scale_dtype)
    zero = None if symmetric else torch.empty(n, g, dtype=torch.uint8)
    w = w.detach()
    if not clip_search and native.rtn_pack(w, bits, gs, symmetric, scale_dtype, packed, scale, zero):
        return packed, scale, zero  # the kernel only succeeds with finite scales
    rows = max(1, block_elements // max(k, 1))
    for r0 in range(0, n, rows):
        block = w[r0 : r0 + rows]
        if clip_search:
            qw = quantize(block, bits, group_size, symmetric, clip_search, scale_dtype)
            codes, s, z = qw.codes, qw.scale, qw.zero
        else:
            codes, s, z = _rtn_block(block, bits, gs, symmetric, scale_dtype)
        packed[r0 : r0 + rows] = pack_int32(codes, bits)
        scale[r0 : r0 + rows] = s
        if zero is not None:
            zero[r0 : r0 + rows] = z
    check_finite(scale, scale_dtype)
    return packed, scale, zero


class NonFiniteWeights(ValueError):
    """A group's scale is NaN or infinite: its weights hold a NaN or infinity, or are too large for the scale dtype."""


def check_finite(scale: torch.Tensor, scale_dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise NonFiniteWeights(f"NaN or infinite weights, or weights too large for {str(scale_dtype)[6:]} scales")


_ROUNDER = float(2**23)  # fl(y + 2**23) - 2**23 == round-half-even(y) for 0 <= y < 2**22


class _Workspace(threading.local):
    """Per-thread scratch buffers of ``_rtn_block``, reused across calls.

    A fresh multi-MB tensor per matrix costs a page fault per 4 KiB on first touch (torch's CPU
    allocator returns large blocks to the OS), which measured as much as the arithmetic itself.
    """

    def __init__(self):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_WORKSPACE = _Workspace()


def _rtn_block(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    """``quantize`` without clip search, bit for bit, in fewer passes: codes as uint8 ``[n, k]``, scale, zero.

    ``quantize`` computes ``clamp(round(w / s + z), 0, qmax)``; since rounding is monotone and fixes
    the integers 0 and qmax this equals ``round(clamp(w / s + z, 0, qmax))``, and the rounding of a
    value in ``[0, qmax]`` is done by adding 2**23 (fp32 round-to-nearest-even leaves the integer in the
    low mantissa bits, which are then read as the code). Every pass runs in place in a reused buffer;
    the returned codes live in the workspace until the next call.
    """
    n, k = w.shape
    g = num_groups(k, group_size)
    if g * group_size == k:
        wg = _WORKSPACE.get(n * k, torch.float32).view(n, g, group_size)
        wg.view(n, k).copy_(w)
    else:
        wg = _grouped(w.float(), group_size)
    qmax = 2**bits - 1
    scale, zero = _params(wg, bits, symmetric, 1.0)
    scale = scale.to(scale_dtype).float().clamp(min=torch.finfo(scale_dtype).tiny)
    wg.div_(scale[..., None])
    if symmetric:  # zero is the constant 2**(bits-1): adding it as a scalar gives the same fp32 sums
        wg.add_(float(2 ** (bits - 1)))
    else:
        wg.add_(zero[..., None])
    wg.clamp_(0, qmax).add_(_ROUNDER)
    codes = _WORKSPACE.get(n * g * group_size, torch.uint8).view(n, g * group_size)
    codes.copy_(wg.view(n, -1).view(torch.int32))  # the low byte is the code (< 256); int32 -> uint8 wraps
    return codes[:, :k], scale.to(scale_dtype), None if symmetric else zero.to(torch.uint8)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale`` back to a dense ``[N, K]`` tensor."""
    n, k = qw.codes.shape
    zero = qw.zero.float() if qw.zero is not None else torch.full_like(qw.scale, 2 ** (qw.bits - 1), dtype=torch.float32)
    scale = qw.scale.float().repeat_interleave(qw.group_size, dim=1)[:, :k]
    zero = zero.repeat_interleave(qw.group_size, dim=1)[:, :k]
    return ((qw.codes.float() - zero) * scale).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  clip_search: bool = False) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: what the model computes with after compiling."""
    return dequantize(quantize(w, bits, group_size, symmetric, clip_search), w.dtype)


def quantization_error(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                       clip_search: bool = False) -> float:
    """``||W - Q_b(W)||^2`` (float64 sum)."""
    diff = w.double() - fake_quantize(w.float(), bits, group_size, symmetric, clip_search).double()
    return float(diff.pow(2).sum())


def packed_nbytes(n: int, k: int, bits: int, group_size: int, symmetric: bool = False,
                  scale_bytes: int = 2) -> int:
    """Bytes on disk of one quantized ``[N, K]`` matrix: packed words, scales, zero points, shape."""
    from .pack import packed_words

    g = num_groups(k, min(group_size, k))
    return n * packed_words(k, bits) * 4 + n * g * scale_bytes + (0 if symmetric else n * g) + 16
