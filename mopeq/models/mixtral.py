"""Mixtral (and MiniMax, which shares its checkpoint layout).

In memory (transformers 5.24): ``model.layers.{i}.mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``, router ``mlp.gate.weight``, expert count ``num_local_experts``, no shared
expert. On disk (hub checkpoints and ``save_pretrained``): the old module names,
``model.layers.{i}.block_sparse_moe.experts.{j}.w1|w3|w2.weight`` (gate | up | down) and
``block_sparse_moe.gate.weight``; transformers renames and fuses them at load.
"""

from __future__ import annotations

from .base import DiskTensor, ExpertRef, MoEAdapter
from .layouts import fused

DISK_MATRIX = {"gate": "w1", "up": "w3", "down": "w2"}


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    shared_attr = None
    disk_block = "block_sparse_moe"

    def layer_disk_prefix(self, layer: int) -> str:
        return f"{self.disk_prefix}.{layer}.{self.disk_block}"

    def disk_tensors(self, ref: ExpertRef, keys: set[str]) -> dict[str, DiskTensor]:
        prefix = f"{self.layer_disk_prefix(ref.layer)}.experts"
        per_expert = {m: DiskTensor(f"{prefix}.{ref.expert}.{w}.weight") for m, w in DISK_MATRIX.items()}
        if per_expert["gate"].key in keys:
            return per_expert
        inter = self.experts_module(ref.layer).down_proj.shape[-1]  # fused, as saved by other tools
        return fused(f"{self.disk_prefix}.{ref.layer}.mlp.experts", ref.expert, inter)

    def packed_name(self, ref: ExpertRef, matrix: str) -> str:
        """vLLM's compressed-tensors Mixtral names: ``...block_sparse_moe.experts.{j}.w1``."""
        return f"{self.layer_disk_prefix(ref.layer)}.experts.{ref.expert}.{DISK_MATRIX[matrix]}"

    def memory_tensors(self, tensors: dict) -> dict:
        return {k.replace(f".{self.disk_block}.", ".mlp."): v for k, v in tensors.items()}
