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
from mopeq.models.molmo_vision import image_token_ids, molmo_image_inputs, select_tiling
from mopeq.models.molmoe import MolmoeAdapter, geometry
from mopeq.schemas import InputError

from .conftest import (MOLMOE_CONFIG, MOLMOE_HF_CONFIG, MOLMOE_VISION, VOCAB, build_molmoe, molmoe_vision_weights,
                       molmoe_weights)
from .molmoe_vision import image_embeddings, image_features
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


def reference_logits(w: dict, ids: torch.Tensor, interleaved: bool = False, embeds=None) -> torch.Tensor:
    """MolmoE's LM forward written from the public source (olmo/model.py, modeling_molmoe.py), megablocks names."""
    heads, hd = MOLMOE_CONFIG["n_heads"], D // MOLMOE_CONFIG["n_heads"]
    x = F.embedding(ids, torch.cat([w["model.transformer.wte.embedding"], w["model.transformer.wte.new_embedding"]])) \
        if embeds is None else embeds
    b, t = x.shape[:2]
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


# --- the image path ---------------------------------------------------------------------------------------
# Tiny geometry: 16-pixel crops of 2-pixel patches (G = 8, pooled 4 x 4), margins of 2 patches (window 8 px).
TINY = dict(base=16, patch=2, max_crops=6, margins=(2, 2))
VIT_HEADS = MOLMOE_CONFIG["vision_backbone"]["image_num_heads"]


def image_batch(seed: int = 0, prompt=(10, 11, 12, 13)) -> dict:
    """Two 20 x 28 images (2 x 3 tiles + the global crop each) after a BOS, the prompt after them."""
    gen = torch.Generator().manual_seed(seed)
    ids = image_token_ids(MOLMOE_CONFIG)
    one = [molmo_image_inputs(torch.randint(0, 256, (20, 28, 3), generator=gen, dtype=torch.uint8), ids,
                              prefix=[1], suffix=prompt, **TINY) for _ in range(2)]
    batch = {k: torch.cat([o[k] for o in one]) for k in one[0]}
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = torch.where(batch["input_ids"][:, 1:] < VOCAB, batch["input_ids"][:, 1:], -100)
    return dict(batch, labels=labels, modality="image")


def test_image_logits_match_reference(molmoe_dirs):
    """ViT + pooling + projector + insertion + LM against the plain-tensor reference of the public code.

    The vision features are compared in float64 (nine ViT layers of random weights amplify float32 rounding);
    the logits in float32 (the OLMoE experts' grouped matmul has no float64 kernel)."""
    import copy

    loaded = open_model(molmoe_dirs["megablocks"])
    batch = image_batch()
    w = {**molmoe_weights(), **molmoe_vision_weights()}
    args = (batch["images"], batch["image_masks"])
    vision64 = copy.deepcopy(loaded.model.model.vision_backbone).double()
    with torch.no_grad():
        ours = loaded.adapter.forward(batch)
        feats = vision64(batch["images"].double(), batch["image_masks"])
        ref_feats = image_features({k: v.double() for k, v in w.items()}, batch["images"].double(),
                                   batch["image_masks"], VIT_HEADS, MOLMOE_VISION["layers"])
        embeds = image_embeddings(w, batch["input_ids"], *args, batch["image_input_idx"], VIT_HEADS,
                                  MOLMOE_VISION["layers"])
        ref = reference_logits(w, batch["input_ids"], embeds=embeds)
    assert batch["images"].shape == (2, 7, 64, 12) and feats.shape == (2, 7, 16, D)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours[..., :VOCAB], ref, rtol=1e-3, atol=1e-3)


def test_images_change_logits(molmoe_dirs):
    loaded = open_model(molmoe_dirs["hf_cockatoo"])
    batch = image_batch()
    with torch.no_grad():
        with_image = loaded.adapter.forward(batch)[..., :VOCAB]
        text_only = loaded.adapter.forward({"input_ids": batch["input_ids"]})[..., :VOCAB]
        other = loaded.adapter.forward(dict(batch, images=batch["images"].flip(1)))[..., :VOCAB]
    assert snr_db(with_image, text_only) < 10 and snr_db(with_image, other) < 20
    torch.testing.assert_close(with_image[:, 0], text_only[:, 0])  # the BOS precedes every image token


