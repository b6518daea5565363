"""Mixtral (and MiniMax, which shares its checkpoint layout).

In memory (transformers 5.24): ``model.layers.{i}.mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``, router ``mlp.gate.weight``, expert count ``num_local_experts``, no shared
expert. On disk (hub checkpoints and ``save_pretrained``): the old module names,
``model.layers.{i}.block_sparse_moe.experts.{j}.w1|w3|w2.weight`` (gate | up | down) and
``block_sparse_moe.gate.weight``; transformers renames and fuses them at load.
"""

from __future__ import annotations

from .base import ExpertRef
from .hf import TransformersAdapter

DISK_MATRIX = {"gate": "w1", "up": "w3", "down": "w2"}


class MixtralAdapter(TransformersAdapter):
    """Where experts lie on disk comes from transformers' conversion (``KeyMap``): per-expert ``w1|w3|w2``
    under ``block_sparse_moe``, or fused ``mlp.experts`` tensors as other tools save them."""

    family = "mixtral"
    shared_attr = None
    disk_block = "block_sparse_moe"

    def packed_name(self, ref: ExpertRef, matrix: str) -> str:
        """vLLM's compressed-tensors Mixtral names: ``...block_sparse_moe.experts.{j}.w1``."""
        return f"{self.disk_prefix}.{ref.layer}.{self.disk_block}.experts.{ref.expert}.{DISK_MATRIX[matrix]}"
