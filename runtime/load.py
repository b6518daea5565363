"""Load a compiled artifact and rebuild a runnable model whose experts stay packed.

``load(artifact_dir, device)`` verifies versions and shard checksums, builds the model from its
config, loads the non-expert weights, and swaps every experts module for ``QuantizedExperts`` (and
shared-expert projections for ``QuantizedLinear``). The runtime imports neither the planner nor the
profiler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from ..compiler.pack import SUPPORTED_BITS, packed_words
from ..models import LoadedModel, read_config, skeleton
from ..models.base import MATRICES, ExpertRef
from ..models.checkpoint import check_state
from ..safety import check_safetensors, inside, read_json_object
from ..schemas import InputError, Plan, config_hash, sha256_file
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
    manifest = read_json_object(path, "manifest")
    if manifest.get("version") != ARTIFACT_VERSION:
        raise InputError(f"{path}: artifact version {manifest.get('version')!r}, expected {ARTIFACT_VERSION}")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
        raise InputError(f"{path}: 'shards' must be an object of shard file -> sha256")
    try:
        Plan(**manifest["plan"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise InputError(f"{path}: 'plan' is not a mopeq plan ({_first_line(exc)})") from None
    return manifest


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def verify_shards(directory: Path, manifest: dict) -> list[Path]:
    """Check every shard's sha256 against the manifest; return the shard paths."""
    paths = []
    for name, digest in sorted(manifest.get("shards", {}).items()):
        path = inside(directory, name, directory / MANIFEST)
        if not path.is_file():
            raise InputError(f"{directory / name}: shard missing")
        if sha256_file(path) != digest:
            raise InputError(f"{path}: checksum mismatch (corrupted or truncated shard)")
        paths.append(path)
    if not paths:
        raise InputError(f"{directory / MANIFEST}: lists no shards")
    return paths


def read_tensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in paths:
        check_safetensors(path)  # sizes checked against the file before any data is read
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as exc:
            raise InputError(f"{path}: unreadable safetensors file ({exc})") from None
    return tensors


def packed_matrix(tensors: dict, name: str, bits: int, group_size: int,
                  expected: tuple[int, int] | None = None) -> PackedMatrix:
    """Collect ``name.weight_*`` tensors into a checked ``PackedMatrix``; ``expected``: ``[out, in]`` from the config."""
    try:
        packed, scale = tensors.pop(f"{name}.weight_packed"), tensors.pop(f"{name}.weight_scale")
        shape_tensor = tensors.pop(f"{name}.weight_shape")
    except KeyError as exc:
        raise InputError(f"artifact: tensor {exc.args[0]} missing") from None
    zero = tensors.pop(f"{name}.weight_zero_point", None)
    if bits not in SUPPORTED_BITS:
        raise InputError(f"artifact: {name} has bits {bits}, expected one of {SUPPORTED_BITS}")
    shape = _weight_shape(name, shape_tensor, expected)
    _check_dtypes(name, packed, scale, zero)
    n, k = shape
    groups = -(-k // min(group_size, k))
    if packed.shape != (n, packed_words(k, bits)) or scale.shape != (n, groups) or \
            (zero is not None and zero.shape != (n, groups)):
        raise InputError(f"artifact: {name}.weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} "
                         f"disagree with weight_shape {shape} at {bits} bits, group {group_size}")
    if not torch.isfinite(scale.float()).all():
        raise InputError(f"artifact: {name}.weight_scale has NaN or inf values")
    return PackedMatrix(packed, scale, zero, bits, min(group_size, k), shape)


def _weight_shape(name: str, shape_tensor: torch.Tensor, expected) -> tuple[int, int]:
    shape = tuple(int(x) for x in shape_tensor.flatten().tolist()) if not shape_tensor.is_floating_point() else ()
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"artifact: {name}.weight_shape is {shape_tensor.tolist()}, expected two positive integers")
    if expected is not None and shape != tuple(expected):
        raise InputError(f"artifact: {name}.weight_shape {shape} disagrees with config.json, which gives {tuple(expected)}")
    return shape


