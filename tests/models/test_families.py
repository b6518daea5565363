"""profile -> plan -> compile -> load -> generate on a tiny checkpoint of every supported family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mopeq.compiler.artifact import compile_artifact
from mopeq.models import open_model
from mopeq.planner import load_spec, make_plan
from mopeq.profiler.calibration import summary
from mopeq.profiler.profile import profile_model
from mopeq.runtime.load import load
from mopeq.schemas import InputError

# family -> (expected adapter family, MoE layers, has a shared expert)
EXPECTED = {
    "mixtral": ("mixtral", [0, 1], False),
    "qwen2_moe": ("qwen2_moe", [0, 1], True),
    "qwen3_moe": ("qwen3_moe", [0, 1], False),
    "olmoe": ("olmoe", [0, 1], False),
    "deepseek_v2": ("deepseek_v2", [1], True),
    "deepseek_v3": ("deepseek_v2", [1], True),
    "phimoe": ("phimoe", [0, 1], False),
    "qwen3_vl_moe": ("qwen3_vl_moe", [0, 1], False),
    "qwen3_vl_moe_hub": ("qwen3_vl_moe", [0, 1], False),
    "deepseek_vl2": ("deepseek_vl_v2", [1], True),
    "deepseek_vl2_tiny_mha": ("deepseek_vl_v2", [1], True),
}
SPEC = "version: 1\nbits: [8]\ngroup_size: 32\nbudget: {fraction: 1.0}\nscope: global\nsensitivity: hessian-local\n"


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def compile_8bit_and_compare(loaded, profile, ids, tmp_path, spec: str = SPEC):
    """Plan ``spec`` (8 bits) on ``profile``, compile, load the artifact: its logits on ``ids`` within 25 dB SNR of
    ``loaded``'s. Returns the loaded artifact."""
    (tmp_path / "spec.yaml").write_text(spec)
    plan = make_plan(load_spec(tmp_path / "spec.yaml"), profile)
    quantized = load(compile_artifact(loaded.directory, plan, tmp_path / "artifact", progress=False))
    with torch.no_grad():
        ref = loaded.adapter.forward({"input_ids": ids})
        out = quantized.adapter.forward({"input_ids": ids})
    assert snr_db(ref, out) >= 25
    return quantized


def calibration(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 40, (2, 16), generator=gen), "modality": "text"} for _ in range(2)]


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_chain(family, tiny_models, tmp_path):
    directory = tiny_models[family]
    loaded = open_model(directory)
    batches = calibration()
    profile = profile_model(loaded, batches, summary(batches, "random"), bits=(8,), group_size=32, progress=False)
    name, moe_layers, shared = EXPECTED[family]
    assert profile.meta.family == name and profile.meta.top_k == 2
    routed = [e for e in profile.experts if not e.shared]
    assert sorted({e.layer for e in routed}) == moe_layers and len(routed) == 4 * len(moe_layers)
    inter = 24 if family.startswith("qwen3_vl") else 16
    assert all(e.shapes == {"gate": [inter, 32], "up": [inter, 32], "down": [32, inter]} for e in routed)
    assert sum(e.shared for e in profile.experts) == (len(moe_layers) if shared else 0)
    assert sum(e.tokens for e in routed) == 2 * len(moe_layers) * 64  # top-2 over 64 calibration tokens

    ids = calibration(seed=1)[0]["input_ids"]
    quantized = compile_8bit_and_compare(loaded, profile, ids, tmp_path)
    generated = quantized.model.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 19)


def test_vl2_vision_tensors_pass_through(tiny_models, tmp_path):
    """DeepSeek-VL2's vision encoder and projector are copied into the artifact byte for byte."""
    directory = tiny_models["deepseek_vl2"]
    loaded = open_model(directory)
    batches = calibration()
    profile = profile_model(loaded, batches, summary(batches, "random"), bits=(8,), group_size=32, progress=False)
    (tmp_path / "spec.yaml").write_text(SPEC)
    artifact = compile_artifact(directory, make_plan(load_spec(tmp_path / "spec.yaml"), profile),
                                tmp_path / "a", progress=False)
    weight_map = json.loads((artifact / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(directory / "model.safetensors"), "pt") as src:
        for key in ("vision.patch_embed.proj.weight", "projector.layers.0.weight", "image_newline"):
            with safe_open(str(artifact / weight_map[key]), "pt") as dst:
                assert torch.equal(src.get_tensor(key), dst.get_tensor(key))
    assert "language.model.layers.1.mlp.experts.0.gate_proj.weight" not in weight_map
    assert "language.model.layers.1.mlp.experts.0.gate_proj.weight_packed" in weight_map


def test_qwen3_vl_hub_layout_reads_transposed_experts(tiny_models):
    """Both orientations of the fused tensors give the same [out, in] expert matrices."""
    from mopeq.models import read_config, skeleton
    from mopeq.models.base import ExpertRef

    ref = ExpertRef(1, 2)
    mats = {}
    for family in ("qwen3_vl_moe", "qwen3_vl_moe_hub"):
        directory = tiny_models[family]
        adapter = skeleton(read_config(directory), directory)
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            mats[family] = {m: src.take(f.get_tensor(src.key)) for m, src in adapter.disk_tensors(ref, keys).items()}
    live = open_model(tiny_models["qwen3_vl_moe"]).adapter.expert_weights(ref)
    for m in ("gate", "up", "down"):
        assert torch.equal(mats["qwen3_vl_moe"][m], live[m]) and torch.equal(mats["qwen3_vl_moe_hub"][m], live[m])


def test_unsupported_architectures_are_named(tmp_path):
    """A dense model and an unknown model_type: one clear line each, no traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = tmp_path / "llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(dense)
    with pytest.raises(InputError, match="no MoE layers found.*gate_up_proj"):
        open_model(dense)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "my_private_moe"}))
    with pytest.raises(InputError, match="'my_private_moe' is not supported"):
        open_model(unknown)
