"""Adapters for transformers' DeepseekV2/V3 and the demo VLM built on DeepseekV2."""

from __future__ import annotations

import torch

from .base import LanguageAdapter
from .hf import TransformersAdapter


class DeepseekAdapter(TransformersAdapter):
    """``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``: fused experts, ``mlp.gate`` router, ``mlp.shared_experts``."""

    family = "deepseek_v2"


class DemoAdapter(LanguageAdapter):
    """The demo VLM: a DeepseekV2 language model under ``language.``, fed images through ``vision``/``projector``."""

    family = "mopeq_demo_vlm"
    is_demo = True
    takes_images = True
    runtime_dtype = torch.float32  # its weights ship in fp16 only to stay small; it is measured in fp32 everywhere

    @classmethod
    def image_batches(cls, folder, config: dict, tokenizer, directory, batch: int) -> list[dict]:
        from ..profiler.calibration import demo_image_batches

        return demo_image_batches(folder, config, batch)

    @classmethod
    def build_model(cls, config: dict, where, dtype: torch.dtype | None = None):
        from ..demo.model import DemoConfig, DemoVLM

        return DemoVLM(DemoConfig.from_dict(config))

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype):
        from ..demo.model import load_demo

        return load_demo(directory, dtype)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch.get("images")).logits

    def embed_batch(self, batch: dict) -> torch.Tensor:
        return self.model.embed(batch["input_ids"], batch.get("images"))  # images through its vision tower
