"""Per-expert Gram matrices of routed inputs, for GPTQ in the compiler (``grams.safetensors``).

For routed expert ``j`` of layer ``l`` and the calibration tokens ``t`` routed to it with weight
``g_t``: ``L{l}.E{j}.in = sum_t w_t x_t x_t^T`` ``[H, H]`` over its inputs ``x_t`` (what gate/up see)
and ``L{l}.E{j}.mid = sum_t w_t h_t h_t^T`` ``[I, I]`` over ``h_t = act(W_gate x_t) * (W_up x_t)``
(what down sees), with ``w_t = g_t^2`` (``weighting="routing"``: the expert's output is scaled by
``g_t``, so its layer-local loss is ``sum_t g_t^2 ||dW x_t||^2``) or ``w_t = 1`` (``"none"``). Shared
experts (``L{l}.S0.*``) see every token with weight 1. Grams are summed in float64 and stored as
float32; the file's metadata holds the version, weighting, config hash and tokens per expert.

Memory: one ``[H, H]`` and one ``[I, I]`` float64 accumulator per expert, ~0.4 GB per expert at
DeepSeek-V3 width. ``collect_grams`` holds every layer's (fine for the demo and tiny models);
``collect_grams_streamed`` loads one decoder layer at a time (``LayerStreamer``), writes that layer's
Grams to a part file and frees them, then merges the parts into the same ``grams.safetensors``: peak
memory is one layer's Grams and weights plus the carried hidden states.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..compiler.gptq import GRAMS_VERSION, GramWeighting
from ..models import LoadedModel
from ..models.base import ExpertRef
from ..schemas import atomic_write
from ..schemas import config_hash as hash_config


class GramRecorder:
    """Forward pre-hooks on the experts modules and shared MLPs that accumulate ``X^T W X`` per expert.

    ``layers``: the MoE layers to hook (None: all of them); ``attach`` adds more later, ``close`` removes
    the hooks and ``pop_grams`` hands over (and forgets) the Grams held, as the layer-streamed run does.
    ``peak_grams`` is the most Gram tensors held at once; ``tokens`` counts every layer's.
    """

    def __init__(self, loaded: LoadedModel, weighting: GramWeighting = GramWeighting.ROUTING,
                 layers: Iterable[int] | None = None):
        self.adapter = loaded.adapter
        self.weighting = GramWeighting(weighting)
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.peak_grams = 0
        self.handles = []
        self.attach(self.adapter.moe_layers() if layers is None else layers)

    def attach(self, layers: Iterable[int]) -> None:
        moe = set(self.adapter.moe_layers())
        for layer in [layer for layer in layers if layer in moe]:
            self.handles.append(self.adapter.experts_module(layer).register_forward_pre_hook(self._routed(layer)))
            shared = self.adapter.shared_module(layer)
            if shared is not None:
                self.handles.append(shared.register_forward_pre_hook(self._shared(layer)))

    def _routed(self, layer: int):
        def hook(module, args):
            self.observe_routed(layer, module, args[0].detach(), args[1], args[2].detach())
        return hook

    def _shared(self, layer: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [T, H]
            h = module.act_fn(module.gate_proj(x.to(module.gate_proj.weight.dtype))) * \
                module.up_proj(x.to(module.up_proj.weight.dtype))  # [T, I]
            self._add(ExpertRef(layer, 0, shared=True), x, h.detach().double(), torch.ones(len(x), dtype=torch.float64))
        return hook

    @torch.no_grad()
    def observe_routed(self, layer: int, module, hidden, index, weights) -> None:
        """``hidden`` [T, H], ``index``/``weights`` [T, k] as the fused experts module receives them."""
        flat = index.reshape(-1)
        token = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
        g = weights.reshape(-1).double()
        for j in flat.unique().tolist():
            if j >= self.adapter.num_experts(layer):
                continue  # transformers marks dropped slots with index E
            sel = flat == j
            w = {m: t.to(hidden.dtype) for m, t in self.adapter.expert_weights(ExpertRef(layer, j)).items()}
            x = hidden[token[sel]]  # [T_j, H]
            h = module.act_fn(x @ w["gate"].t()) * (x @ w["up"].t())  # [T_j, I]
            self._add(ExpertRef(layer, j), x.double(), h.double(), g[sel].pow(2))

    def _add(self, ref: ExpertRef, x: torch.Tensor, h: torch.Tensor, g2: torch.Tensor) -> None:
        row = g2 if self.weighting == GramWeighting.ROUTING else torch.ones_like(g2)
        for suffix, inputs in (("in", x), ("mid", h)):
            name = f"{ref.id}.{suffix}"
            gram = (inputs * row[:, None]).t() @ inputs
            self.grams[name] = gram if name not in self.grams else self.grams[name] + gram
        self.peak_grams = max(self.peak_grams, len(self.grams))
        self.tokens[ref.id] += len(x)

    def pop_grams(self) -> dict[str, torch.Tensor]:
        grams, self.grams = self.grams, {}
        return grams

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@torch.no_grad()
def collect_grams(loaded: LoadedModel, batches: list[dict], weighting: GramWeighting = GramWeighting.ROUTING,
                  progress: bool = True) -> GramRecorder:
    """One forward over ``batches`` with the recorder attached. Example: ``collect_grams(open_model("demo"), b)``."""
    recorder = GramRecorder(loaded, weighting)
    try:
        for batch in tqdm(batches, desc="grams", unit="batch", disable=not progress):
            loaded.adapter.forward(batch)
    finally:
        recorder.close()
    return recorder


def save_grams(recorder: GramRecorder, config_hash: str, path: Path, calibration: str = "") -> Path:
    """Write ``grams.safetensors``: every expert's ``.in``/``.mid`` Gram (float32) and the metadata."""
    metadata = _metadata(recorder, config_hash, calibration)
    return atomic_write(path, lambda tmp: save_file(_float32(recorder.grams), str(tmp), metadata=metadata))


