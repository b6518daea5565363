"""Adapters for transformers' DeepseekV2/V3 and the demo VLM built on DeepseekV2."""

from __future__ import annotations

import torch

from .base import LanguageAdapter, MoEAdapter


class DeepseekAdapter(MoEAdapter):
    """``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``: fused experts, ``mlp.gate`` router, ``mlp.shared_experts``."""

    family = "deepseek_v2"


class DemoAdapter(LanguageAdapter):
    """The demo VLM: a DeepseekV2 language model under ``language.``, fed images through ``vision``/``projector``."""

    family = "mopeq_demo_vlm"

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch.get("images")).logits
