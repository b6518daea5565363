"""Every advertised family from its real published config.json (shrunk only in sizes): profile in memory
and layer-streamed (equal, loss curvature included), plan, compile, load the artifact, and 8-bit logits
>= 25 dB SNR."""

from __future__ import annotations

import json

import pytest
import torch

from mopeq.models import open_model, read_config
from mopeq.models.base import ExpertRef
from mopeq.profiler.calibration import summary
from mopeq.profiler.curvature import SOURCES
from mopeq.profiler.profile import profile_model
from mopeq.profiler.stream import LayerStreamer, profile_streamed
from mopeq.profiler.streamed_experts import StreamedExperts
from mopeq.schemas import InputError

from .published import FILES, build, published, shrink
from .test_families import SPEC, compile_8bit_and_compare

# name -> the adapter family it must open as
FAMILY = {"deepseek-vl2-tiny": "deepseek_vl_v2", "deepseek-vl2-small": "deepseek_vl_v2", "deepseek-vl2": "deepseek_vl_v2",
          "molmoe-1b": "molmo", "mixtral-8x7b": "mixtral", "qwen1.5-moe-a2.7b": "qwen2_moe",
          "qwen3-30b-a3b": "qwen3_moe", "olmoe-1b-7b": "olmoe", "deepseek-v2-lite": "deepseek_v2",
          "deepseek-v3": "deepseek_v2", "qwen3-vl-30b-a3b": "qwen3_vl_moe", "granite-3.0-1b-a400m": "granitemoe",
          "ernie-4.5-21b-a3b": "ernie4_5_moe", "phi-3.5-moe": "phimoe"}


def batches(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 40, (1, 12), generator=gen), "modality": "text"} for _ in range(2)]


def test_every_family_has_a_published_config():
    assert set(FILES) == set(FAMILY)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_published_config_chain(name, tmp_path):
    directory = build(name, tmp_path / "model")
    loaded = open_model(directory)
    calib = batches()
    info = summary(calib, "random")
    curvature = dict(curvature=SOURCES, probes=2, tolerance=0.0)
    profile = profile_model(loaded, calib, info, bits=(8,), group_size=16, progress=False, **curvature)
    assert profile.meta.family == FAMILY[name]
    routed = [e for e in profile.experts if not e.shared]
    assert routed and sum(e.tokens for e in routed) > 0
    streamed, _ = profile_streamed(directory, calib, info, bits=(8,), group_size=16, **curvature)
    streamer = LayerStreamer(directory)  # routed experts stay as stored, one expert upcast at a time
    layer = streamer.adapter.moe_layers()[-1]
    gate = streamer.adapter.disk_tensors(ExpertRef(layer, 0), streamer.reader.keys)["gate"]
    streamer.load_layer(layer)
    experts = streamer.adapter.experts_module(layer)
    assert isinstance(experts, StreamedExperts)
    assert {p.dtype for p in experts.parameters()} == {streamer.reader.read(gate.key).dtype}  # no float32 copy
    assert [(e.id, e.tokens) for e in streamed.experts] == [(e.id, e.tokens) for e in profile.experts]
    assert streamed.meta.calibration["loss"] == pytest.approx(profile.meta.calibration["loss"], rel=1e-5)
    for a, b in zip(profile.experts, streamed.experts):
        assert b.perturbation["8"] == pytest.approx(a.perturbation["8"], rel=1e-5)
        for source in SOURCES:  # float32 routers: Hessian samples agree to ~1e-6 of their scale
            assert b.trace[source].mean == pytest.approx(a.trace[source].mean, rel=1e-3, abs=1e-6), source

    compile_8bit_and_compare(loaded, profile, batches(seed=1)[0]["input_ids"], tmp_path,
                             SPEC.replace("group_size: 32", "group_size: 16"))


def test_shrink_keeps_every_published_key():
    """Only sizes change (and a layer count where the partial published text has none)."""
    for name in FAMILY:
        config = published(name)
        tiny = shrink(config)
        assert set(tiny) - set(config) <= {"num_hidden_layers"} and set(config) <= set(tiny)
        for key in ("model_type", "architectures", "use_mla", "topk_method", "scoring_func", "rope_scaling",
                    "tie_word_embeddings", "norm_topk_prob", "attention_bias", "sliding_window", "quantization_config"):
            if key in config and key != "rope_scaling":
                assert tiny[key] == config[key], (name, key)


def test_vl2_tiny_published_nulls_accepted_and_refused_with_mla(tmp_path):
    """use_mla false makes kv_lora_rank null legal; the same null with MLA is refused in one line."""
    config = published("deepseek-vl2-tiny")
    assert config["language_config"]["kv_lora_rank"] is None and config["language_config"]["use_mla"] is False
    (tmp_path / "config.json").write_text(json.dumps(config))
    read_config(tmp_path)
    config["language_config"]["use_mla"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"language_config.kv_lora_rank is None.*only with language_config.use_mla false"):
        read_config(tmp_path)


def test_sharded_index_without_metadata_loads(tmp_path):
    """An index with only a weight_map (no "metadata") opens like any other checkpoint."""
    directory = build("mixtral-8x7b", tmp_path / "m")
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(directory / shard), metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert open_model(directory).adapter.family == "mixtral"


