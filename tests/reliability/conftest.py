"""Fixtures for the reliability tests: a tiny DeepseekV2 checkpoint with a tokenizer and calibration text,
a tiny compiled demo-model artifact (from ``bench/fuzz.py``'s seed corpus), and that fuzz module."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
WORDS = ["alpha", "beta", "gamma", "delta", "expert", "router", "token", "layer", "the", "a", "of", "to"]


def load_fuzz():
    spec = importlib.util.spec_from_file_location("mopeq_bench_fuzz", REPO / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fuzz():
    return load_fuzz()


@pytest.fixture(scope="session")
def corpus(fuzz, tmp_path_factory):
    return fuzz.build_corpus(tmp_path_factory.mktemp("corpus"))


def save_tiny_deepseek(directory: Path) -> Path:
    """config.json + model.safetensors (save_pretrained) + a word-level tokenizer + calib.txt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = DeepseekV2Config(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=8,
                           q_lora_rank=None, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                           max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    model = DeepseekV2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            bos_token="<s>").save_pretrained(directory)
    gen = torch.Generator().manual_seed(3)
    (directory / "calib.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, 12, (1100,), generator=gen).tolist()))
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_deepseek(tmp_path_factory.mktemp("tiny_ds"))


SPEC = """version: 1
bits: [2, 4]
group_size: 8
budget: {avg_bits: 3.0}
sensitivity: hessian-local
"""


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(SPEC)
    return path


def main(args) -> int:
    """``mopeq ARGS`` in this process (paths and numbers as they come), returning the exit code."""
    from mopeq.cli import main as cli_main

    return cli_main([str(a) for a in args])


def cli(*args, cwd=None, **kw) -> subprocess.Popen:
    """``python -m mopeq.cli ARGS`` as a child process (single-threaded)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([PYTHON, "-m", "mopeq.cli", *map(str, args)], cwd=cwd or REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``directory``."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tiny_profile_args(tiny_dir: Path, out: Path) -> list:
    return ["profile", tiny_dir, "--calib", tiny_dir / "calib.txt", "-o", out, "--bits", "2,4", "--group-size", "8"]


def read_json(path: Path):
    return json.loads(path.read_text())