def _float32(grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float().contiguous() for k, v in sorted(grams.items())}


def _metadata(recorder: GramRecorder, config_hash: str, calibration: str) -> dict[str, str]:
    return {"format": "pt", "mopeq_grams_version": str(GRAMS_VERSION), "weighting": recorder.weighting.value,
            "config_hash": config_hash, "calibration": calibration,
            "tokens": json.dumps(dict(sorted(recorder.tokens.items())))}


def grams_for(loaded: LoadedModel, batches: list[dict], path: Path, weighting: GramWeighting = GramWeighting.ROUTING,
              calibration: str = "", progress: bool = True) -> Path:
    """Collect and save in one call (what ``mopeq compile --calib`` runs)."""
    recorder = collect_grams(loaded, batches, weighting, progress)
    return save_grams(recorder, loaded.config_hash, path, calibration)


# --- layer-streamed collection -------------------------------------------------------------------------

@torch.no_grad()
def collect_grams_streamed(model_dir, batches: list[dict], path: Path,
                           weighting: GramWeighting = GramWeighting.ROUTING, calibration: str = "",
                           progress: bool = True) -> GramRecorder:
    """``grams_for`` one decoder layer at a time: the same ``path``, never every layer's Grams in memory.

    Each layer is loaded, run on every batch's carried hidden states with only its hooks attached, its
    Grams written (float32) to a part file in a temporary folder beside ``path`` and dropped, and the
    layer unloaded; ``merge_parts`` then writes ``path``. Returns the recorder (token counts,
    ``peak_grams``; its Grams are on disk). Example: ``collect_grams_streamed("demo", b, out / "grams.safetensors")``.
    """
    from .stream import LayerStreamer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    streamer = LayerStreamer(model_dir)
    loaded = LoadedModel(streamer.model, streamer.adapter, streamer.config, str(model_dir), streamer.directory)
    recorder = GramRecorder(loaded, weighting, layers=())
    parts_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.parts-", dir=path.parent))
    try:
        hidden = [streamer.embed(b) for b in batches]
        parts = []
        for layer in tqdm(range(len(streamer.adapter.decoder_layers())), desc="grams", unit="layer",
                          disable=not progress):
            hidden = _gram_layer(streamer, recorder, layer, hidden)
            grams = recorder.pop_grams()
            if grams:
                parts.append(parts_dir / f"layer-{layer:05d}.safetensors")
                save_file(_float32(grams), str(parts[-1]))
            del grams
        merge_parts(parts, path, _metadata(recorder, hash_config(streamer.config), calibration))
    finally:
        shutil.rmtree(parts_dir)
    return recorder


def _gram_layer(streamer, recorder: GramRecorder, layer: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    streamer.load_layer(layer)
    recorder.attach([layer])
    try:
        return [streamer.run_layer(layer, h) for h in hidden]
    finally:
        recorder.close()
        streamer.unload_layer(layer)


def _read_header(path: Path) -> tuple[int, dict]:
    """``(data start, header)`` of a safetensors file: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def merge_parts(parts: list[Path], path: Path, metadata: dict[str, str], chunk_bytes: int = 64 * 2**20) -> Path:
    """Concatenate safetensors ``parts`` (distinct tensor names) into ``path`` with ``metadata``, streaming.

    Tensors go in name order, as ``save_file`` lays out same-dtype tensors; the header is built from the
    parts' headers and padded with spaces to 8 bytes, then each tensor's bytes are copied in chunks, so
    one chunk is in memory at a time. Written to a temporary file and renamed.
    """
    entries = {}  # name -> (part, data start, entry)
    for part in parts:
        start, header = _read_header(part)
        for name, entry in header.items():
            if name != "__metadata__":
                assert name not in entries, f"{name} in two parts"
                entries[name] = (part, start, entry)
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(entries):
        begin, end = entries[name][2]["data_offsets"]
        header[name] = {"dtype": entries[name][2]["dtype"], "shape": entries[name][2]["shape"],
                        "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in sorted(entries):
                _copy_bytes(entries[name][0], entries[name][1], entries[name][2]["data_offsets"], out, chunk_bytes)

    return atomic_write(path, write)


def _copy_bytes(part: Path, start: int, offsets: list[int], out, chunk_bytes: int) -> None:
    begin, end = offsets
    with open(part, "rb") as f:
        f.seek(start + begin)
        for at in range(begin, end, chunk_bytes):
            out.write(f.read(min(chunk_bytes, end - at)))
