"""MolmoE-1B: both public on-disk layouts, a direct reference forward, and the full mopeq chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mopeq.compiler.artifact import compile_artifact
from mopeq.estimate import estimate
from mopeq.models import open_model
from mopeq.planner import load_spec, make_plan
from mopeq.profiler.calibration import summary
from mopeq.profiler.profile import profile_model
from mopeq.runtime.load import load

from mopeq.models import ADAPTERS, skeleton
from mopeq.models.molmoe import MolmoeAdapter, geometry
from mopeq.schemas import InputError

from .conftest import MOLMOE_CONFIG, MOLMOE_HF_CONFIG, VOCAB, build_molmoe, molmoe_weights
from .test_families import SPEC, calibration, snr_db

E, INTER, D = MOLMOE_CONFIG["moe_num_experts"], MOLMOE_CONFIG["d_model"] // 2, MOLMOE_CONFIG["d_model"]


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, interleaved: bool, theta=10000.0):
    """x [B, h, T, hd]; rotate-half (OLMo) or interleaved pairs (remote code's 'cockatoo')."""
    hd, t = x.shape[-1], x.shape[-2]
    freqs = torch.outer(torch.arange(t, dtype=torch.float), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))
    if interleaved:
        pos = freqs.repeat_interleave(2, -1)
        x2 = x.view(*x.shape[:-1], hd // 2, 2)
        rot = torch.stack([-x2[..., 1], x2[..., 0]], -1).view_as(x)
    else:
        pos = torch.cat([freqs, freqs], -1)
        a, b = x.chunk(2, -1)
        rot = torch.cat([-b, a], -1)
    return x * pos.cos() + rot * pos.sin()


def reference_logits(w: dict, ids: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """MolmoE's LM forward written from the public source (olmo/model.py, modeling_molmoe.py), megablocks names."""
    heads, hd = MOLMOE_CONFIG["n_heads"], D // MOLMOE_CONFIG["n_heads"]
    x = F.embedding(ids, torch.cat([w["model.transformer.wte.embedding"], w["model.transformer.wte.new_embedding"]]))
    b, t = ids.shape
    for i in range(MOLMOE_CONFIG["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        q, k, v = (rms(x, w[p + "attn_norm.weight"]) @ w[p + "att_proj.weight"].t()).split([D, D, D], -1)
        q, k = rms(q, w[p + "q_norm.weight"]), rms(k, w[p + "k_norm.weight"])
        q, k, v = (z.view(b, t, heads, hd).transpose(1, 2) for z in (q, k, v))
        q, k = rope(q, interleaved), rope(k, interleaved)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + att @ w[p + "attn_out.weight"].t()
        h = rms(x, w[p + "ff_norm.weight"]).reshape(-1, D)
        probs = torch.softmax(h @ w[p + "ffn.router.layer.weight"].t(), -1)
        top, idx = probs.topk(MOLMOE_CONFIG["moe_top_k"], -1)  # no renormalisation
        out = torch.zeros_like(h)
        for j in range(E):
            rows = slice(j * INTER, (j + 1) * INTER)
            y = F.silu(h @ w[p + "ffn.experts.mlp.w1"][rows].t()) * (h @ w[p + "ffn.experts.mlp.v1"][rows].t())
            y = y @ w[p + "ffn.experts.mlp.w2"][rows]
            out += y * (top * (idx == j)).sum(-1, keepdim=True)
        x = x + out.view(b, t, D)
    return rms(x, w["model.transformer.ln_f.weight"]) @ w["model.transformer.ff_out.weight"].t()


@pytest.fixture(scope="module")
def molmoe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("molmoe")
    return {"megablocks": build_molmoe(root / "mb"), "hf": build_molmoe(root / "hf", megablocks=False, rope_impl="llama"),
            "hf_cockatoo": build_molmoe(root / "hfc", megablocks=False),
            "published": build_molmoe(root / "pub", megablocks=False, hf_config=True)}


@pytest.mark.parametrize("name,interleaved", [("megablocks", False), ("hf", False), ("hf_cockatoo", True),
                                              ("published", True)])
def test_logits_match_reference(molmoe_dirs, name, interleaved):
    loaded = open_model(molmoe_dirs[name])
    ids = torch.randint(0, VOCAB + 8, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = loaded.adapter.forward({"input_ids": ids})
        ref = reference_logits(molmoe_weights(), ids, interleaved)
    assert ours.shape[-1] == VOCAB + 8 and bool((ours[..., VOCAB:] == torch.finfo(ours.dtype).min).all())
    torch.testing.assert_close(ours[..., :VOCAB], ref, rtol=1e-4, atol=1e-4)


def test_expert_mapping_tensor_by_tensor(molmoe_dirs):
    """Every expert matrix in memory, and every DiskTensor cut from the stacked w1/v1/w2, is the right rows."""
    from safetensors.torch import load_file

    loaded = open_model(molmoe_dirs["megablocks"])
    disk = load_file(str(molmoe_dirs["megablocks"] / "model.safetensors"))
    for ref in loaded.adapter.experts():
        p, rows = f"model.transformer.blocks.{ref.layer}.ffn.experts.mlp.", slice(ref.expert * INTER, (ref.expert + 1) * INTER)
        want = {"gate": disk[p + "w1"][rows], "up": disk[p + "v1"][rows], "down": disk[p + "w2"][rows].t()}
        live = loaded.adapter.expert_weights(ref)
        cut = {m: src.take(disk[src.key]) for m, src in loaded.adapter.disk_tensors(ref, set(disk)).items()}
        for m in want:
            assert torch.equal(live[m], want[m]) and torch.equal(cut[m], want[m]), (ref.id, m)


@pytest.mark.parametrize("name", ["megablocks", "hf", "published"])
def test_chain(molmoe_dirs, name, tmp_path):
    directory = molmoe_dirs[name]
    loaded = open_model(directory)
    batches = calibration()
    profile = profile_model(loaded, batches, summary(batches, "random"), bits=(8,), group_size=32, progress=False)
    assert profile.meta.family == "molmo" and profile.meta.top_k == 2
    assert [e.id for e in profile.experts] == [f"L{i}.E{j}" for i in range(2) for j in range(E)]
    assert all(e.shapes == {"gate": [INTER, D], "up": [INTER, D], "down": [D, INTER]} and not e.shared
               for e in profile.experts)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    artifact = compile_artifact(directory, make_plan(load_spec(spec), profile), tmp_path / "artifact", progress=False)
    quantized = load(artifact)
    ids = calibration(seed=1)[0]["input_ids"]
    with torch.no_grad():
        ref = loaded.adapter.forward({"input_ids": ids})[..., :VOCAB]
        out = quantized.adapter.forward({"input_ids": ids})[..., :VOCAB]
    assert snr_db(ref, out) >= 25
    generated = quantized.model.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 19)


def test_estimate_molmoe_1b(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nbits: [2, 3, 4]\ngroup_size: 128\nbudget: {avg_bits: 3.0}\nscope: global\n"
                    "sensitivity: hessian-local\n")
    out = estimate("molmoe-1b", spec)
    assert (out["moe_layers"], out["experts_per_layer"], out["top_k"]) == (16, 64, 8)
    assert math.isclose(out["experts_bf16_gb"], 16 * 64 * 3 * 2048 * 1024 * 2 / 1e9)


# The published allenai/MolmoE-1B-0924 config.json's LM fields (huggingface.co/allenai/MolmoE-1B-0924, commit
# ad41925d; embedding_size as of commit 7251f46). No expert-count keys; additional_vocab_size not confirmed.
PUBLISHED_1B = {"architectures": ["MOLMoEForCausalLM"], "model_type": "molmoe",
                "auto_map": {"AutoConfig": "config_molmoe.MolmoeConfig"}, "hidden_size": 2048,
                "intermediate_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 16,
                "num_key_value_heads": 16, "vocab_size": 50304, "embedding_size": 50304, "layer_norm_eps": 1e-05,
                "max_position_embeddings": 4096, "qkv_bias": False, "rope_theta": 10000.0, "clip_qkv": None,
                "tie_word_embeddings": False, "weight_tying": False, "use_position_ids": True}


def test_published_config_geometry(tmp_path):
    """HF-style keys map onto the OLMoE LM; experts default to MolmoeConfig's 64 / top-8, width = intermediate_size."""
    assert ADAPTERS["molmoe"] is MolmoeAdapter and ADAPTERS["molmo"] is MolmoeAdapter
    g = geometry(PUBLISHED_1B)
    assert (g["d"], g["heads"], g["kv_heads"], g["layers"]) == (2048, 16, 16, 16)
    assert (g["experts"], g["top_k"], g["inter"], g["embed"], g["extra"], g["tied"]) == (64, 8, 1024, 50304, 0, False)
    adapter = skeleton(dict(PUBLISHED_1B, additional_vocab_size=128), tmp_path)
    cfg = adapter.model.language.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.vocab_size) == (64, 8, 1024, 50432)
    assert not cfg.norm_topk_prob and adapter.top_k() == 8


def test_published_config_expert_count_checked(tmp_path):
    """Without num_experts the 64-expert default must agree with the router rows on disk."""
    directory = build_molmoe(tmp_path / "m", megablocks=False, hf_config=True)
    config = {k: v for k, v in MOLMOE_HF_CONFIG.items() if k not in ("num_experts", "num_experts_per_tok")}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="64 experts configured"):
        open_model(directory)
    with pytest.raises(InputError, match="intermediate_size"):
        geometry({k: v for k, v in PUBLISHED_1B.items() if k != "intermediate_size"})


def test_estimate_from_a_published_style_config(tmp_path):
    """The published config.json has no expert keys; estimate uses the remote config's 64 / top-8."""
    config = {k: v for k, v in MOLMOE_HF_CONFIG.items() if k not in ("num_experts", "num_experts_per_tok")}
    config.update(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=50304)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = estimate(str(tmp_path), Path(__file__).resolve().parents[2] / "specs" / "molmoe.yaml")
    assert (result["moe_layers"], result["experts_per_layer"], result["top_k"]) == (16, 64, 8)
