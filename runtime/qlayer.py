"""Quantized modules that replace a model's experts: packed weights stay packed in memory.

``PackedMatrix`` holds one expert matrix in the artifact's canonical format. ``QuantizedExperts``
replaces a transformers fused experts module (same ``forward(hidden, top_k_index, top_k_weights)``)
and ``QuantizedMLP`` a dense MLP (shared experts). On CPU they dequantize each expert that receives
tokens on the fly (the torch path); on CUDA the Triton kernels in ``mopeq.runtime.kernels`` take over
when importable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..compiler import native
from ..compiler.pack import unpack_int32

DENSE_BYTES = 16 << 20  # dense expert weights the torch path holds at once (a few experts, not a layer)


@dataclass
class PackedMatrix:
    """One ``[N, K]`` matrix: ``weight_packed`` int32 ``[N, ceil(K*bits/32)]``, ``weight_scale``
    ``[N, G]``, ``weight_zero_point`` uint8 ``[N, G]`` or None (symmetric)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.packed, self.scale, self.zero, self.bits, self.group_size, self.shape[1], dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def to(self, device) -> "PackedMatrix":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedMatrix(move(self.packed), move(self.scale), move(self.zero), self.bits, self.group_size, self.shape)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                      group_size: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale`` for packed ``[..., N, W]``, scales/zeros ``[..., N, G]`` -> ``[..., N, K]``.

    On CPU the native kernel (``runtime/dequant.c``) does it in one pass, bit for bit the same."""
    dense = native.dequantize(packed, scale, zero, bits, group_size, k, dtype)
    if dense is not None:
        return dense
    codes = unpack_int32(packed, bits, k).to(dtype)
    g = scale.shape[-1]
    if g * group_size != k:
        codes = torch.nn.functional.pad(codes, (0, g * group_size - k))
    codes = codes.unflatten(-1, (g, group_size))
    offset = zero.to(dtype).unsqueeze(-1) if zero is not None else 2.0 ** (bits - 1)
    return ((codes - offset) * scale.to(dtype).unsqueeze(-1)).flatten(-2)[..., :k]


def dequantize_many(mats: list[PackedMatrix], dtype: torch.dtype) -> list[torch.Tensor]:
    """Dequantize many matrices with a few tensor ops per bucket of equal (bits, shape, group, zero-ness)."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.bits, m.shape, m.group_size, m.zero is None), []).append(i)
    for (bits, shape, group_size, symmetric), idx in buckets.items():
        stack = lambda field: torch.stack([getattr(mats[i], field) for i in idx])  # noqa: E731
        dense = dequantize_packed(stack("packed"), stack("scale"), None if symmetric else stack("zero"),
                                  bits, group_size, shape[1], dtype)
        for i, w in zip(idx, dense):
            out[i] = w
    return out


class QuantizedExperts(nn.Module):
    """Drop-in for a fused experts module: ``experts[j] = {"gate", "up", "down"} -> PackedMatrix``."""

    def __init__(self, experts: list[dict[str, PackedMatrix]], act_fn, compute_dtype=torch.float32):
        super().__init__()
        self.experts = experts
        self.num_experts = len(experts)
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        # Register packed tensors as buffers so .to(device) and memory accounting see them.
        for j, mats in enumerate(experts):
            for name, m in mats.items():
                for field in ("packed", "scale", "zero"):
                    t = getattr(m, field)
                    if t is not None:
                        self.register_buffer(f"e{j}_{name}_{field}", t, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for j, mats in enumerate(self.experts):
            for name, m in mats.items():
                for field in ("packed", "scale", "zero"):
                    if getattr(m, field) is not None:
                        setattr(m, field, getattr(self, f"e{j}_{name}_{field}"))
        return self

    def expert_forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        mats = self.experts[j]
        dtype = x.dtype
        gate = x @ mats["gate"].dequantize(dtype).t()
        up = x @ mats["up"].dequantize(dtype).t()
        return (self.act_fn(gate) * up) @ mats["down"].dequantize(dtype).t()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda:
            from . import kernels

            if kernels.available():
                return kernels.moe_forward(self, hidden_states, top_k_index, top_k_weights)
        return moe_forward_torch(self, hidden_states, top_k_index, top_k_weights)


def group_by_expert(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int):
    """Token-expert pairs sorted by expert: ``(token_of, weight_of, starts)``; expert ``j``'s pairs are rows
    ``starts[j]:starts[j + 1]`` of ``token_of`` (token index) and ``weight_of`` (routing weight). Indices
    ``>= num_experts`` (transformers' dropped slots) sort last and belong to no expert."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return order // top_k_index.shape[1], top_k_weights.reshape(-1)[order], starts


def moe_forward_torch(experts: QuantizedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
    """Reference/CPU path: tokens grouped by expert; the experts hit are dequantized together, by bucket, in
    the activations' dtype, at most ``DENSE_BYTES`` of dense weights at a time (never a whole layer).

    hidden ``[T, H]``, top_k_index ``[T, k]`` (int), top_k_weights ``[T, k]`` -> ``[T, H]``.
    """
    out = torch.zeros_like(hidden)
    token_of, weight_of, starts = group_by_expert(top_k_index, top_k_weights, experts.num_experts)
    hit = [j for j in range(experts.num_experts) if starts[j + 1] > starts[j]]
    dense_bytes = sum(math.prod(m.shape) for m in experts.experts[0].values()) * hidden.element_size()
    step = max(1, DENSE_BYTES // dense_bytes)
    for first in range(0, len(hit), step):
        chunk = hit[first : first + step]
        dense = dequantize_many([experts.experts[j][m] for j in chunk for m in ("gate", "up", "down")], hidden.dtype)
        for n, j in enumerate(chunk):
            gate, up, down = dense[3 * n : 3 * n + 3]
            sel = slice(starts[j], starts[j + 1])
            x = hidden[token_of[sel]]
            y = (experts.act_fn(x @ gate.t()) * (x @ up.t())) @ down.t()
            out.index_add_(0, token_of[sel], y * weight_of[sel, None].to(hidden.dtype))
    return out


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight is a ``PackedMatrix``."""

    def __init__(self, matrix: PackedMatrix):
        super().__init__()
        self.matrix = matrix
        self.register_buffer("weight_packed", matrix.packed, persistent=False)
        self.register_buffer("weight_scale", matrix.scale, persistent=False)
        if matrix.zero is not None:
            self.register_buffer("weight_zero_point", matrix.zero, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.matrix.packed, self.matrix.scale = self.weight_packed, self.weight_scale
        if self.matrix.zero is not None:
            self.matrix.zero = self.weight_zero_point
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from . import kernels

            if kernels.available():
                return kernels.linear(self.matrix, x)
        return x @ self.matrix.dequantize(x.dtype).t()