def test_config_that_does_not_match_the_checkpoint_is_refused(tmp_path):
    """Extra layers in config.json would be initialised at random: refused, naming the tensors."""
    directory = build("olmoe-1b-7b", tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"missing from the checkpoint \(it would be initialised at random\): "
                                         r"model\.layers\.2\."):
        open_model(directory)


# Total parameters the model cards publish (rounded as published), for `mopeq estimate` from the shipped configs.
PUBLISHED_TOTALS = {"deepseek-vl2-tiny": 3.37e9, "deepseek-vl2-small": 16.1e9, "deepseek-vl2": 27.5e9,
                    "molmoe-1b": 7.2e9, "mixtral-8x7b": 46.7e9, "qwen1.5-moe-a2.7b": 14.3e9, "qwen3-30b-a3b": 30.5e9,
                    "olmoe-1b-7b": 6.9e9, "deepseek-v2-lite": 15.7e9, "deepseek-v3": 671e9,
                    "qwen3-vl-30b-a3b": 31.1e9, "granite-3.0-1b-a400m": 1.33e9, "ernie-4.5-21b-a3b": 21e9,
                    "phi-3.5-moe": 41.9e9}


def test_estimate_every_shipped_config_matches_the_published_size():
    """`mopeq estimate` counts on the family's meta-device module tree: within 5 % of every model card
    (Ernie's card rounds 21.8 B to 21 B)."""
    from mopeq.estimate import moe_shape, read_named_config

    assert set(PUBLISHED_TOTALS) == set(FAMILY)
    for name, total in PUBLISHED_TOTALS.items():
        _, config, where = read_named_config(name)
        shape = moe_shape(config, where)
        params = shape.non_expert_params + sum(n * k for s in shape.matrices.values() for n, k in s.values())
        assert abs(params - total) / total < 0.05, (name, params)


def test_estimate_a_local_model_directory_counts_its_module_tree(tmp_path):
    """For a model directory the estimate's expert and total sizes are the loaded model's."""
    from mopeq.estimate import estimate

    directory = build("qwen1.5-moe-a2.7b", tmp_path / "m")
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nbits: [2, 4]\ngroup_size: 16\nbudget: {avg_bits: 3.0}\nscope: global\n"
                    "sensitivity: hessian-local\n")
    result = estimate(str(directory), spec)
    loaded = open_model(directory)
    experts = sum(w.numel() for r in loaded.adapter.experts() for w in loaded.adapter.expert_weights(r).values())
    total = sum(p.numel() for p in loaded.model.parameters())
    assert result["experts_bf16_gb"] == pytest.approx(2 * experts / 1e9)
    assert result["total_bf16_gb"] == pytest.approx(2 * total / 1e9)
    assert (result["moe_layers"], result["experts_per_layer"], result["top_k"]) == (2, 16, 4)


def test_estimated_memory_equals_what_max_memory_plans_with(tmp_path):
    """`mopeq estimate`'s per-step memory (from the meta module tree) is what `--max-memory` computes from the
    checkpoint's headers, for the same calibration size; run needs the planned artifact."""
    from mopeq.estimate import estimate
    from mopeq.safety import profile_memory, streamed_curvature_needs

    directory = build("mixtral-8x7b", tmp_path / "m")
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nbits: [2, 4]\ngroup_size: 16\nbudget: {avg_bits: 3.0}\nscope: global\n"
                    "sensitivity: hessian-local\n")
    result = estimate(str(directory), spec, calib_tokens=6 * 64, batch_tokens=64)
    batches = [{"input_ids": torch.zeros(1, 64, dtype=torch.long)} for _ in range(6)]
    plain, full = profile_memory(directory, batches, False), profile_memory(directory, batches, True)
    memory = result["memory_gb"]
    assert memory["profile_in_memory"] == pytest.approx(plain["in_memory"] / 1e9)
    assert memory["profile_in_memory_curvature"] == pytest.approx(full["in_memory"] / 1e9)
    assert memory["profile_streamed"] == pytest.approx(plain["streamed"] / 1e9)
    assert memory["run"] == pytest.approx(result["total_planned_gb"])
    assert memory["profile_streamed_curvature_disk"] < memory["profile_streamed_curvature"]
    for source in ("fisher", "gauss-newton", "hessian"):  # per source, by the rule --max-memory plans with
        ram, disk = streamed_curvature_needs(plain, [source], 8)
        key = "profile_streamed_" + source.replace("-", "_")
        assert (memory[key], memory[key + "_disk"]) == pytest.approx((ram / 1e9, disk / 1e9)) and disk < ram
    assert memory["profile_streamed_fisher"] < memory["profile_streamed_gauss_newton"] < memory["profile_streamed_hessian"]


def test_quantized_source_is_refused(tmp_path):
    """DeepSeek-V3 as published (fp8 weights, quantization_config): one line, not a half-read checkpoint."""
    directory = build("deepseek-v3", tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = published("deepseek-v3")["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"quant_method 'fp8': mopeq quantizes unquantized checkpoints"):
        open_model(directory)
