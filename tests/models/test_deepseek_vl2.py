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


# --- the image path -------------------------------------------------------------------------------
def reference_image_embeds(state: dict, config: dict, ids, images, mask, crops):
    """VL2's ``prepare_inputs_embeds`` from the public source, on the checkpoint's own (timm) tensors with
    plain ops: conv patches + pos_embed, pre-norm blocks with the fused qkv, tanh-GELU MLP, final norm;
    r x r blocks concatenated channel-major (explicit loops, not unfold); MLP with exact GELU; global grid +
    newline column, separator, local tiles stitched row-major + newline column; filled in slot order."""
    import math

    import torch.nn.functional as F

    vc, pc = config["vision_config"], config["projector_config"]
    w, heads, p, r = vc["width"], vc["heads"], vc["patch_size"], pc["downsample_ratio"]
    g = lambda k: state[k].float()  # noqa: E731

    def vit(x):
        x = F.conv2d(x, g("vision.patch_embed.proj.weight"), g("vision.patch_embed.proj.bias"), stride=p)
        x = x.flatten(2).transpose(1, 2) + g("vision.pos_embed")
        for i in range(vc["layers"]):
            b = f"vision.blocks.{i}."
            y = F.layer_norm(x, (w,), g(b + "norm1.weight"), g(b + "norm1.bias"), 1e-6)
            qkv = (y @ g(b + "attn.qkv.weight").T + g(b + "attn.qkv.bias")).view(*y.shape[:2], 3, heads, w // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-1, -2) * (w // heads) ** -0.5).softmax(-1) @ v
            x = x + att.transpose(1, 2).reshape(x.shape) @ g(b + "attn.proj.weight").T + g(b + "attn.proj.bias")
            y = F.layer_norm(x, (w,), g(b + "norm2.weight"), g(b + "norm2.bias"), 1e-6)
            y = F.gelu(y @ g(b + "mlp.fc1.weight").T + g(b + "mlp.fc1.bias"), approximate="tanh")
            x = x + y @ g(b + "mlp.fc2.weight").T + g(b + "mlp.fc2.bias")
        return F.layer_norm(x, (w,), g("vision.norm.weight"), g("vision.norm.bias"), 1e-6)

    def project(x):  # one tile [N, W]
        h = math.isqrt(x.shape[0])
        grid = x.view(h, h, w)
        hp = -(-h // r) * r
        padded = torch.zeros(hp, hp, w)
        padded[:h, :h] = grid
        rows = []
        for bi in range(hp // r):
            for bj in range(hp // r):
                rows.append(torch.stack([padded[bi * r + ki, bj * r + kj, c] for c in range(w)
                                         for ki in range(r) for kj in range(r)]))
        y = F.gelu(torch.stack(rows) @ g("projector.layers.0.weight").T + g("projector.layers.0.bias"))
        return y @ g("projector.layers.2.weight").T + g("projector.layers.2.bias")

    embeds = g("language.model.embed_tokens.weight")[ids]
    newline, sep = g("image_newline"), g("view_seperator")
    for b in range(ids.shape[0]):
        tile, values = 0, []
        for nw, nh in crops[b].tolist():
            if not nw or not nh:
                break
            feats = [project(t) for t in vit(images[b, tile:tile + 1 + nw * nh].float())]
            tile += 1 + nw * nh
            h = math.isqrt(feats[0].shape[0])
            for y in range(h):
                values += [feats[0][y * h + x] for x in range(h)] + [newline]
            values.append(sep)
            for ty in range(nh):
                for y in range(h):
                    for tx in range(nw):
                        values += [feats[1 + ty * nw + tx][y * h + x] for x in range(h)]
                    values.append(newline)
        slots = mask[b].nonzero().flatten().tolist()
        assert len(slots) == len(values)
        for s, v in zip(slots, values):
            embeds[b, s] = v
    return embeds


def vl2_sample(directory, sizes=((37, 20),), text=None, seed=0):
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from mopeq.models import read_config
    from mopeq.models.deepseek_vl2_vision import encode

    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for w, h in sizes]
    text = text or "".join("<image>\n" for _ in sizes) + "what is shown? a cat"
    return encode(text, images, AutoTokenizer.from_pretrained(directory), read_config(directory))


def test_image_path_matches_public_source(tiny_models):
    from safetensors.torch import load_file

    from mopeq.models import open_model, read_config
    from mopeq.models.deepseek_vl2_vision import image_embeds

    directory = tiny_models["deepseek_vl2"]
    loaded = open_model(directory)
    for sizes in [((37, 20),), ((16, 16), (40, 70))]:  # 2x2 tiles; 1x1 and 2x2 tiles of one prompt
        b = vl2_sample(directory, sizes)
        with torch.no_grad():
            got = image_embeds(loaded.model, b["input_ids"], b["images"], b["images_seq_mask"], b["images_spatial_crop"])
        want = reference_image_embeds(load_file(directory / "model.safetensors"), read_config(directory),
                                      b["input_ids"], b["images"], b["images_seq_mask"], b["images_spatial_crop"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            with_images = loaded.adapter.forward(b)
            text_only = loaded.adapter.forward({"input_ids": b["input_ids"]})
            via_embeds = loaded.model.language(inputs_embeds=want, use_cache=False).logits
        torch.testing.assert_close(with_images, via_embeds, rtol=1e-4, atol=1e-4)
        assert (with_images - text_only).abs().max() > 1e-2  # the image reaches the logits


def test_processor_tiles_and_token_counts(tiny_models):
    from mopeq.models.deepseek_vl2_vision import select_best_resolution, tokens_per_image

    cands = [(16, 16), (16, 32), (32, 16), (32, 32)]
    assert select_best_resolution((37, 20), cands) == (32, 32)  # keeps 32x17 px of 740
    assert select_best_resolution((10, 40), cands) == (16, 32)  # same 8x32 px as 32x32, less waste
    assert select_best_resolution((8, 8), cands) == (16, 16)
    # 4x4 patch grid, 2x2 downsampling -> h = w = 2; real VL2: 384/14 -> 27 -> 14, 421 tokens for 1x1 tiles
    assert tokens_per_image(16, 4, 2, 2, 2) == 2 * 3 + 1 + 4 * 5
    assert tokens_per_image(384, 14, 2, 1, 1) == 421
    # the counts visionsqueezer.com/providers/deepseek restates from VL2's tokenize_with_images: 2x2 and 3x3 tiles
    assert tokens_per_image(384, 14, 2, 2, 2) == 1023 and tokens_per_image(384, 14, 2, 3, 3) == 2017
    directory = tiny_models["deepseek_vl2"]
    b = vl2_sample(directory, ((37, 20),))
    assert b["images"].shape == (1, 5, 3, 16, 16) and b["images_spatial_crop"].tolist() == [[[2, 2]]]
    assert int(b["images_seq_mask"].sum()) == 27
    three = vl2_sample(directory, ((37, 20), (40, 70), (16, 16)))  # more than two images: no cropping
    assert three["images_spatial_crop"].tolist() == [[[1, 1], [1, 1], [1, 1]]]
    assert int(three["images_seq_mask"].sum()) == 3 * tokens_per_image(16, 4, 2, 1, 1)
    with pytest.raises(InputError, match="placeholders"):
        vl2_sample(directory, ((37, 20),), text="no image here")
    from PIL import Image
    from transformers import AutoTokenizer

    from mopeq.models import read_config
    from mopeq.models.deepseek_vl2_vision import encode

    grey = Image.new("L", (30, 20), 200)  # converted to RGB first, as VL2's processor does
    out = encode("<image>\nx", [grey], AutoTokenizer.from_pretrained(directory), read_config(directory))
    assert out["images"].shape[2] == 3 and torch.allclose(out["images"][0, 0, :, 8, 8], torch.full((3,), 200 / 127.5 - 1))


def _calib_folder(folder, n=6):
    import json as js

    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.RandomState(3)
    with open(folder / "index.jsonl", "w") as f:
        for i in range(n):
            w, h = int(rng.randint(8, 48)), int(rng.randint(8, 48))
            Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(folder / f"{i}.png")
            f.write(js.dumps({"image": f"{i}.png", "question": "what is it?", "answer": "a cat" if i % 2 else "a dog"}) + "\n")
    return folder


def test_image_calibration_profile_compile_run(tiny_models, tmp_path):
    """profile on image+question batches -> plan -> compile -> load -> run with images, 8 bits close to float."""
    from transformers import AutoTokenizer

    from mopeq.compiler.artifact import compile_artifact
    from mopeq.models import open_model, read_config
    from mopeq.planner import load_spec, make_plan
    from mopeq.profiler.calibration import image_folder_batches, summary
    from mopeq.profiler.profile import profile_model
    from mopeq.runtime.load import load

    from .test_families import SPEC, snr_db

    directory = tiny_models["deepseek_vl2"]
    loaded = open_model(directory)
    batches = image_folder_batches(_calib_folder(tmp_path / "calib"), read_config(directory),
                                   tokenizer=AutoTokenizer.from_pretrained(directory))
    assert len(batches) == 6 and all(b["images"].dim() == 5 and b["input_ids"].shape[0] == 1 for b in batches)
    info = summary(batches, "calib")
    profile = profile_model(loaded, batches, info, bits=(8,), group_size=32, progress=False)
    assert set(profile.meta.calibration["tokens_by_modality"]) == {"image"}
    assert sum(e.tokens for e in profile.experts if not e.shared) == 2 * sum(b["input_ids"].numel() for b in batches)
    (tmp_path / "spec.yaml").write_text(SPEC)
    artifact = compile_artifact(directory, make_plan(load_spec(tmp_path / "spec.yaml"), profile), tmp_path / "a",
                                progress=False)
    quantized = load(artifact)
    b = vl2_sample(directory, ((40, 70),), seed=5)
    with torch.no_grad():
        ref, out = loaded.adapter.forward(b), quantized.adapter.forward(b)
    assert snr_db(ref, out) >= 25
    # generation sees the image: its first token is the image-conditioned forward's argmax
    inputs = {k: v for k, v in b.items() if k != "labels"}
    generated = quantized.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, b["input_ids"].shape[1] + 3)
    assert generated[0, b["input_ids"].shape[1]] == out[0, -1].argmax()


def test_cli_run_with_an_image(tiny_models, tmp_path, capsys):
    from mopeq.cli import main

    from .test_families import SPEC

    directory = tiny_models["deepseek_vl2"]
    folder = _calib_folder(tmp_path / "calib", n=2)
    (tmp_path / "spec.yaml").write_text(SPEC)
    assert main(["profile", str(directory), "--calib", str(folder), "--bits", "8", "--group-size", "32",
                 "-o", str(tmp_path / "p.json")]) == 0
    assert main(["plan", str(tmp_path / "spec.yaml"), "--profile", str(tmp_path / "p.json"), "-o",
                 str(tmp_path / "plan.json")]) == 0
    assert main(["compile", str(directory), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "a"), "--prompt", "what is it?", "--image", str(folder / "0.png"),
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["run", str(tmp_path / "a"), "--prompt", "x", "--image", str(folder / "missing.png")]) == 2
    assert "missing.png not found" in capsys.readouterr().err


def test_partial_vision_checkpoint_names_the_missing_tensor(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from mopeq.models import open_model

    directory = tmp_path / "vl2"
    shutil.copytree(tiny_models["deepseek_vl2"], directory)
    state = load_file(directory / "model.safetensors")
    del state["vision.blocks.1.attn.qkv.weight"]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"tensor vision\.blocks\.1\.attn\.qkv\.weight missing from the checkpoint"):
        open_model(directory)


@pytest.mark.parametrize("bad,match", [({"projector_config": {"projector_type": "linear"}}, "projector_type"),
                                       ({"vision_config": {"class_token": True}}, "class_token"),
                                       ({"tile_tag": "1D"}, "tile_tag")])
def test_unsupported_vision_configs_are_input_errors(bad, match):
    from mopeq.models.deepseek_vl2_vision import vision_settings

    config = {"vision_config": {"width": 16}, "projector_config": {"input_dim": 16}}
    for key, value in bad.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(InputError, match=match):
        vision_settings(config, "x")


def test_vision_param_count_from_config_matches_the_checkpoint(tiny_models):
    """``mopeq estimate`` counts the image path from the config: equal to every non-language checkpoint tensor."""
    from safetensors import safe_open

    from mopeq.models import read_config
    from mopeq.models.deepseek_vl2_vision import vision_params

    directory = tiny_models["deepseek_vl2"]
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        stored = sum(int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys() if not k.startswith("language."))
    assert vision_params(read_config(directory)) == stored


def test_layer_streamed_profiling_with_image_calibration_equals_in_memory(tiny_models):
    """Images go through the resident vision tower into the first layer's input; the rest streams."""
    from mopeq.models import open_model
    from mopeq.profiler.calibration import summary
    from mopeq.profiler.profile import profile_model
    from mopeq.profiler.stream import profile_streamed

    directory = tiny_models["deepseek_vl2"]
    b = vl2_sample(directory)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, :-1] = b["input_ids"][:, 1:]
    batches = [dict(b, labels=labels, modality="image")]
    info = summary(batches, "images")
    full = profile_model(open_model(directory), batches, info, bits=(4,), group_size=16, progress=False,
                         curvature=("fisher",))
    streamed, _ = profile_streamed(directory, batches, info, bits=(4,), group_size=16, curvature=("fisher",))
    assert streamed.meta.calibration["loss"] == pytest.approx(full.meta.calibration["loss"], rel=1e-5)
    for a, s in zip(full.experts, streamed.experts):
        assert (a.id, a.tokens, a.tokens_by_modality) == (s.id, s.tokens, s.tokens_by_modality)
        assert s.trace["fisher"].mean == pytest.approx(a.trace["fisher"].mean, rel=1e-4, abs=1e-12)


def test_vqa_eval_on_an_artifact(tiny_models, tmp_path, capsys):
    """`mopeq eval --task vqa` on a VL2 model: multiple choice picks the highest-scoring continuation."""
    import json as js

    from transformers import AutoTokenizer

    from mopeq.cli import main
    from mopeq.evaluate import vqa_file
    from mopeq.models import open_model
    from mopeq.profiler.calibration import load_rgb
    from mopeq.vlm import image_inputs

    directory = tiny_models["deepseek_vl2"]
    folder = _calib_folder(tmp_path / "data", n=3)
    records = [js.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    for r in records[:2]:
        r["choices"] = ["a cat", "a dog"]
    (folder / "vqa.jsonl").write_text("".join(js.dumps(r) + "\n" for r in records))
    loaded, tok = open_model(directory), AutoTokenizer.from_pretrained(directory)
    result = vqa_file(loaded, folder / "vqa.jsonl", tokenizer=tok)
    assert result["questions"] == 3
    expected = 0
    for r in records[:2]:  # the same decision, scored independently through the adapter's forward
        inputs = image_inputs(loaded, tok, r["question"], load_rgb(folder / r["image"], "x"))
        scores = {}
        for c in r["choices"]:
            ids = torch.tensor([tok.encode(" " + c, add_special_tokens=False)])
            n = inputs["input_ids"].shape[1]
            full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1),
                        images_seq_mask=torch.cat([inputs["images_seq_mask"], torch.zeros_like(ids, dtype=torch.bool)], 1))
            with torch.no_grad():
                logp = loaded.adapter.forward(full)[0].log_softmax(-1)
            scores[c] = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(ids[0].tolist()))
        expected += max(scores, key=scores.get) == r["answer"]
    greedy = round(result["accuracy"] * 3) - expected  # the third record (no choices) is greedy exact match
    assert greedy in (0, 1)
    capsys.readouterr()
    assert main(["eval", str(directory), "--task", "vqa", "--data", str(folder / "vqa.jsonl"), "--json"]) == 0
    assert js.loads(capsys.readouterr().out.strip().splitlines()[-1])["questions"] == 3