def _check_dtypes(name: str, packed, scale, zero) -> None:
    if packed.dtype != torch.int32:
        raise InputError(f"artifact: {name}.weight_packed is {packed.dtype}, expected torch.int32")
    if not scale.is_floating_point():
        raise InputError(f"artifact: {name}.weight_scale is {scale.dtype}, expected a floating-point type")
    if zero is not None and zero.dtype != torch.uint8:
        raise InputError(f"artifact: {name}.weight_zero_point is {zero.dtype}, expected torch.uint8")


def load(artifact_dir: str | Path, device: str = "cpu", verify: bool = True) -> QuantizedModel:
    """Rebuild the quantized model. Example: ``qm = load("out/artifact"); qm.model(...)``."""
    directory = Path(artifact_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: artifact directory not found")
    manifest = read_manifest(directory)
    config = read_config(directory)  # JSON object with model_type and sane size fields
    plan = manifest["plan"]
    if verify and config_hash(config) != manifest.get("config_hash"):
        raise InputError(f"{directory / 'config.json'}: does not match {MANIFEST} (config hash "
                         f"{config_hash(config)}, manifest has {manifest.get('config_hash')}); edited or corrupted")
    if plan["group_size"] < 1:
        raise InputError(f"{directory / MANIFEST}: plan.group_size {plan['group_size']}, expected a positive integer")
    paths = verify_shards(directory, manifest) if verify else \
        [inside(directory, n, directory / MANIFEST) for n in sorted(manifest["shards"])]
    tensors = read_tensors(paths)
    _check_size(skeleton(config, directory, device="meta"), tensors, directory)
    adapter = skeleton(config, directory, device="cpu")
    bits = {eid: e["bits"] for eid, e in plan["experts"].items()}
    _swap_experts(adapter, tensors, bits, plan["group_size"])
    _load_dense(adapter.model, adapter.memory_tensors(tensors), directory)
    model = adapter.model.to(device).eval()
    return QuantizedModel(model, adapter, config, plan["model_id"], directory, manifest)


def _check_size(meta_adapter, tensors: dict, directory: Path) -> None:
    """Refuse a config.json that would build a model far larger than the shards (before allocating it)."""
    params = sum(p.numel() for p in meta_adapter.model.parameters())
    values = sum(t.numel() for t in tensors.values())
    if params > 16 * values + 4096:  # packed int32 words hold at most 16 codes each
        raise InputError(f"{directory / 'config.json'}: describes {params} parameters, but the shards hold only "
                         f"{values} values")


def _swap_experts(adapter, tensors: dict, bits: dict, group_size: int) -> None:
    for layer in adapter.moe_layers():
        experts_module = adapter.experts_module(layer)
        routed = []
        for j in range(adapter.num_experts(layer)):
            ref = ExpertRef(layer, j)
            if ref.id not in bits:
                raise InputError(f"artifact: expert {ref.id} missing from the plan")
            shapes = {m: tuple(w.shape) for m, w in adapter.expert_weights(ref).items()}
            routed.append({m: packed_matrix(tensors, adapter.packed_name(ref, m), bits[ref.id], group_size, shapes[m])
                           for m in MATRICES})
        setattr(adapter.moe_block(layer), adapter.experts_attr, QuantizedExperts(routed, experts_module.act_fn))
        shared = adapter.shared_module(layer)
        ref = ExpertRef(layer, 0, shared=True)
        if shared is not None and ref.id in bits:
            shapes = {m: tuple(w.shape) for m, w in adapter.expert_weights(ref).items()}
            for m in MATRICES:
                matrix = packed_matrix(tensors, adapter.packed_name(ref, m), bits[ref.id], group_size, shapes[m])
                setattr(shared, f"{m}_proj", QuantizedLinear(matrix))


def _load_dense(model, tensors: dict, directory: Path) -> None:
    state = model.state_dict()  # expert buffers are non-persistent: only the dense weights are expected
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight: the embedding, not saved
    state = {k: v for k, v in state.items() if not (k in tied and k not in tensors)}
    check_state(state, tensors, str(directory), "artifact")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
