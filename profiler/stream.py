"""Layer-streamed profiling: one decoder layer's weights resident at a time, resumable per layer.

The module tree is built on the ``meta`` device; everything outside the decoder layers (embeddings,
vision tower, final norm, head) is loaded once, then each decoder layer is read from the safetensors
shards (``safe_open``), run on the carried hidden states of every calibration batch with the
``RoutingRecorder`` attached, profiled (routing statistics, layer-local trace, quantization error,
similarity) and sent back to ``meta``. Peak weight memory is the non-layer weights plus one layer, whose
routed experts stay in the checkpoint's dtype (``StreamedExperts``: float32 products, one expert at a time).

Loss curvature (``hessian``, ``fisher``, ``gauss-newton``) streams too: every layer's input is kept
(RAM or a scratch folder) and backward sweeps walk the layers from the last to the first, one resident
at a time (``stream_curvature``); the traces equal the in-memory ones for the same seed.

Resume: with ``checkpoint_dir`` every finished layer writes ``layer-NNNNN.json`` (its nodes and
edges) after ``hidden-NNNNN.safetensors`` (the hidden states after it), both atomically (temporary
file + rename); a rerun with the same model, calibration and settings continues after the last
finished layer and never reloads finished layers.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..models import LoadedModel, check_model_size, read_config, resolve_dir, skeleton
from ..models.base import ExpertRef
from ..models.empty import empty_weights
from ..schemas import ExpertNode, InputError, Profile, ProfileMeta, atomic_write, parse_bytes
from .curvature import scored_tokens, shift_scored, total_tokens
from .profile import RoutingRecorder, add_sensitivity, expert_node, non_expert_bytes, similarity_edges


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release_heap() -> None:
    """Give freed heap pages back to the OS. glibc keeps them, and a loop that allocates and frees a layer's
    activations batch after batch would otherwise grow, by fragmentation, well past what it holds at once."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@dataclass
class StreamStats:
    """What the streamer loaded: to show that the full model never was resident."""

    loaded_tensors: int = 0
    peak_resident_params: int = 0
    layers_loaded: list[int] = field(default_factory=list)


class CheckpointReader:
    """Tensor names -> shard file for a directory with ``model.safetensors`` or a sharded index."""

    def __init__(self, directory: Path):
        from ..safety import checkpoint_shards

        self.where = checkpoint_shards(directory)  # shard names kept inside, headers checked vs. file sizes
        self.keys = set(self.where)

    def read(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), "pt") as f:
            return f.get_tensor(key)


