"""The runtime loads an artifact in about the artifact's memory: no dense experts, dense weights once, stored dtype.

Every CPU storage an op creates during ``load()`` is recorded (``Allocations``, a ``TorchDispatchMode``);
the tensors read from the shards are views into their mmaps and create none. The loader before issue 16
is frozen below (``previous_load``): the recorder must see its dense experts (so the check can fail), and
its logits are the reference for the new loader's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..compiler.compiler_helpers import make_plan
from mopeq.compiler.artifact import compile_artifact
from mopeq.models import read_config, skeleton
from mopeq.runtime.load import _swap_experts, load, read_manifest
from mopeq.runtime.qlayer import QuantizedExperts, QuantizedLinear

# DeepSeek-V2 layout (MLA, a shared expert, first layer dense) with experts much larger than any other tensor.
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=2, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MIXED = lambda ref: 4 if ref.shared else (2, 3, 4, 8)[(ref.layer + ref.expert) % 4]  # noqa: E731


@pytest.fixture(scope="module")
def bf16_artifact(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny bf16 checkpoint (per-expert tensors on disk, as DeepSeek-V2 ships) and its mixed-bit artifact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v2", **CONFIG), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if name.endswith("mlp.gate.weight") else 0.1)  # routers at zero route nothing real
    model.save_pretrained(root / "model")
    artifact = compile_artifact(root / "model", make_plan(root / "model", MIXED, group_size=32), root / "artifact",
                                progress=False)
    return root / "model", artifact


def previous_load(artifact: Path):
    """The loader before issue 16 (frozen): every tensor read, the dense model built on CPU in the config's dtype
    (dense experts included), then the experts swapped for packed ones and the dense weights copied in."""
    manifest, config = read_manifest(artifact), read_config(artifact)
    tensors = {}
    for path in sorted(artifact.glob("model-*.safetensors")):
        tensors.update(load_file(str(path)))
    adapter = skeleton(config, artifact, device="cpu")
    _swap_experts(adapter, tensors, {k: e["bits"] for k, e in manifest["plan"]["experts"].items()},
                  manifest["plan"]["group_size"])
    state = adapter.model.state_dict()
    adapter.model.load_state_dict({k: v.to(state[k].dtype) for k, v in adapter.memory_tensors(tensors).items()},
                                  strict=False)
    return adapter.model.eval()


class Allocations(TorchDispatchMode):
    """Bytes of every new CPU storage an op returns (views of an input's storage are not new), in order."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in known:
                known.add(t.untyped_storage().data_ptr())
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def cpu_allocations(run) -> list[int]:
    with Allocations() as recorder:
        run()
    return recorder.sizes


def mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose memory mapping holds ``tensor``'s data (Linux ``/proc/self/maps``), None for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return Path(rest[4]) if len(rest) == 5 and rest[4].startswith("/") else None
    return None


def test_load_never_allocates_dense_experts(bf16_artifact):
    _, artifact = bf16_artifact
    artifact_bytes = sum(p.stat().st_size for p in artifact.glob("model-*.safetensors"))
    c = CONFIG
    one_matrix = c["moe_intermediate_size"] * c["hidden_size"] * 2  # one expert's gate (or up, or down), bf16
    one_layer = 3 * c["n_routed_experts"] * one_matrix
    load(artifact)  # imports and lazy initialisation first

    new = cpu_allocations(lambda: load(artifact))
    assert max(new) < one_matrix, max(new)  # not one dense expert matrix, let alone a layer's fused experts
    assert sum(new) < 0.5 * artifact_bytes, sum(new)  # checks on the scales; the tensors themselves are mmapped

    old = cpu_allocations(lambda: previous_load(artifact))  # the recorder does see dense experts
    assert max(old) >= one_layer / 3 and sum(old) > 2 * artifact_bytes


def test_bf16_artifact_runs_in_bf16_like_the_previous_loader(bf16_artifact):
    from transformers import AutoModelForCausalLM

    model_dir, artifact = bf16_artifact
    quantized = load(artifact)
    dtypes = {k: v.dtype for k, v in quantized.model.state_dict().items()}
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").state_dict()
    assert dtypes == {k: reference[k].dtype for k in dtypes}  # as from_pretrained(dtype="auto") loads them
    assert {str(v) for v in dtypes.values()} == {"torch.bfloat16", "torch.float32"}  # float32: the routers
    assert all(v == torch.bfloat16 for k, v in dtypes.items() if not k.endswith("mlp.gate.weight"))
    weight_map = json.loads((artifact / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # read in place from the mmapped shard: no copy
        if Path("/proc/self/maps").exists():
            assert mapped_file(quantized.model.get_parameter(name)) == artifact / weight_map[name]

    seen = set()
    for module in quantized.model.modules():
        if isinstance(module, (QuantizedExperts, QuantizedLinear)):
            module.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new = quantized.model(ids, use_cache=False).logits
        old = previous_load(artifact)(ids, use_cache=False).logits
    assert seen == {torch.bfloat16} and new.dtype == torch.bfloat16
    torch.testing.assert_close(new, old, rtol=0, atol=0)
