"""Qwen MoE families: Qwen2-MoE, Qwen3-MoE (text) and Qwen3-VL-MoE (vision-language).

All three keep transformers' fused in-memory layout ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` /
``down_proj`` ``[E, H, I]``, router ``mlp.gate``, expert count ``num_experts``.

* Qwen2-MoE adds one shared expert ``mlp.shared_expert`` (gated by ``mlp.shared_expert_gate``,
  a sigmoid scalar per token that stays unquantized). On disk: one tensor per expert,
  ``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``.
* Qwen3-MoE: no shared expert; on disk one tensor per expert, like Qwen2-MoE.
* Qwen3-VL-MoE: decoder under ``model.language_model.layers``; hub checkpoints store the experts
  fused and **transposed** (``gate_up_proj`` ``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``) while
  ``save_pretrained`` in transformers 5.24 writes the in-memory orientation; like transformers'
  ``Transpose(check_dims=True)`` we transpose only when the stored shape differs from the in-memory one
  (so a square ``H == 2I`` checkpoint is read untransposed, exactly as transformers reads it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import DiskTensor, ExpertRef, MoEAdapter
from .checkpoint import header
from .layouts import fused


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    shared_attr = "shared_expert"


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    shared_attr = None


class Qwen3VLMoeAdapter(MoEAdapter):
    family = "qwen3_vl_moe"
    shared_attr = None
    disk_prefix = "model.language_model.layers"
    source_dir: Path | None = None

    def decoder_layers(self):
        return self.model.model.language_model.layers

    def language_config(self):
        return self.model.config.text_config

    def disk_tensors(self, ref: ExpertRef, keys: set[str]) -> dict[str, DiskTensor]:
        prefix = f"{self.layer_disk_prefix(ref.layer)}.{self.experts_attr}"
        if f"{prefix}.gate_up_proj" not in keys:
            return super().disk_tensors(ref, keys)
        live = self.experts_module(ref.layer).gate_up_proj
        stored = self._disk_shape(f"{prefix}.gate_up_proj")
        transposed = stored is not None and tuple(stored) != tuple(live.shape)
        return fused(prefix, ref.expert, live.shape[1] // 2, transposed)

    def _disk_shape(self, key: str):
        if getattr(self, "_shapes", None) is None:
            self._shapes = header(self.source_dir) if self.source_dir is not None else {}
        entry = self._shapes.get(key)
        return entry[0] if entry else None

    @classmethod
    def build_model(cls, config: dict, where):
        from transformers import AutoModelForImageTextToText

        from . import _hf_config

        return AutoModelForImageTextToText.from_config(_hf_config(config), attn_implementation="eager")

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype, attn_implementation="eager")
