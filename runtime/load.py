"""Load a compiled artifact and rebuild a runnable model whose experts stay packed.

``load(artifact_dir, device)`` verifies versions and shard checksums, builds the module tree from its
config with the parameters on meta (``mopeq.models.empty.empty_weights``), swaps every experts module for
``QuantizedExperts`` (and shared-expert projections for ``QuantizedLinear``) whose buffers are the packed
tensors themselves, and assigns the non-expert weights. Every tensor is read once from the mmapped
shards (``Shards``) onto the device, in its stored dtype, so memory stays near the artifact's size and
no step holds dense experts. The runtime imports neither the planner nor the profiler.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from ..compiler.pack import SUPPORTED_BITS, packed_words
from ..models import LoadedModel, adapter_class, read_config, skeleton
from ..models.base import MATRICES, ExpertRef
from ..models.checkpoint import DTYPES, check_state
from ..safety import check_safetensors, inside, read_json_object
from ..schemas import InputError, Plan, config_hash, sha256_file
from ..models.empty import empty_weights, meta_buffers
from .qlayer import PackedMatrix, QuantizedExperts, QuantizedLinear

MANIFEST = "mopeq.json"
ARTIFACT_VERSION = 1
PACKED_FIELDS = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")


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


def packed_matrix(tensors, name: str, bits: int, group_size: int,
                  expected: tuple[int, int] | None = None) -> PackedMatrix:
    """Pop ``name.weight_*`` from ``tensors`` (a dict or ``Shards``) into a checked ``PackedMatrix``; ``expected``:
    ``[out, in]`` from the config."""
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
    if not torch.isfinite(scale).all():
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


class Shards:
    """An artifact's tensors by name, each read when popped: a view into the mmapped shard on CPU, or copied
    straight onto ``device``. Headers are checked against the files first; shapes and dtypes come from them."""

    def __init__(self, paths: list[Path], device: torch.device):
        self.entries: dict[str, tuple[Path, dict]] = {}
        for path in paths:
            self.entries.update({name: (path, entry) for name, entry in check_safetensors(path).items()})
        self.device = device
        self._files: dict[Path, object] = {}

    def __iter__(self):
        return iter(list(self.entries))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def numel(self, name: str) -> int:
        return math.prod(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return DTYPES.get(self.entries[name][1]["dtype"])

    def pop(self, name: str, *default):
        if name not in self.entries and default:
            return default[0]
        path = self.entries.pop(name)[0]  # KeyError names the tensor, as a dict's pop does
        try:
            if path not in self._files:
                self._files[path] = safe_open(str(path), "pt", device=str(self.device))
            return self._files[path].get_tensor(name)
        except SafetensorError as exc:
            raise InputError(f"{path}: unreadable safetensors file ({exc})") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu`` or an available ``cuda[:N]``; anything else refused in one line."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device: got {device!r}, expected cpu or cuda[:N]") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'no GPU found' if torch.version.cuda else 'built without CUDA'})")
        if (device.index or 0) >= count:
            raise InputError(f"device {device}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise InputError(f"device: got {str(device)!r}, expected cpu or cuda[:N]")
    return device if device.type == "cuda" else torch.device("cpu")  # cpu:0 is cpu


def load(artifact_dir: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> QuantizedModel:
    """Rebuild the quantized model in about the artifact's memory. Example: ``qm = load("out/artifact")``.

    The module tree is built with its parameters on meta; each dense tensor is then read once from the shards
    onto ``device`` in its stored dtype (the dtype most dense values are stored in is the model's, as
    ``from_pretrained(dtype="auto")`` picks it; a family may fix it: ``MoEAdapter.runtime_dtype``), and packed
    experts become buffers directly.
    """
    directory = Path(artifact_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: artifact directory not found")
    device = resolve_device(device)
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
    shards = Shards(paths, device)
    dtype = adapter_class(config, directory).runtime_dtype or model_dtype(shards)
    adapter = skeleton(config, directory, dtype=dtype, init=empty_weights())
    _check_size(adapter, shards, directory)
    _check_buffers(adapter.model, config)
    bits = {eid: e["bits"] for eid, e in plan["experts"].items()}
    _swap_experts(adapter, shards, bits, plan["group_size"])
    _load_dense(adapter, {name: shards.pop(name) for name in shards}, directory, dtype)
    model = adapter.model.to(device).eval()  # moves what is still on CPU: the buffers built with the tree
    return QuantizedModel(model, adapter, config, plan["model_id"], directory, manifest)


def model_dtype(shards: Shards) -> torch.dtype:
    """The floating dtype most dense (not packed) values are stored in; float32 when there are none."""
    counts = Counter()
    for name in shards:
        dtype = shards.dtype(name)
        if not name.endswith(PACKED_FIELDS) and dtype is not None and dtype.is_floating_point:
            counts[dtype] += shards.numel(name)
    return counts.most_common(1)[0][0] if counts else torch.float32


def _check_size(adapter, shards: Shards, directory: Path) -> None:
    """Refuse a config.json that would build a model far larger than the shards (before anything is read)."""
    params = sum(p.numel() for p in adapter.model.parameters())
    values = sum(shards.numel(name) for name in shards)
    if params > 16 * values + 4096:  # packed int32 words hold at most 16 codes each
        raise InputError(f"{directory / 'config.json'}: describes {params} parameters, but the shards hold only "
                         f"{values} values")


def _check_buffers(model, config: dict) -> None:
    left = meta_buffers(model)
    if left:
        raise InputError(f"model_type {config['model_type']!r}: buffer {left[0]} is built by torch.empty/zeros/ones, "
                         f"which the runtime keeps on meta to build without the weights; it cannot be rebuilt")


def _swap_experts(adapter, tensors, bits: dict, group_size: int) -> None:
    """Replace every experts module (and shared-expert projection) with its packed tensors popped from ``tensors``."""
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


def _load_dense(adapter, tensors: dict, directory: Path, dtype: torch.dtype) -> None:
    """Assign the dense tensors to the (meta) parameters and buffers they feed, each cast only where the model
    holds it in another dtype (e.g. a float32 router, or transformers' keep-in-float32 modules)."""
    model = adapter.model
    tensors = adapter.memory_tensors(tensors)
    state = model.state_dict()  # expert buffers are non-persistent: only the dense weights are expected
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight: the embedding, not saved
    state = {k: v for k, v in state.items() if not (k in tied and k not in tensors)}
    check_state(state, tensors, str(directory), "artifact")
    fp32 = _keep_in_float32(model, dtype)
    wanted = {k: torch.float32 if fp32 and fp32.search(k) and v.is_floating_point() else state[k].dtype
              for k, v in tensors.items()}
    model.load_state_dict({k: v.to(wanted[k]) for k, v in tensors.items()}, strict=False, assign=True)
    for target, source in tied.items():  # assign replaced the source parameter: tie the target to it again
        if target not in tensors:
            owner, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left unloaded"


def _keep_in_float32(model, dtype: torch.dtype) -> re.Pattern | None:
    """transformers' keep-in-float32 names for a model loaded in ``dtype`` (``from_pretrained``'s dtype plan)."""
    names = set()
    for module in model.modules():
        plan = getattr(module, "_get_dtype_plan", None)
        if plan is not None:
            names.update(plan(dtype))
    return re.compile("|".join(rf"(^|\.){re.escape(n)}($|\.)" for n in sorted(names))) if names else None