class LayerStreamer:
    """A meta-device model whose decoder layers are loaded one at a time. Example: see ``profile_streamed``."""

    def __init__(self, path):
        self.directory = resolve_dir(path)
        self.config = read_config(self.directory)
        # parameters on meta (filled layer by layer), buffers real; float32 as profiled in memory
        self.adapter = skeleton(self.config, self.directory, dtype=torch.float32, init=empty_weights())
        self.model = self.adapter.model.eval()
        self.reader = CheckpointReader(self.directory)
        check_model_size(self.adapter, self.directory)
        self.stats = StreamStats()
        self.swapped: dict[int, torch.nn.Module] = {}  # layer -> its own experts module while StreamedExperts runs
        self.names = {id(m): n for n, m in self.model.named_modules()}
        self.layers_prefix = self.names[id(self.adapter.decoder_layers())]
        self._load_outside_layers()

    def _load_outside_layers(self) -> None:
        inside = f"{self.layers_prefix}."
        keys = [k for k in self.reader.keys if not self.adapter.memory_key(k).startswith(inside)]
        tensors = self.adapter.memory_tensors({k: self.reader.read(k) for k in keys})
        for name, module in self.model.named_modules():
            if name.startswith(self.layers_prefix):
                continue
            for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                key = f"{name}.{pname}" if name else pname
                if key in tensors:
                    self._set(module, pname, tensors[key])
        for target, source in (getattr(self.model, "all_tied_weights_keys", None) or {}).items():
            if target not in tensors:  # e.g. lm_head.weight is the embedding: tie it to the loaded tensor
                owner, _, leaf = target.rpartition(".")
                setattr(self.model.get_submodule(owner), leaf, self.model.get_parameter(source))
        left = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(inside)]
        if left:
            raise InputError(f"{self.directory}: tensor {left[0]} missing from the checkpoint")
        self._track()

    def _set(self, module, name: str, value: torch.Tensor) -> None:
        old = getattr(module, name)
        new = value.to(old.dtype).contiguous()
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, name, new)
        self.stats.loaded_tensors += 1

    def _track(self) -> None:
        resident = sum(p.numel() for p in self.model.parameters() if p.device.type != "meta")
        self.stats.peak_resident_params = max(self.stats.peak_resident_params, resident)

    def load_layer(self, layer: int, float_experts: bool = False) -> torch.nn.Module:
        """Materialise decoder layer ``layer``'s parameters (and stored buffers) from the shards, converted the
        way the family loads them; buffers the layer computes itself (rotary tables) stay as built.

        The routed experts stay in their stored dtype behind a ``StreamedExperts`` (float32 products, one
        expert upcast at a time) unless ``float_experts`` (the Hessian's double backward needs the family's
        own module) or the experts module holds more than the expert matrices."""
        from .streamed_experts import StreamedExperts, covers_parameters

        module = self.adapter.decoder_layers()[layer]
        experts = self.adapter.experts_module(layer) if layer in self.adapter.moe_layers() else None
        streamed = experts is not None and not float_experts and covers_parameters(self.adapter, layer, experts)
        ids = {id(p) for p in experts.parameters()} if streamed else set()
        routed = {n for n, p in module.named_parameters() if id(p) in ids}
        consumed = self._load_routed(layer, experts) if streamed else set()
        prefix = f"{self.layers_prefix}.{layer}."
        keys = [k for k in self.reader.keys if self.adapter.memory_key(k).startswith(prefix) and k not in consumed]
        tensors = self.adapter.memory_tensors({k: self.reader.read(k) for k in keys})
        stored = set(module.state_dict())
        for name, _ in list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n in stored]:
            if name in routed:
                continue
            if prefix + name not in tensors:
                raise InputError(f"{self.directory}: tensor {prefix + name} missing from the checkpoint")
            owner, _, leaf = name.rpartition(".")
            # popped: each source tensor is freed once converted, not held with the whole converted layer
            self._set(module.get_submodule(owner), leaf, tensors.pop(prefix + name))
        del tensors
        if streamed:
            setattr(self.adapter.moe_block(layer), self.adapter.experts_attr, StreamedExperts(self.adapter, layer, experts))
            self.swapped[layer] = experts
        self.stats.layers_loaded.append(layer)
        self._track()
        return module

    def _load_routed(self, layer: int, experts: torch.nn.Module) -> set[str]:
        """Fill the experts module's parameters, allocated once in the checkpoint's dtype, expert by expert
        through the adapter's on-disk locations (only each expert's part of a fused tensor is read): no second
        copy of the layer's experts, as converting the whole stack would make. Returns the keys read."""
        refs = [ExpertRef(layer, j) for j in range(self.adapter.num_experts(layer))]
        where = {ref: self.adapter.disk_tensors(ref, self.reader.keys) for ref in refs}
        missing = [d.key for w in where.values() for d in w.values() if d.key not in self.reader.keys]
        if missing:
            raise InputError(f"{self.directory}: tensor {missing[0]} missing from the checkpoint")
        first = where[refs[0]]["gate"]
        with safe_open(str(self.reader.where[first.key]), "pt") as f:
            dtype = f.get_slice(first.key).get_dtype()
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False))
        with ExitStack() as stack:  # each shard opened once for the layer
            shards = {path: stack.enter_context(safe_open(str(path), "pt"))
                      for path in {self.reader.where[d.key] for w in where.values() for d in w.values()}}
            for ref in refs:
                self._copy_expert(ref, where[ref], shards)
        return {d.key for w in where.values() for d in w.values()}

    def _copy_expert(self, ref: ExpertRef, where: dict, shards: dict) -> None:
        views = self.adapter.expert_weights(ref)
        for m, disk in where.items():
            part = disk.read(shards[self.reader.where[disk.key]])
            if tuple(part.shape) != tuple(views[m].shape):
                raise InputError(f"{self.directory}: tensor {disk.key} gives expert {ref.id} {m} of shape "
                                 f"{tuple(part.shape)}, expected {tuple(views[m].shape)}")
            views[m].copy_(part)
        self.stats.loaded_tensors += len(where)

    def unload_layer(self, layer: int) -> None:
        """Parameters back to meta (freed); computed buffers stay."""
        if layer in self.swapped:
            setattr(self.adapter.moe_block(layer), self.adapter.experts_attr, self.swapped.pop(layer))
        module = self.adapter.decoder_layers()[layer]
        for name, p in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))

    # --- running (the family's hooks) -----------------------------------------------------------------
    def embed(self, batch: dict) -> torch.Tensor:
        try:
            return self.adapter.embed_batch(batch)
        except InputError as exc:
            raise InputError(f"{self.directory}: {exc}") from None

    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.run_layer(layer, hidden)

    def loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.last_hidden_loss(batch, hidden)

    def scored_logits(self, batch: dict, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``curvature.scored_logits`` from the last hidden states: ``[N, V]`` float logits and labels."""
        return shift_scored(batch, self.adapter.last_hidden_logits(hidden))


# --- checkpoints ---------------------------------------------------------------------------------------

def run_key(config_hash: str, calibration: dict, settings: dict) -> str:
    text = json.dumps({"config": config_hash, "calibration": calibration, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_layer(directory: Path, layer: int, key: str, nodes, edges, hidden: list[torch.Tensor]) -> None:
    """Hidden states first, then the layer JSON (the commit point), then drop older hidden states."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"batch{i}": h.contiguous() for i, h in enumerate(hidden)}
    atomic_write(directory / f"hidden-{layer:05d}.safetensors", lambda p: save_file(tensors, str(p), {"key": key}))
    record = {"key": key, "layer": layer, "nodes": [n.model_dump() for n in nodes], "edges": edges}
    atomic_write(directory / f"layer-{layer:05d}.json", lambda p: p.write_text(json.dumps(record, sort_keys=True)))
    for old in directory.glob("hidden-*.safetensors"):
        if old.name != f"hidden-{layer:05d}.safetensors":
            old.unlink()


def load_finished(directory: Path, key: str, batches: int) -> tuple[dict[int, dict], list[torch.Tensor] | None]:
    """Finished layers ``{layer: record}`` and the hidden states after the last one (None if none)."""
    done = {}
    damaged = "damaged resume checkpoint ({}); delete it or use a fresh --resume directory"
    for path in sorted(directory.glob("layer-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise InputError(f"{path}: " + damaged.format("not valid JSON")) from None
        if not isinstance(record, dict) or not isinstance(record.get("layer"), int) or \
                not isinstance(record.get("nodes"), list) or not isinstance(record.get("edges"), list):
            raise InputError(f"{path}: " + damaged.format("expected an object with layer, nodes and edges"))
        if record.get("key") != key:
            raise InputError(f"{path}: checkpoint of a different model, calibration or settings; "
                             "use another --resume directory")
        done[record["layer"]] = record
    if not done:
        return {}, None
    hidden_path = directory / f"hidden-{max(done):05d}.safetensors"
    if not hidden_path.is_file():
        raise InputError(f"{hidden_path}: missing hidden states for the last finished layer; use a fresh --resume directory")
    try:
        state = load_file(str(hidden_path))
        return done, [state[f"batch{i}"] for i in range(batches)]
    except (SafetensorError, KeyError, OSError, ValueError) as exc:  # truncated file, a batch missing
        raise InputError(f"{hidden_path}: " + damaged.format(str(exc).splitlines()[0][:120] if str(exc) else
                                                             type(exc).__name__)) from None


# --- the streamed profile --------------------------------------------------------------------------------

def profile_streamed(path, batches: list[dict], calibration: dict, bits=(2, 3, 4, 8), group_size: int = 128,
                     symmetric: bool = False, clip_search: bool = False, seed: int = 0,
                     checkpoint_dir: Path | None = None, on_layer_done=None, curvature: tuple[str, ...] = (),
                     probes: int = 32, tolerance: float = 0.1,
                     boundaries: Path | None = None) -> tuple[Profile, StreamStats]:
    """Profile ``path`` layer by layer (see module docstring). Example: ``profile_streamed(dir, batches, summary)``.

    ``curvature``: ``hessian`` / ``fisher`` / ``gauss-newton`` by backward sweeps (``stream_curvature``); each layer's input
    is kept in RAM, or under ``boundaries`` (a folder) when given, and under ``checkpoint_dir`` when resuming.
    """
    from .stream_curvature import BoundaryStore, streamed_curvature

    torch.manual_seed(seed)
    streamer = LayerStreamer(path)
    loaded = LoadedModel(streamer.model, streamer.adapter, streamer.config, _model_id(path, streamer.config),
                         streamer.directory)
    settings = {"bits": sorted(bits), "group_size": group_size, "symmetric": symmetric,
                "clip_search": clip_search, "seed": seed}
    if curvature:
        settings.update(curvature=list(curvature), probes=probes, tolerance=tolerance)
    key = run_key(loaded.config_hash, calibration, settings)
    done, hidden = load_finished(Path(checkpoint_dir), key, len(batches)) if checkpoint_dir else ({}, None)
    if boundaries is None and checkpoint_dir is not None and curvature:
        boundaries = Path(checkpoint_dir) / "boundaries"  # resumable with the layers
    store = BoundaryStore(boundaries)
    with torch.no_grad():
        if hidden is None:
            hidden = [streamer.embed(b) for b in batches]
        if curvature and boundaries is not None:
            block = min(probes, 8)  # probes whose tangents / cotangents are kept together
            check_scratch(Path(boundaries), hidden, len(streamer.adapter.decoder_layers()),
                          block if "hessian" in curvature else 0, block if "gauss-newton" in curvature else 1)
        for layer in range(len(streamer.adapter.decoder_layers())):
            if layer in done:
                continue
            if curvature:
                store.put(layer, hidden)
            nodes, edges, hidden = _profile_layer(streamer, loaded, layer, batches, hidden, calibration, settings,
                                                  float_experts="hessian" in curvature)
            done[layer] = {"nodes": [n.model_dump() for n in nodes], "edges": edges}
            if checkpoint_dir:
                save_layer(Path(checkpoint_dir), layer, key, nodes, edges, hidden)
            if on_layer_done:
                on_layer_done(layer)
        loss = _final_loss(streamer, batches, hidden)
    resume = Path(checkpoint_dir) / "curvature" if checkpoint_dir else None
    traces = streamed_curvature(streamer, batches, store, hidden, list(curvature), probes, tolerance,
                                seed=seed, checkpoint=resume) if curvature else {}
    return _assemble(loaded, done, calibration, settings, loss, traces), streamer.stats


def _profile_layer(streamer, loaded, layer, batches, hidden, calibration, settings, float_experts=False):
    # the Hessian's sweeps run the family's own float32 experts: its forward gives them bit-identical inputs
    streamer.load_layer(layer, float_experts)
    recorder = RoutingRecorder(loaded) if layer in streamer.adapter.moe_layers() else None
    out = []
    try:
        for batch, h in zip(batches, hidden):
            if recorder:
                recorder.current = batch.get("modality", "text")
            out.append(streamer.run_layer(layer, h))
            release_heap()
    finally:
        if recorder:
            recorder.close()
    nodes, edges = [], []
    if recorder:
        refs = [r for r in streamer.adapter.experts() if r.layer == layer]
        nodes = [expert_node(streamer.adapter, r, recorder, calibration["tokens"], settings) for r in refs]
        edges = [list(e) for e in similarity_edges(streamer.adapter, layer)]
    streamer.unload_layer(layer)
    return nodes, edges, out


def check_scratch(folder: Path, hidden: list[torch.Tensor], layers: int, tangents: int, streams: int = 1) -> None:
    """Refuse, before any layer runs, a scratch folder without room for every layer's inputs (and tangents), and
    the backward streams' cotangents at two layer boundaries (the committed one and the one being written)."""
    import shutil

    need = (layers * (1 + tangents) + 2 * streams) * sum(h.numel() * h.element_size() for h in hidden)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise InputError(f"{folder}: {free / 2**30:.2f} GiB free, the layer inputs kept for the curvature sweeps need "
                         f"about {need / 2**30:.2f} GiB; free space, use another --resume folder, or calibrate on "
                         f"fewer tokens")


def _final_loss(streamer, batches, hidden) -> float:
    m = total_tokens(batches)
    return sum(float(streamer.loss(b, h)) * scored_tokens(b) / m for b, h in zip(batches, hidden))


def _assemble(loaded, done, calibration, settings, loss, traces: dict) -> Profile:
    nodes = [ExpertNode(**n) for layer in sorted(done) for n in done[layer]["nodes"]]
    for node in nodes:
        for source, by_ref in traces.items():
            node.trace[source] = by_ref[ExpertRef(node.layer, node.expert, node.shared)]
        add_sensitivity(node)
    edges = [tuple(e) for layer in sorted(done) for e in done[layer]["edges"]]
    settings = dict(settings, streamed=True)
    meta = ProfileMeta(model_id=loaded.model_id, family=loaded.adapter.family, config_hash=loaded.config_hash,
                       calibration=dict(calibration, loss=loss), settings=settings, top_k=loaded.adapter.top_k(),
                       non_expert_bytes=non_expert_bytes(loaded))
    return Profile(meta=meta, experts=nodes, edges=edges)


def _model_id(path, config: dict) -> str:
    from ..models import DEMO

    directory = resolve_dir(path)
    return DEMO if str(path) == DEMO else str(config.get("_name_or_path") or directory.name)


# --- CLI helpers -----------------------------------------------------------------------------------------

def parse_memory(text: str) -> int:
    """``--max-memory``: ``"8G"`` (GiB), ``"1500M"``, ``"900MiB"``, ``"8GB"`` (1e9), a byte count (``schemas.parse_bytes``)."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise InputError(f"--max-memory: got {text!r}, {exc}") from None


def checkpoint_bytes(directory: Path) -> int:
    """Size of the weights in memory at float32 (what ``open_model`` would hold)."""
    reader = CheckpointReader(directory)
    total = 0
    for path in sorted(set(reader.where.values())):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += 4 * _numel(f.get_slice(key).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
