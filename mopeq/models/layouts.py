"""Where expert matrices sit inside fused checkpoint tensors, for every orientation seen in the wild.

``[E, 2I, H]``/``[E, H, I]`` is transformers' in-memory layout (gate rows first, then up);
``[E, H, 2I]``/``[E, I, H]`` is the transposed one some hub checkpoints store (Qwen3-VL-MoE);
megablocks-style ``[E*I, H]`` stacks (MolmoE/OLMo ``w1``/``v1``/``w2``) hold expert ``j`` in rows
``j*I:(j+1)*I`` (``w2`` transposed: ``down_j = w2[j*I:(j+1)*I].T``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DiskTensor


@dataclass(frozen=True)
class RowBlock(DiskTensor):
    """Rows ``rows`` of a 2-D stack, transposed *after* slicing (``DiskTensor`` transposes first)."""

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        block = tensor[self.rows[0] : self.rows[1]]
        return block.t() if self.transpose else block

    def read(self, handle) -> torch.Tensor:
        """Only the expert's rows of the stack."""
        block = handle.get_slice(self.key)[self.rows[0] : self.rows[1]]
        return block.t() if self.transpose else block


def megablocks(w1: str, v1: str, w2: str, expert: int, inter: int) -> dict[str, DiskTensor]:
    rows = (expert * inter, (expert + 1) * inter)
    return {"gate": RowBlock(w1, None, rows), "up": RowBlock(v1, None, rows), "down": RowBlock(w2, None, rows, True)}
