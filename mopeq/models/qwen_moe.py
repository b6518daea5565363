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

from .hf import TransformersAdapter


class Qwen2MoeAdapter(TransformersAdapter):
    family = "qwen2_moe"
    shared_attr = "shared_expert"


class Qwen3MoeAdapter(TransformersAdapter):
    family = "qwen3_moe"
    shared_attr = None


class Qwen3VLMoeAdapter(TransformersAdapter):
    """The transposed hub layout is read through transformers' ``Transpose(check_dims=True)`` (``KeyMap``)."""

    family = "qwen3_vl_moe"
    shared_attr = None
    disk_prefix = "model.language_model.layers"
    auto_class = "AutoModelForImageTextToText"

    def decoder_layers(self):
        return self.model.model.language_model.layers

    def language_config(self):
        return self.model.config.text_config
