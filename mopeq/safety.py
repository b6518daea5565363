"""Validation of files from strangers: paths that must stay inside a directory, safetensors headers,
shard indexes and JSON files. Every refusal is an ``InputError`` naming the file (and tensor).

mopeq reads only JSON, YAML (safe loader) and safetensors; nothing here executes what it reads.
Headers are checked against the file size *before* any tensor data is read, so a file that claims a
terabyte tensor is refused in microseconds instead of exhausting memory.

Example::

    header = check_safetensors(Path("model.safetensors"))   # {name: {"dtype", "shape", "data_offsets"}}
    shards = index_shards(Path("ckpt"))                     # {tensor name: shard path inside ckpt}
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from .schemas import InputError

MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses headers over 100 MB as well
MAX_JSON_BYTES = 256 << 20
INDEX = "model.safetensors.index.json"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def inside(directory: Path, name: Any, where: Path) -> Path:
    """``directory / name`` if it stays inside ``directory`` (after following symlinks); else refuse.

    ``where`` is the file that named it (an index or manifest), for the message.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{where}: shard name {name!r} is not a file name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise InputError(f"{where}: shard {name!r} points outside {directory}")
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise InputError(f"{where}: shard {name!r} points outside {directory} (symlink)")
    return path


def read_json(path: Path, what: str = "JSON") -> Any:
    """Parse a JSON file, refusing missing, oversized, non-UTF-8 and malformed files in one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {path.stat().st_size} bytes, more than a {what} file can be "
                         f"({MAX_JSON_BYTES} bytes)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:200]})") from None


def read_json_object(path: Path, what: str = "JSON") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def index_shards(directory: Path, index: Path | None = None) -> dict[str, Path]:
    """tensor name -> shard path from ``model.safetensors.index.json``, every shard checked to exist inside."""
    index = index or directory / INDEX
    weight_map = read_json_object(index, "index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: 'weight_map' must be an object of tensor name -> shard file")
    out, seen = {}, {}
    for key, name in weight_map.items():
        if name not in seen:
            seen[name] = inside(directory, name, index)
            if not seen[name].is_file():
                raise InputError(f"{index}: shard {name!r} (tensor {key}) not found")
        out[key] = seen[name]
    return out


def checkpoint_shards(directory: Path) -> dict[str, Path]:
    """tensor name -> shard of a checkpoint: the index if present, else ``model.safetensors``; headers checked."""
    if (directory / INDEX).is_file():
        shards = index_shards(directory)
        for path in sorted(set(shards.values())):
            check_safetensors(path)
        return shards
    single = directory / "model.safetensors"
    if not single.is_file():
        raise InputError(f"{directory}: no model.safetensors or {INDEX}")
    return {k: single for k in check_safetensors(single)}


def check_safetensors(path: Path) -> dict[str, dict]:
    """Validate a safetensors header against the file size; return ``{tensor: entry}`` (no metadata).

    Refuses: a header length beyond the file or over 100 MB, a header that is not a JSON object,
    entries without a known dtype, a valid shape or in-file ``data_offsets`` of the right length.
    """
    path = Path(path)
    size = _file_size(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path}: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise InputError(f"{path}: safetensors header claims {length} bytes, file has {size - 8} after the prefix")
        raw = f.read(length)
    header = _parse_header(path, raw)
    data_bytes = size - 8 - length
    return {name: _check_entry(path, name, entry, data_bytes) for name, entry in header.items()
            if name != "__metadata__"}


def _file_size(path: Path) -> int:
    if not path.is_file():
        raise InputError(f"{path}: safetensors file not found")
    return path.stat().st_size


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{path}: safetensors header is not valid UTF-8 JSON (corrupted file)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    return header


def _check_entry(path: Path, name: str, entry: Any, data_bytes: int) -> dict:
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise InputError(f"{where}: header entry needs dtype, shape and data_offsets")
    shape, offsets, dtype = entry["shape"], entry["data_offsets"], entry["dtype"]
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_bytes):
        raise InputError(f"{where}: data_offsets {offsets!r} lie outside the file's {data_bytes} data bytes "
                         "(truncated or corrupted)")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise InputError(f"{where}: dtype {dtype!r} is not one mopeq reads ({', '.join(DTYPE_BYTES)})")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise InputError(f"{where}: {offsets[1] - offsets[0]} bytes on disk, shape {shape} of {dtype} "
                         f"needs {expected}")
    return entry


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- memory a profile needs ------------------------------------------------------------------------------

def profile_memory(directory: Path, batches: list[dict], whole_model: bool) -> dict[str, int]:
    """Estimated peak bytes of ``mopeq profile`` on ``directory``, from safetensors headers only (nothing loaded);
    see ``memory_needs``."""
    import re

    entries = {k: e for p in sorted(set(checkpoint_shards(directory).values())) for k, e in check_safetensors(p).items()}
    numel = {k: math.prod(e["shape"]) for k, e in entries.items()}
    per_layer: dict[str, int] = {}
    experts: dict[str, int] = {}
    dtypes = set()
    for key, count in numel.items():
        if (m := re.search(r"\.layers\.(\d+)\.", key)):
            per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + count
            if re.search(r"\.experts\.", key):  # routed experts (not shared_experts), fused or one per expert
                experts[m.group(1)] = experts.get(m.group(1), 0) + count
                dtypes.add(entries[key]["dtype"])
    vocab, hidden = _embedding_shape(directory)
    batch_tokens = max((int(b["input_ids"].numel()) for b in batches), default=0)
    all_tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return memory_needs(list(per_layer.values()), sum(numel.values()), vocab, hidden, batch_tokens, all_tokens,
                        whole_model, [experts.get(k, 0) for k in per_layer],
                        max((DTYPE_BYTES.get(d, 4) for d in dtypes), default=2))


def memory_needs(layer_params: list[int], total_params: int, vocab: int, hidden: int, batch_tokens: int,
                 all_tokens: int, whole_model: bool, layer_expert_params: list[int] | None = None,
                 expert_bytes: int = 2) -> dict[str, int]:
    """Estimated peak bytes of a profile (float32 weights), from parameter counts per decoder layer.

    ``in_memory``: weights + activations of one batch (+ curvature buffers when ``whole_model``:
    gradient, probe and Hessian-vector product per weight, and the activations every layer keeps for the
    double backward). ``streamed``: weights outside the decoder layers + the largest layer (its routed experts
    as stored, ``expert_bytes`` each: ``largest_layer_streamed``) + the hidden states carried for every
    calibration batch + one batch's activations. ``boundaries``: every layer's input for every batch, which a
    streamed curvature profile keeps (in RAM, or in a scratch folder: then one batch is read back at a time);
    ``cotangents``: one backward stream's gradients at a layer boundary for every batch (a gauss-newton sweep
    keeps one per probe of a block, fisher one in all; ``cotangents_batch``: one batch's, when they are on
    disk); ``layer_backward``: the graph of one batch through one layer during a fisher / gauss-newton sweep
    (expert weight gradients are reduced one expert at a time); ``layer_backward_hessian``: the Hessian's
    double backward, with the largest layer and its gradients in float32.
    """
    weights = 4 * total_params
    layers = max(len(layer_params), 1)
    activations = 4 * batch_tokens * (2 * vocab + 16 * hidden)
    curvature = 3 * weights + 2 * 4 * batch_tokens * 16 * hidden * layers if whole_model else 0
    largest = 4 * max(layer_params, default=total_params)
    experts = layer_expert_params or [0] * len(layer_params)
    largest_streamed = max((4 * (p - e) + expert_bytes * e for p, e in zip(layer_params, experts)), default=largest)
    outside = weights - 4 * sum(layer_params)
    hidden_states = 2 * 4 * all_tokens * hidden
    return {"weights": weights, "activations": activations, "curvature": curvature,
            "in_memory": weights + activations + curvature, "outside_layers": outside, "largest_layer": largest,
            "largest_layer_streamed": largest_streamed, "hidden_states": hidden_states,
            "streamed": outside + largest_streamed + hidden_states + activations,
            "boundaries": 4 * all_tokens * hidden * layers, "cotangents": 4 * all_tokens * hidden,
            "cotangents_batch": 4 * batch_tokens * hidden, "layer_backward": 2 * activations,
            "layer_backward_hessian": 2 * largest + 2 * activations}


def streamed_curvature_needs(need: dict[str, int], curvature: list[str], probes: int) -> tuple[int, int]:
    """``(boundaries and cotangents in RAM, in a scratch folder)``: peak bytes of a streamed curvature profile.
    ``probes``: a gauss-newton / Hessian block (their streams' cotangents or tangents are kept together)."""
    if "hessian" in curvature:  # the family's float32 layer, one tangent per probe beside each boundary, and the
        # backward pass's gradient and its tangent per probe for every batch (held in RAM)
        base = need["streamed"] - need["largest_layer_streamed"] + need["largest_layer"] + need["layer_backward_hessian"]
        base += need["cotangents"] * (probes + 1)
        return base + need["boundaries"] * (1 + probes), base + need["cotangents_batch"] * probes
    slots = probes if "gauss-newton" in curvature else 1
    base = need["streamed"] + need["layer_backward"]
    return base + need["boundaries"] + need["cotangents"] * slots, base + need["cotangents_batch"] * slots


def _embedding_shape(directory: Path) -> tuple[int, int]:
    shapes = {k: e["shape"] for p in sorted(set(checkpoint_shards(directory).values()))
              for k, e in check_safetensors(p).items() if "embed" in k and k.endswith("weight")}
    two_d = [s for s in shapes.values() if len(s) == 2]
    return tuple(max(two_d, key=math.prod)) if two_d else (0, 0)


def choose_profile_mode(directory: Path, batches: list[dict], limit: int | None, curvature: list[str],
                        ablation: bool, resume: bool, probes: int = 8) -> str:
    """``"memory"``, ``"streamed"`` (layer by layer, boundary activations in RAM) or ``"streamed-disk"``
    (boundary activations in a scratch folder); refuse (``InputError``) a profile that cannot fit ``limit``.

    Without a limit: streamed only when ``resume``. With one: in memory if it fits; else streamed. Loss
    curvature streams too (backward sweeps; the Hessian keeps one tangent per probe beside each boundary);
    ablation needs the whole model.
    """
    whole = bool(curvature) or ablation
    if limit is None:
        return "streamed" if resume else "memory"
    need = profile_memory(directory, batches, whole)
    if not resume and need["in_memory"] <= limit:
        return "memory"
    if need["streamed"] > limit:
        raise InputError(f"--max-memory {_size(limit)}: even layer-streamed profiling of {directory} needs about "
                         f"{_size(need['streamed'])} (weights outside the layers {_size(need['outside_layers'])} + "
                         f"largest layer {_size(need['largest_layer'])} + hidden states {_size(need['hidden_states'])}"
                         f"); raise --max-memory or calibrate on fewer tokens")
    if ablation and not resume:
        raise InputError(f"--max-memory {_size(limit)}: profiling {directory} with --ablation needs the whole model, "
                         f"about {_size(need['in_memory'])} (weights {_size(need['weights'])} + activations "
                         f"{_size(need['activations'])} + curvature buffers {_size(need['curvature'])}); drop "
                         f"--ablation (loss curvature streams), or raise --max-memory")
    if not curvature:
        return "streamed"
    in_ram, on_disk = streamed_curvature_needs(need, curvature, probes)
    if in_ram <= limit:
        return "streamed"
    if on_disk > limit:
        raise InputError(f"--max-memory {_size(limit)}: profiling {directory} with {','.join(curvature)} needs about "
                         f"{_size(on_disk)} even layer-streamed with the layer inputs on disk; raise --max-memory or "
                         f"calibrate on fewer tokens")
    return "streamed-disk"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