def test_image_chain(molmoe_dirs, tmp_path):
    """profile (text + image batches) -> plan -> compile -> runtime load -> image forward close to float."""
    directory = molmoe_dirs["hf"]
    loaded = open_model(directory)
    batches = calibration() + [image_batch(seed=3)]
    profile = profile_model(loaded, batches, summary(batches, "random"), bits=(8,), group_size=32, progress=False)
    assert all(e.tokens_by_modality.get("image", 0) > 0 for e in profile.experts if e.tokens)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    artifact = compile_artifact(directory, make_plan(load_spec(spec), profile), tmp_path / "artifact", progress=False)
    quantized = load(artifact)
    batch = image_batch(seed=1)
    with torch.no_grad():
        ref = loaded.adapter.forward(batch)[..., :VOCAB]
        out = quantized.adapter.forward(batch)[..., :VOCAB]
        text = quantized.adapter.forward({"input_ids": batch["input_ids"]})[..., :VOCAB]
    assert snr_db(ref, out) >= 25 and snr_db(ref, text) < 10
    keys = {k: batch[k][:1] for k in ("input_ids", "images", "image_masks", "image_input_idx")}
    generated = quantized.model.generate(**keys, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, keys["input_ids"].shape[1] + 3)


def test_minus_one_is_padding(molmoe_dirs):
    """Id -1 pads (MolmoModel.forward): left padding leaves the real tokens' logits unchanged."""
    loaded = open_model(molmoe_dirs["megablocks"])
    batch = {k: v[:1] for k, v in image_batch().items() if k != "modality"}
    idx = batch["image_input_idx"]
    padded = dict(batch, input_ids=torch.cat([torch.full((1, 3), -1), batch["input_ids"]], 1),
                  image_input_idx=torch.where(idx >= 0, idx + 3, idx))
    with torch.no_grad():
        plain, shifted = loaded.adapter.forward(batch), loaded.adapter.forward(padded)
    torch.testing.assert_close(shifted[:, 3:], plain, rtol=1e-4, atol=1e-4)


def _check_layout(out: dict, ids: dict, tiles: tuple[int, int], half: int, window: int, start_row: int = 2):
    """Token counts and image_input_idx of one preprocessed image against the documented formulas."""
    th, tw = tiles
    rows, cols = window * th + 2 * start_row, window * tw + 2 * start_row
    tokens = out["input_ids"][0]
    assert len(tokens) == 2 + half * (half + 1) + 2 + rows * (cols + 1)
    assert int((tokens == ids["<im_patch>"]).sum()) == half * half + rows * cols
    assert int((tokens == ids["<im_col>"]).sum()) == half + rows
    idx = out["image_input_idx"][0]
    assert idx.shape == (1 + th * tw, half * half)
    patches = torch.nonzero(tokens == ids["<im_patch>"])[:, 0]
    assert torch.equal(idx[0], patches[: half * half])  # the global image, in order
    valid = idx[1:][idx[1:] >= 0]
    assert sorted(valid.tolist()) == patches[half * half:].tolist()  # every crop patch token exactly once
    crop_start = 1 + half * (half + 1) + 2
    for t in range(th * tw):
        i, j = divmod(t, tw)
        for k in range(half * half):
            r, c = divmod(k, half)
            first_r, first_c = (0 if i == 0 else start_row), (0 if j == 0 else start_row)
            keep_r = first_r <= r < (half if i == th - 1 else half - start_row)
            keep_c = first_c <= c < (half if j == tw - 1 else half - start_row)
            p = int(idx[1 + t, k])
            if not (keep_r and keep_c):
                assert p == -100
                continue
            assert divmod(p - crop_start, cols + 1) == (i * window + r, j * window + c)  # row-major over the image


