"""DeepSeek-VL2 routing: the mapped router against a per-token re-derivation of the public ``MoEGate``
(deepseek-ai/DeepSeek-VL2, deepseek_vl2/models/modeling_deepseek.py), on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from mopeq.models.deepseek_vl2 import DeepseekVL2Adapter, SourceMoEGate, language_config
from mopeq.schemas import InputError

E, H, K = 8, 16, 3
BASE = dict(vocab_size=32, hidden_size=H, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=E, num_experts_per_tok=K,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=4, q_lora_rank=None, qk_nope_head_dim=4,
            qk_rope_head_dim=4, v_head_dim=4)
CASES = {
    "greedy-softmax": dict(topk_method="greedy"),
    "greedy-softmax-norm-scaled": dict(topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=2.5),
    "greedy-sigmoid": dict(topk_method="greedy", scoring_func="sigmoid", routed_scaling_factor=1.5),
    "group-limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "noaux_tc": dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                     routed_scaling_factor=2.0),
    "noaux_tc-one-group": dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=1, topk_group=1,
                               routed_scaling_factor=2.0),
}


def reference(x, weight, bias, cfg):
    """One token at a time, written from the public MoEGate's description (not from SourceMoEGate)."""
    out_w, out_i = [], []
    for h in x:
        logits = weight.double() @ h.double()
        scores = torch.softmax(logits, 0) if cfg.get("scoring_func", "softmax") == "softmax" else torch.sigmoid(logits)
        method, n_group = cfg["topk_method"], cfg.get("n_group", 1)
        choice = scores + bias.double() if method == "noaux_tc" else scores.clone()
        if method != "greedy":
            size = E // n_group
            groups = [choice[g * size:(g + 1) * size] for g in range(n_group)]
            rank = [sorted(g.tolist())[-2:] for g in groups]
            value = [sum(r) if method == "noaux_tc" else r[-1] for r in rank]
            kept = sorted(range(n_group), key=lambda g: -value[g])[: cfg["topk_group"]]
            for g in range(n_group):
                if g not in kept:
                    choice[g * size:(g + 1) * size] = 0.0
        idx = sorted(range(E), key=lambda e: -choice[e].item())[:K]
        w = torch.stack([(scores if method == "noaux_tc" else choice)[e] for e in idx])
        if cfg.get("norm_topk_prob") and K > 1:
            w = w / w.sum()
        out_w.append(w * cfg.get("routed_scaling_factor", 1.0))
        out_i.append(idx)
    return torch.stack(out_w), out_i


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_matches_public_moegate(case):
    cfg = CASES[case]
    gate = SourceMoEGate(language_config({"language_config": dict(BASE, **cfg)}, "x"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, H, generator=gen))
        if case.startswith("noaux"):
            gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.3)
    x = torch.randn(2, 5, H, generator=gen)
    _, weights, indices = gate(x)
    bias = getattr(gate, "e_score_correction_bias", torch.zeros(E))
    ref_w, ref_i = reference(x.reshape(-1, H), gate.weight.detach(), bias.detach(), cfg)
    order = indices.argsort(dim=-1)  # topk(sorted=False): compare as sets, weights in the same order
    got_i, got_w = indices.gather(1, order), weights.gather(1, order)
    want_i = torch.tensor(ref_i)
    want_order = want_i.argsort(dim=-1)
    assert torch.equal(got_i, want_i.gather(1, want_order))
    torch.testing.assert_close(got_w.double(), ref_w.gather(1, want_order), rtol=1e-5, atol=1e-6)


def test_plain_greedy_equals_transformers_router():
    """Where transformers' DeepseekV2 router is faithful (softmax, greedy, no normalisation) both agree."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = language_config({"language_config": dict(BASE, topk_method="greedy", routed_scaling_factor=1.5)}, "x")
    ours, theirs = SourceMoEGate(config), DeepseekV2TopkRouter(config)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(1)))
        theirs.weight.copy_(ours.weight)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    for a, b in zip(ours(x), theirs(x)):
        torch.testing.assert_close(a, b)


def test_noaux_tc_model_expects_correction_bias():
    lang = dict(BASE, topk_method="noaux_tc", scoring_func="sigmoid", n_group=1, topk_group=1)
    model = DeepseekVL2Adapter.build_model({"model_type": "deepseek_vl_v2", "language_config": lang}, "nowhere")
    keys = set(model.state_dict())
    assert "language.model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "language.model.layers.0.mlp.gate.e_score_correction_bias" not in keys  # dense first layer


def test_built_model_uses_source_router(tiny_models):
    model = DeepseekVL2Adapter.build_model(__import__("json").loads(
        (tiny_models["deepseek_vl2"] / "config.json").read_text()), tiny_models["deepseek_vl2"])
    assert isinstance(model.language.model.layers[1].mlp.gate, SourceMoEGate)


@pytest.mark.parametrize("bad", [dict(moe_layer_freq=2), dict(n_shared_experts=None),
                                 dict(topk_method="noaux_tc"), dict(scoring_func="relu")])
def test_unmappable_configs_are_input_errors(bad):
    with pytest.raises(InputError):
        language_config({"language_config": dict(BASE, **bad)}, "x")
