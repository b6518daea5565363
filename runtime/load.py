"""Load a compiled artifact and rebuild a runnable model whose experts stay packed.

``load(artifact_dir, device)`` verifies versions and shard checksums, builds the model from its
config, loads the non-expert weights, and swaps every experts module for ``QuantizedExperts`` (and
shared-expert projections for ``QuantizedLinear``). The runtime imports neither the planner nor the
profiler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..compiler.pack import SUPPORTED_BITS, packed_words
from ..models import LoadedModel, skeleton
from ..models.base import MATRICES, ExpertRef
from ..schemas import InputError, sha256_file
from .qlayer import PackedMatrix, QuantizedExperts, QuantizedLinear

MANIFEST = "mopeq.json"
ARTIFACT_VERSION = 1


@dataclass
class QuantizedModel(LoadedModel):
    manifest: dict = None

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.model.buffers())


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: not a mopeq artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != ARTIFACT_VERSION:
        raise InputError(f"{path}: artifact version {manifest.get('version') if isinstance(manifest, dict) else '?'}, "
                         f"expected {ARTIFACT_VERSION}")
    return manifest


def verify_shards(directory: Path, manifest: dict) -> list[Path]:
    """Check every shard's sha256 against the manifest; return the shard paths."""
    paths = []
    for name, digest in sorted(manifest.get("shards", {}).items()):
        path = (directory / name).resolve()
        if directory.resolve() not in path.parents or not path.is_file():
            raise InputError(f"{directory / name}: shard missing or outside the artifact")
        if sha256_file(path) != digest:
            raise InputError(f"{path}: checksum mismatch (corrupted or truncated shard)")
        paths.append(path)
    if not paths:
        raise InputError(f"{directory / MANIFEST}: lists no shards")
    return paths


def read_tensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in paths:
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise InputError(f"{path}: unreadable safetensors file ({exc})") from None
    return tensors


def packed_matrix(tensors: dict, name: str, bits: int, group_size: int) -> PackedMatrix:
    """Collect ``name.weight_*`` tensors into a checked ``PackedMatrix``."""
    try:
        packed, scale = tensors.pop(f"{name}.weight_packed"), tensors.pop(f"{name}.weight_scale")
        shape = tuple(int(x) for x in tensors.pop(f"{name}.weight_shape").tolist())
    except KeyError as exc:
        raise InputError(f"artifact: tensor {exc.args[0]} missing") from None
    zero = tensors.pop(f"{name}.weight_zero_point", None)
    if bits not in SUPPORTED_BITS:
        raise InputError(f"artifact: {name} has bits {bits}, expected one of {SUPPORTED_BITS}")
    n, k = shape
    groups = -(-k // min(group_size, k))
    if packed.shape != (n, packed_words(k, bits)) or scale.shape != (n, groups):
        raise InputError(f"artifact: {name}.weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} "
                         f"disagree with weight_shape {shape} at {bits} bits, group {group_size}")
    if not torch.isfinite(scale.float()).all():
        raise InputError(f"artifact: {name}.weight_scale has NaN or inf values")
    return PackedMatrix(packed, scale, zero, bits, min(group_size, k), shape)


def load(artifact_dir: str | Path, device: str = "cpu", verify: bool = True) -> QuantizedModel:
    """Rebuild the quantized model. Example: ``qm = load("out/artifact"); qm.model(...)``."""
    directory = Path(artifact_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: artifact directory not found")
    manifest = read_manifest(directory)
    config = json.loads((directory / "config.json").read_text())
    plan = manifest["plan"]
    paths = verify_shards(directory, manifest) if verify else \
        [directory / n for n in sorted(manifest["shards"])]
    tensors = read_tensors(paths)
    adapter = skeleton(config, directory, device="cpu")
    bits = {eid: e["bits"] for eid, e in plan["experts"].items()}
    _swap_experts(adapter, tensors, bits, plan["group_size"])
    _load_dense(adapter.model, adapter.memory_tensors(tensors), directory)
    model = adapter.model.to(device).eval()
    return QuantizedModel(model, adapter, config, plan["model_id"], directory, manifest)


def _swap_experts(adapter, tensors: dict, bits: dict, group_size: int) -> None:
    for layer in adapter.moe_layers():
        experts_module = adapter.experts_module(layer)
        routed = []
        for j in range(adapter.num_experts(layer)):
            ref = ExpertRef(layer, j)
            if ref.id not in bits:
                raise InputError(f"artifact: expert {ref.id} missing from the plan")
            routed.append({m: packed_matrix(tensors, adapter.packed_name(ref, m), bits[ref.id], group_size)
                           for m in MATRICES})
        setattr(adapter.moe_block(layer), adapter.experts_attr, QuantizedExperts(routed, experts_module.act_fn))
        shared = adapter.shared_module(layer)
        ref = ExpertRef(layer, 0, shared=True)
        if shared is not None and ref.id in bits:
            for m in MATRICES:
                matrix = packed_matrix(tensors, adapter.packed_name(ref, m), bits[ref.id], group_size)
                setattr(shared, f"{m}_proj", QuantizedLinear(matrix))


def _load_dense(model, tensors: dict, directory: Path) -> None:
    state = model.state_dict()
    unknown = [k for k in tensors if k not in state]
    if unknown:
        raise InputError(f"{directory}: tensor {unknown[0]} does not belong to this model")
    missing = [k for k in state if k not in tensors]
    if missing:
        raise InputError(f"{directory}: tensor {missing[0]} missing from the artifact")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise InputError(f"{directory}: tensor {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(state[key].shape)}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