def test_preprocessing_real_geometry():
    """336/14, margins 4: global 12 x (12 + 1) tokens; crops R = 8 th + 4 rows of C = 8 tw + 4 (+ <im_col>)."""
    ids = image_token_ids({"embedding_size": 50304, "additional_vocab_size": 128})
    assert ids == {"<im_start>": 50304, "<im_end>": 50305, "<im_patch>": 50306, "<im_col>": 50307}
    square = torch.rand(336, 336, 3, generator=torch.Generator().manual_seed(0))
    out = molmo_image_inputs(square, ids)
    assert select_tiling(224, 224, 224, 12) == (1, 1) and len(out["input_ids"][0]) == 158 + 2 + 12 * 13
    _check_layout(out, ids, (1, 1), 12, 8)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(out["images"][0, 0, 1], ((square[0:14, 14:28] - mean) / std).reshape(-1))  # (dy dx c)
    wide = torch.randint(0, 256, (280, 700, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = molmo_image_inputs(wide, ids)
    tiles = select_tiling(280 - 112, 700 - 112, 224, 12)
    assert tiles == (1, 3) and out["images"].shape == (1, 4, 576, 588)
    _check_layout(out, ids, tiles, 12, 8)
    # The public processor's masks: crop 0's (11 padded pixel rows: partial, never empty) sits in the global slot
    # (whose own mask, 134 of 336 rows real, would have 14 empty patch rows); the last row is -1.
    masks = out["image_masks"][0]
    assert bool((masks[-1] == -1).all()) and int((masks[0] == 0).sum()) == 0 and bool((masks[0] < 1).any())
    many = molmo_image_inputs(torch.rand(900, 1000, 3), ids, max_crops=6)
    assert many["images"].shape[1] == 1 + 6
    _check_layout(many, ids, select_tiling(900 - 112, 1000 - 112, 224, 6), 12, 8)


def test_preprocessing_tiny_geometry():
    ids = image_token_ids(MOLMOE_CONFIG)
    out = molmo_image_inputs(torch.rand(20, 28, 3), ids, **TINY)
    _check_layout(out, ids, (2, 3), 4, 2, start_row=1)
    assert out["images"].shape == (1, 7, 64, 12) and out["image_masks"].shape == (1, 7, 64)


def test_vision_backbone_refusals(tmp_path):
    """Partial or inconsistent vision tensors: one-line InputErrors naming the tensor or field."""
    from safetensors.torch import load_file, save_file

    directory = build_molmoe(tmp_path / "m")
    path = directory / "model.safetensors"
    state = load_file(str(path))
    missing = "model.vision_backbone.image_vit.transformer.resblocks.4.ffn_norm.bias"
    save_file({k: v for k, v in state.items() if k != missing}, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"tensor {missing} missing") as err:
        open_model(directory)
    assert "\n" not in str(err.value)
    save_file({k: v for k, v in state.items() if "image_projector" not in k}, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match="image_projector.w1.weight missing"):
        open_model(directory)
    save_file(state, str(path), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["vision_backbone"]["image_num_layers"] = 23
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="image_num_layers is 23, but the checkpoint's vision tensors give 9"):
        open_model(directory)


def test_text_only_checkpoint_refuses_images(tmp_path):
    loaded = open_model(build_molmoe(tmp_path / "t", vision=False))
    assert not hasattr(loaded.model, "model")
    batch = image_batch()
    with pytest.raises(InputError, match="no model.vision_backbone"):
        loaded.adapter.forward(batch)
    assert loaded.adapter.forward({"input_ids": batch["input_ids"]}).shape[:2] == batch["input_ids"].shape


def test_image_calibration_folder_through_the_cli(molmoe_dirs, tmp_path):
    """`mopeq profile MOLMOE --calib FOLDER`: MolmoE's processor tiles each image; labels skip image tokens."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from mopeq.cli import main
    from mopeq.models import read_config
    from mopeq.models.molmo_vision import image_token_ids
    from mopeq.profiler.calibration import image_folder_batches
    from mopeq.schemas import read_profile

    from .test_deepseek_vl2 import _calib_folder

    directory = tmp_path / "molmoe"
    shutil.copytree(molmoe_dirs["megablocks"], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(overlap_margins=[2, 2], max_crops=6)  # the tiny 16-pixel crops (G = 8) need 2-patch margins
    (directory / "config.json").write_text(json.dumps(config))
    folder = _calib_folder(tmp_path / "calib", n=3)
    batches = image_folder_batches(folder, read_config(directory), tokenizer=AutoTokenizer.from_pretrained(directory),
                                   directory=directory)
    special = set(image_token_ids(read_config(directory)).values())
    for b in batches:
        assert b["images"].shape[1] == b["image_input_idx"].shape[1] >= 2  # global view + crops
        targets = set(b["labels"][b["labels"] >= 0].tolist())
        assert targets and not targets & special
        assert int((b["image_input_idx"] >= 0).sum()) == int((b["input_ids"] == image_token_ids(config)["<im_patch>"]).sum())
    assert main(["profile", str(directory), "--calib", str(folder), "--bits", "8", "--group-size", "16",
                 "-o", str(tmp_path / "p.json")]) == 0
    profile = read_profile(tmp_path / "p.json")
    assert set(profile.meta.calibration["tokens_by_modality"]) == {"image"}
    assert sum(e.tokens for e in profile.experts) == 2 * 2 * sum(b["input_ids"].numel() for b in batches)
    # ... and on through plan, compile and `run --image` on the artifact
    (tmp_path / "spec.yaml").write_text("version: 1\nbits: [8]\ngroup_size: 16\nbudget: {fraction: 1.0}\n"
                                        "scope: global\nsensitivity: hessian-local\n")
    assert main(["plan", str(tmp_path / "spec.yaml"), "--profile", str(tmp_path / "p.json"), "-o",
                 str(tmp_path / "plan.json")]) == 0
    assert main(["compile", str(directory), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "a")]) == 0
    assert main(["run", str(tmp_path / "a"), "--prompt", "what is it?", "--image", str(folder / "1.png"),
                 "--max-new-tokens", "2"]) == 0
    assert main(["eval", str(tmp_path / "a"), "--task", "vqa", "--data", str(folder / "index.jsonl"), "--json"]) == 0


def test_default_vision_param_count_matches_a_built_backbone():
    """`mopeq estimate`'s MolmoE vision size: the tensors of the default backbone, counted on a built module."""
    from mopeq.models.molmo_vision import MolmoVisionBackbone, default_geometry, param_count

    g = default_geometry(2048)
    with torch.device("meta"):
        built = sum(p.numel() for p in MolmoVisionBackbone(g).parameters())
    assert param_count(g) == built


def test_layer_streamed_image_calibration_with_curvature_equals_in_memory(molmoe_dirs):
    """Image batches run through the resident vision backbone; the layers stream, Fisher included."""
    from mopeq.profiler.stream import profile_streamed

    batches = [image_batch()]
    info = summary(batches, "images")
    kw = dict(bits=(4,), group_size=16, curvature=("fisher",))
    full = profile_model(open_model(molmoe_dirs["megablocks"]), batches, info, progress=False, **kw)
    streamed, _ = profile_streamed(molmoe_dirs["megablocks"], batches, info, **kw)
    assert streamed.meta.calibration["loss"] == pytest.approx(full.meta.calibration["loss"], rel=1e-5)
    for a, b in zip(full.experts, streamed.experts):
        assert (a.id, a.tokens, a.tokens_by_modality) == (b.id, b.tokens, b.tokens_by_modality)
        assert b.trace["fisher"].mean == pytest.approx(a.trace["fisher"].mean, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("name", ["megablocks", "published"])
def test_layer_streamed_profiling_equals_in_memory(molmoe_dirs, name):
    """Both layouts stream (OLMo's fused attention split and stacked experts cut per layer on load)."""
    from mopeq.profiler.stream import profile_streamed

    batches = calibration()
    info = summary(batches, "random")
    full = profile_model(open_model(molmoe_dirs[name]), batches, info, bits=(4,), group_size=16, progress=False)
    streamed, stats = profile_streamed(molmoe_dirs[name], batches, info, bits=(4,), group_size=16)
    assert stats.layers_loaded == [0, 1]
    assert streamed.meta.calibration["loss"] == pytest.approx(full.meta.calibration["loss"], rel=1e-5)
    for a, b in zip(full.experts, streamed.experts):  # sums over differently strided copies: last bits may differ
        assert (a.id, a.tokens) == (b.id, b.tokens)
        assert b.perturbation["4"] == pytest.approx(a.perturbation["4"], rel=1e-9)
        assert b.trace["hessian-local"].mean == pytest.approx(a.trace["hessian-local"].mean, rel=1e-4)
