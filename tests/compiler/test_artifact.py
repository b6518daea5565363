"""The artifact: round trips through the runtime, GPTQ via the CLI, determinism, size, safety, vLLM rules."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from .compiler_helpers import make_plan
from mopeq.cli import main
from mopeq.compiler.artifact import compile_artifact, make_quantizer
from mopeq.compiler.gptq import GramFile, gptq_quantize
from mopeq.compiler.quantize import dequantize, packed_nbytes, quantize
from mopeq.models import open_model
from mopeq.models.base import MATRICES, ExpertRef
from mopeq.runtime.load import load
from mopeq.schemas import InputError, write_plan

MIXED = lambda ref: 4 if ref.shared else (2, 3, 4, 8)[(ref.layer + ref.expert) % 4]  # noqa: E731


def packed_of(qmodel, ref: ExpertRef):
    block = qmodel.adapter.moe_block(ref.layer)
    if ref.shared:
        return {m: getattr(block.shared_experts, f"{m}_proj").matrix for m in MATRICES}
    return block.experts.experts[ref.expert]


def assert_matches_quantizer(source, qmodel, plan, quantize_fn):
    """Every packed matrix dequantizes to exactly what the quantizer produced from the source weight."""
    for ref in source.adapter.experts():
        packed = packed_of(qmodel, ref)
        for m, w in source.adapter.expert_weights(ref).items():
            want = quantize_fn(ref, m, w.detach().float(), plan.experts[ref.id].bits)
            got = packed[m]
            assert torch.equal(got.dequantize(), dequantize(want)), (ref.id, m)
            assert torch.equal(got.scale, want.scale), (ref.id, m)


def rtn(plan, scale_dtype=torch.float16):
    """The compiler keeps a bf16/fp16 checkpoint's dtype for scales (fp16 otherwise)."""
    return lambda ref, m, w, bits: quantize(w, bits, plan.group_size, plan.symmetric, plan.clip_search, scale_dtype)


@pytest.mark.parametrize("symmetric,clip", [(False, True), (True, False)])
def test_demo_round_trip_mixed_bits(demo_dir, tmp_path, symmetric, clip):
    plan = make_plan(demo_dir, MIXED, group_size=32, symmetric=symmetric, clip_search=clip)
    out = compile_artifact(demo_dir, plan, tmp_path / "art", progress=False)
    qmodel = load(out)
    assert_matches_quantizer(open_model(demo_dir), qmodel, plan, rtn(plan))
    logits = qmodel.adapter.forward({"input_ids": torch.randint(0, 256, (1, 12))})
    assert torch.isfinite(logits).all()


def test_gptq_through_cli_matches_gptq_quantizer(demo_dir, tmp_path):
    plan = make_plan(demo_dir, 2, group_size=32)
    write_plan(plan, tmp_path / "plan.json")
    grams = tmp_path / "grams.safetensors"
    assert main(["compile", str(demo_dir), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "a"),
                 "--quantizer", "gptq", "--calib", "demo", "--grams", str(grams)]) == 0
    gf = GramFile(grams)
    manifest = json.loads((tmp_path / "a" / "mopeq.json").read_text())
    assert manifest["quantizer"]["method"] == "gptq" and manifest["quantizer"]["weighting"] == "routing"
    fn = lambda ref, m, w, bits: gptq_quantize(w, gf.gram(ref.id, m), bits, 32, False, False,  # noqa: E731
                                               gf.tokens.get(ref.id, 0))
    source = open_model(demo_dir)
    assert_matches_quantizer(source, load(tmp_path / "a"), plan, fn)
    # GPTQ really ran: at least one matrix differs from RTN.
    ref = ExpertRef(0, 0)
    w = source.adapter.expert_weights(ref)["gate"].detach().float()
    assert not torch.equal(fn(ref, "gate", w, 2).codes, quantize(w, 2, 32).codes)
    # Same inputs, same bytes.
    assert main(["compile", str(demo_dir), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "b"),
                 "--quantizer", "gptq", "--grams", str(grams)]) == 0
    assert_identical(tmp_path / "a", tmp_path / "b")


