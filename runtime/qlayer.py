"""Quantized modules that replace a model's experts: packed weights stay packed in memory.

``PackedMatrix`` holds one expert matrix in the artifact's canonical format. ``QuantizedExperts``
replaces a transformers fused experts module (same ``forward(hidden, top_k_index, top_k_weights)``)
and ``QuantizedMLP`` a dense MLP (shared experts). On CPU they dequantize each expert that receives
tokens on the fly (the torch path); on CUDA the Triton kernels in ``mopeq.runtime.kernels`` take over
when importable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..compiler.pack import unpack_int32


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
        n, k = self.shape
        codes = unpack_int32(self.packed, self.bits, k).to(dtype)
        g = self.scale.shape[1]
        pad = g * self.group_size - k
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        codes = codes.view(n, g, self.group_size)
        zero = self.zero.to(dtype) if self.zero is not None else torch.tensor(2.0 ** (self.bits - 1), dtype=dtype)
        w = (codes - zero.unsqueeze(-1) if self.zero is not None else codes - zero) * self.scale.to(dtype).unsqueeze(-1)
        return w.view(n, -1)[:, :k]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def to(self, device) -> "PackedMatrix":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedMatrix(move(self.packed), move(self.scale), move(self.zero), self.bits, self.group_size, self.shape)


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


def moe_forward_torch(experts: QuantizedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
    """Reference/CPU path: tokens grouped by expert, each expert dequantized once per call.

    hidden ``[T, H]``, top_k_index ``[T, k]`` (int), top_k_weights ``[T, k]`` -> ``[T, H]``.
    """
    out = torch.zeros_like(hidden)
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    token_of = order // top_k_index.shape[1]
    weight_of = top_k_weights.reshape(-1)[order]
    start = 0
    for j, count in enumerate(counts):
        if count == 0 or j >= experts.num_experts:
            start += count
            continue
        tokens = token_of[start : start + count]
        y = experts.expert_forward(j, hidden[tokens]) * weight_of[start : start + count, None].to(hidden.dtype)
        out.index_add_(0, tokens, y)
        start += count
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
