"""Per-expert Gram matrices of routed inputs, for GPTQ in the compiler (``grams.safetensors``).

For routed expert ``j`` of layer ``l`` and the calibration tokens ``t`` routed to it with weight
``g_t``: ``L{l}.E{j}.in = sum_t w_t x_t x_t^T`` ``[H, H]`` over its inputs ``x_t`` (what gate/up see)
and ``L{l}.E{j}.mid = sum_t w_t h_t h_t^T`` ``[I, I]`` over ``h_t = act(W_gate x_t) * (W_up x_t)``
(what down sees), with ``w_t = g_t^2`` (``weighting="routing"``: the expert's output is scaled by
``g_t``, so its layer-local loss is ``sum_t g_t^2 ||dW x_t||^2``) or ``w_t = 1`` (``"none"``). Shared
experts (``L{l}.S0.*``) see every token with weight 1. Grams are summed in float64 and stored as
float32; the file's metadata holds the version, weighting, config hash and tokens per expert.

Memory: one ``[H, H]`` and one ``[I, I]`` float64 accumulator per expert; fine for the demo and tiny
models, ~0.4 GB per expert at DeepSeek-V3 width (stream layer by layer there).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..compiler.gptq import GRAMS_VERSION, GramWeighting
from ..models import LoadedModel
from ..models.base import ExpertRef


class GramRecorder:
    """Forward pre-hooks on every experts module and shared MLP that accumulate ``X^T W X`` per expert."""

    def __init__(self, loaded: LoadedModel, weighting: GramWeighting = GramWeighting.ROUTING):
        self.adapter = loaded.adapter
        self.weighting = GramWeighting(weighting)
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.handles = []
        for layer in self.adapter.moe_layers():
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
            w = self.adapter.expert_weights(ExpertRef(layer, j))
            x = hidden[token[sel]]  # [T_j, H]
            h = module.act_fn(x @ w["gate"].t()) * (x @ w["up"].t())  # [T_j, I]
            self._add(ExpertRef(layer, j), x.double(), h.double(), g[sel].pow(2))

    def _add(self, ref: ExpertRef, x: torch.Tensor, h: torch.Tensor, g2: torch.Tensor) -> None:
        row = g2 if self.weighting == GramWeighting.ROUTING else torch.ones_like(g2)
        for suffix, inputs in (("in", x), ("mid", h)):
            name = f"{ref.id}.{suffix}"
            gram = (inputs * row[:, None]).t() @ inputs
            self.grams[name] = gram if name not in self.grams else self.grams[name] + gram
        self.tokens[ref.id] += len(x)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in sorted(recorder.grams.items())}
    meta = {"format": "pt", "mopeq_grams_version": str(GRAMS_VERSION), "weighting": recorder.weighting.value,
            "config_hash": config_hash, "calibration": calibration,
            "tokens": json.dumps(dict(sorted(recorder.tokens.items())))}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def grams_for(loaded: LoadedModel, batches: list[dict], path: Path, weighting: GramWeighting = GramWeighting.ROUTING,
              calibration: str = "", progress: bool = True) -> Path:
    """Collect and save in one call (what ``mopeq compile --calib`` runs)."""
    recorder = collect_grams(loaded, batches, weighting, progress)
    return save_grams(recorder, loaded.config_hash, path, calibration)