def assert_identical(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rtn_deterministic_and_overwrite(demo_dir, tmp_path):
    plan = make_plan(demo_dir, MIXED)
    compile_artifact(demo_dir, plan, tmp_path / "a", progress=False, max_shard_bytes=100_000)
    compile_artifact(demo_dir, plan, tmp_path / "b", progress=False, max_shard_bytes=100_000)
    assert len(list((tmp_path / "a").glob("model-*.safetensors"))) > 2
    assert_identical(tmp_path / "a", tmp_path / "b")
    with pytest.raises(InputError, match="already exists"):
        compile_artifact(demo_dir, plan, tmp_path / "a", progress=False)
    compile_artifact(demo_dir, make_plan(demo_dir, 8), tmp_path / "a", overwrite=True, progress=False)
    assert json.loads((tmp_path / "a" / "mopeq.json").read_text())["plan"]["experts"]["L0.E0"]["bits"] == 8
    assert not list(tmp_path.glob(".*"))  # no temp or moved-aside directories left


def test_size_equals_prediction_plus_metadata(demo_dir, tmp_path):
    plan = make_plan(demo_dir, MIXED, group_size=32)
    out = compile_artifact(demo_dir, plan, tmp_path / "art", progress=False)
    source = open_model(demo_dir)
    predicted = sum(packed_nbytes(*w.shape, plan.experts[r.id].bits, 32, False)
                    for r in source.adapter.experts() for w in source.adapter.expert_weights(r).values())
    expert_params = {id(p) for r in source.adapter.experts() for p in source.adapter.expert_parameters(r)}
    dense = sum(2 * p.numel() for p in source.model.parameters() if id(p) not in expert_params)
    tensor_bytes, on_disk, count = 0, 0, 0
    for shard in out.glob("model-*.safetensors"):
        on_disk += shard.stat().st_size
        with safe_open(str(shard), "pt") as f:
            tensor_bytes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
            count += len(f.keys())
    assert tensor_bytes == predicted + dense  # packed experts exactly as predicted, dense kept in fp16
    assert 0 < on_disk - tensor_bytes < 200 * count  # safetensors headers only: < 200 bytes per tensor


def test_corrupted_or_truncated_shard_is_named(demo_dir, tmp_path):
    out = compile_artifact(demo_dir, make_plan(demo_dir, 4), tmp_path / "art", progress=False)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{shard.name}.*checksum"):
        load(out)
    shard.write_bytes(bytes(data[: len(data) // 3]))  # the header check sees it first, before any checksum
    with pytest.raises(InputError, match=f"{shard.name}.*(checksum|truncated or corrupted)"):
        load(out)


def test_deepseek_checkpoint_round_trip(deepseek_dir, tmp_path):
    plan = make_plan(deepseek_dir, MIXED, group_size=64)
    out = compile_artifact(deepseek_dir, plan, tmp_path / "art", progress=False)
    assert (out / "tokenizer_config.json").is_file()
    qmodel = load(out)
    source = open_model(deepseek_dir)
    assert_matches_quantizer(source, qmodel, plan, rtn(plan, torch.bfloat16))
    with torch.no_grad():
        ids = torch.randint(0, 96, (1, 10))
        assert torch.isfinite(qmodel.model(input_ids=ids).logits).all()


KILL_SCRIPT = """
import sys, time
import mopeq.compiler.artifact as artifact
slow = artifact.quantize_job
artifact.quantize_job = lambda *a: (time.sleep(0.02), slow(*a))[1]  # widen the window, the real code still runs
from mopeq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_compile_leaves_nothing_and_rerun_succeeds(demo_dir, tmp_path):
    write_plan(make_plan(demo_dir, 3), tmp_path / "plan.json")
    out, partial = tmp_path / "art", tmp_path / ".art.partial"
    args = ["compile", str(demo_dir), "--plan", str(tmp_path / "plan.json"), "-o", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not partial.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert partial.is_dir(), "compile never created its temporary directory"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert main(args) == 0
    assert not partial.exists() and load(out).manifest["plan"]["experts"]["L0.E0"]["bits"] == 3


# --- target: vllm ---------------------------------------------------------------------------------
# Rules of stock vLLM's compressed-tensors fused-MoE loader (vllm/model_executor/layers/quantization/
# compressed_tensors/compressed_tensors_moe.py, CompressedTensorsMoEMethod.get_moe_method and
# CompressedTensorsWNA16MoEMethod, plus utils.find_matched_target), each checked below:
#  R1 gate/up/down of a layer's experts resolve to one identical scheme ("All MoE projections need to
#     have same quantization scheme"): one config group covers every expert matrix of a layer.
#  R2 _is_wNa16_group_channel: weights strategy "group" (or "channel"), dynamic false, no
#     input_activations.
#  R3 num_bits in WNA16_SUPPORTED_BITS = {4, 8} and format == "pack-quantized".
#  R4 WNA16MoEMethod asserts strategy == "group", actorder not "group", symmetric.
#  R5 weight_packed int32 [out, in // (32 // bits)] (pack factor along the input dim); weight_scale
#     [out, in // group_size] in the model's dtype -> in must divide by the group size.
#  R6 weight_shape present for every matrix (w13_weight_shape / w2_weight_shape parameters).
#  R7 find_matched_target: every Linear must match a target or the ignore list, else ValueError.
#  R8 no weight_zero_point (symmetric checkpoints carry none).


def vllm_plan(directory, bits=lambda ref: 4 if ref.layer == 0 else 8):
    return make_plan(directory, bits, group_size=128, symmetric=True, spec={"target": "vllm"})


def test_vllm_artifact_satisfies_loader_rules(deepseek_dir, tmp_path):
    out = compile_artifact(deepseek_dir, vllm_plan(deepseek_dir), tmp_path / "art", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    scheme_of = {t: g for g in qc["config_groups"].values() for t in g["targets"]}
    for layer in (0, 1):
        prefixes = [f"model.layers.{layer}.mlp.experts.{j}.{m}_proj" for j in range(4) for m in MATRICES]
        schemes = [json.dumps(scheme_of[p], sort_keys=True) for p in prefixes]
        assert len(set(schemes)) == 1  # R1 (same group object => same scheme)
        group = scheme_of[prefixes[0]]
        w = group["weights"]
        assert w["strategy"] == "group" and not w["dynamic"] and group["input_activations"] is None  # R2
        assert w["num_bits"] in (4, 8) and group["format"] == "pack-quantized"  # R3
        assert w["symmetric"] and w["actorder"] not in ("group", "dynamic") and w["group_size"] == 128  # R4
        for p in prefixes:
            out_dim, in_dim = tensors[f"{p}.weight_shape"].tolist()  # R6
            packed, scale = tensors[f"{p}.weight_packed"], tensors[f"{p}.weight_scale"]
            assert packed.dtype == torch.int32 and tuple(packed.shape) == (out_dim, in_dim // (32 // w["num_bits"]))
            assert in_dim % 128 == 0 and tuple(scale.shape) == (out_dim, in_dim // 128)  # R5
            assert scale.dtype == torch.bfloat16  # the checkpoint's dtype
            assert f"{p}.weight_zero_point" not in tensors  # R8
    quantized = set(scheme_of)
    for key in tensors:  # R7: every remaining 2-D weight (a Linear or embedding) is ignored
        if key.endswith(".weight") and tensors[key].dim() == 2:
            assert key[:-7] in qc["ignore"] and key[:-7] not in quantized
    assert load(out).manifest["plan"]["spec"]["target"] == "vllm"


@pytest.mark.parametrize("bad", ["mixed", "three", "asym"])
def test_vllm_plan_violations_refused(deepseek_dir, tmp_path, bad):
    if bad == "mixed":
        plan = vllm_plan(deepseek_dir, lambda ref: 4 if ref.expert % 2 else 8)
    elif bad == "three":
        plan = vllm_plan(deepseek_dir, lambda ref: 3)
    else:
        plan = vllm_plan(deepseek_dir).model_copy(update={"symmetric": False})
    with pytest.raises(InputError, match="target vllm"):
        compile_artifact(deepseek_dir, plan, tmp_path / "art", progress=False)
    assert not (tmp_path / "art").exists()


def test_vllm_refuses_input_dims_not_divisible_by_group(demo_dir, tmp_path):
    with pytest.raises(InputError, match="divisible by 128"):  # demo: hidden 64, intermediate 48
        compile_artifact(demo_dir, vllm_plan(demo_dir, lambda r: 4), tmp_path / "art", progress=False)


def test_gptq_needs_grams_and_checks_model(demo_dir, tmp_path):
    with pytest.raises(InputError, match="Gram file"):
        make_quantizer("gptq")
    with pytest.raises(InputError, match="quantizer"):
        make_quantizer("awq")
