"""Adapters for transformers' DeepseekV2/V3 and the demo VLM built on DeepseekV2."""

from __future__ import annotations

import torch

from .base import MoEAdapter


class DeepseekAdapter(MoEAdapter):
    """``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``: fused experts, ``mlp.gate`` router, ``mlp.shared_experts``."""

    family = "deepseek_v2"


class DemoAdapter(MoEAdapter):
    """The demo VLM: a DeepseekV2 language model under ``language.``, fed images through ``vision``/``projector``."""

    family = "mopeq_demo_vlm"
    disk_prefix = "language.model.layers"

    def decoder_layers(self):
        return self.model.language.model.layers

    def language_config(self):
        return self.model.language.config

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch.get("images")).logits
