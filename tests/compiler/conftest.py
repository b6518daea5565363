"""Fixtures: a small random-init demo model and a tiny DeepseekV2 checkpoint saved to disk, and Plans
built directly (no planner)."""

import json
from pathlib import Path

import pytest
import torch

from mopeq.models import read_config, skeleton
from .compiler_helpers import make_plan  # noqa: F401


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from mopeq.demo.model import DemoConfig, DemoVLM, save_demo

    torch.manual_seed(0)
    cfg = DemoConfig(hidden_size=64, num_hidden_layers=2, n_routed_experts=4, moe_intermediate_size=48,
                     vision_dim=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    directory = tmp_path_factory.mktemp("demo")
    save_demo(DemoVLM(cfg), directory)
    return directory


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory) -> Path:
    """transformers' DeepseekV2ForCausalLM, tiny, saved with save_pretrained (its own on-disk layout)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV2Config(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=128, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
                           q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                           pad_token_id=0, tie_word_embeddings=False, max_position_embeddings=64)
    model = DeepseekV2ForCausalLM(cfg).to(torch.bfloat16)
    directory = tmp_path_factory.mktemp("deepseek")
    model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return directory
