"""Tiny DeepseekV2 models for the profiler tests: small enough for exact curvature by basis vectors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from mopeq.models import LoadedModel
from mopeq.models.deepseek import DeepseekAdapter

VOCAB = 32
WORDS = ["alpha", "beta", "gamma", "delta", "expert", "router", "token", "layer", "the", "a", "of", "to"]


def tiny_config(**over) -> DeepseekV2Config:
    kw = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
              n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=4,
              qk_rope_head_dim=4, v_head_dim=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False, attn_implementation="eager", experts_implementation="eager")
    kw.update(over)
    return DeepseekV2Config(**kw)


def tiny_model(seed: int = 0, dtype=torch.float64, **over) -> LoadedModel:
    """A randomly initialised tiny DeepseekV2 (fp64, eager attention and experts) with larger weights."""
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(tiny_config(**over))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # the default init is tiny; bigger weights give a curvier loss
    model = model.to(dtype).eval()
    return LoadedModel(model, DeepseekAdapter(model), model.config.to_dict(), "tiny", None)


def tiny_batches(n_batches: int = 2, batch: int = 3, seq: int = 8, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen), "modality": "text"}
            for _ in range(n_batches)]


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def batches():
    return tiny_batches()


def save_tiny_checkpoint(directory, seed: int = 0) -> None:
    """config.json + safetensors (the real save_pretrained layout) + a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    loaded = tiny_model(seed, torch.float32, experts_implementation=None)
    loaded.model.save_pretrained(directory)
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>").save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_ds")
    save_tiny_checkpoint(directory)
    calib = directory / "calib.txt"
    gen = torch.Generator().manual_seed(3)
    calib.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (700,), generator=gen).tolist()))
    return directory


@pytest.fixture
def make_tiny():
    """The model and batch builders, for tests that change the model."""
    return tiny_model, tiny_batches
