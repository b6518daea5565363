"""Build the expert graph: routing statistics, layer-local curvature, quantization error, similarity.

Layer-local trace ("hessian-local"): for an expert matrix ``W`` ``[out, in]`` whose output is scaled by
the routing weight ``g``, the local loss ``sum_t g_t^2 ||dW x_t||^2`` has Hessian ``I_out (x) 2 X^T G^2 X``,
so its trace is ``2 * out * sum_t g_t^2 ||x_t||^2``: one pass, no backward. ``x`` is the expert input
for gate/up and the activated intermediate for down. Experts that receive no tokens get trace 0 and
therefore sensitivity 0 (finite, never NaN): nothing measured them.

Sensitivity (HAWQ-style) per curvature source and bit width: ``Omega_b = trace / params * ||W - Q_b(W)||^2``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from ..compiler.quantize import packed_nbytes, quantization_error
from ..models import LoadedModel
from ..models.base import MATRICES, ExpertRef
from ..schemas import ExpertNode, Profile, ProfileMeta, Trace

SIMILAR_NEIGHBOURS = 8


class RoutingRecorder:
    """Forward pre-hooks on every experts module and shared MLP that accumulate per-expert statistics."""

    def __init__(self, loaded: LoadedModel):
        self.adapter = loaded.adapter
        self.tokens = defaultdict(int)
        self.mass = defaultdict(float)
        self.modality = defaultdict(lambda: defaultdict(int))
        self.sq_in = defaultdict(float)  # sum g^2 ||x||^2 of gate/up inputs
        self.sq_mid = defaultdict(float)  # sum g^2 ||h||^2 of down inputs
        self.current = "text"
        self.handles = []
        for layer in self.adapter.moe_layers():
            mod = self.adapter.experts_module(layer)
            self.handles.append(mod.register_forward_pre_hook(self._routed_hook(layer)))
            shared = self.adapter.shared_module(layer)
            if shared is not None:
                self.handles.append(shared.register_forward_pre_hook(self._shared_hook(layer)))

    def _routed_hook(self, layer: int):
        def hook(module, args):
            hidden, index, weights = args[0], args[1], args[2]
            self.observe_routed(layer, hidden.detach(), index, weights.detach())
        return hook

    def _shared_hook(self, layer: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            ref = ExpertRef(layer, 0, shared=True)
            h = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
            self._add(ref, len(x), float(len(x)), float(x.pow(2).sum()), float(h.pow(2).sum()))
        return hook

    @torch.no_grad()
    def observe_routed(self, layer: int, hidden, index, weights) -> None:
        flat = index.reshape(-1)
        token = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
        g = weights.reshape(-1).float()
        sq_x = hidden.float().pow(2).sum(-1)
        act = self.adapter.experts_module(layer).act_fn
        for j in flat.unique().tolist():
            sel = flat == j
            ref = ExpertRef(layer, j)
            w = self.adapter.expert_weights(ref)
            x = hidden[token[sel]].float()
            h = act(x @ w["gate"].float().t()) * (x @ w["up"].float().t())
            g2 = g[sel].pow(2)
            self._add(ref, int(sel.sum()), float(g[sel].sum()), float((g2 * sq_x[token[sel]]).sum()),
                      float((g2 * h.pow(2).sum(-1)).sum()))

    def _add(self, ref, n, mass, sq_in, sq_mid):
        self.tokens[ref] += n
        self.mass[ref] += mass
        self.modality[ref][self.current] += n
        self.sq_in[ref] += sq_in
        self.sq_mid[ref] += sq_mid

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_calibration(loaded: LoadedModel, batches: list[dict], progress: bool = True) -> tuple[RoutingRecorder, float]:
    """One plain forward over every batch with the recorder attached; returns it and the mean loss."""
    recorder = RoutingRecorder(loaded)
    losses = []
    try:
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            recorder.current = batch.get("modality", "text")
            losses.append(float(loaded.adapter.loss(batch)))
    finally:
        recorder.close()
    return recorder, sum(losses) / max(len(losses), 1)


def expert_node(adapter, ref: ExpertRef, rec: RoutingRecorder, total_tokens: int, settings: dict) -> ExpertNode:
    weights = {m: w.detach() for m, w in adapter.expert_weights(ref).items()}
    shapes = {m: list(w.shape) for m, w in weights.items()}
    params = sum(w.numel() for w in weights.values())
    bits, gs, sym, clip = settings["bits"], settings["group_size"], settings["symmetric"], settings["clip_search"]
    nbytes = {str(b): sum(packed_nbytes(*shapes[m], b, gs, sym) for m in MATRICES) for b in bits}
    perturbation = {str(b): sum(quantization_error(weights[m], b, gs, sym, clip) for m in MATRICES) for b in bits}
    per_matrix = {"gate": 2 * shapes["gate"][0] * rec.sq_in[ref], "up": 2 * shapes["up"][0] * rec.sq_in[ref],
                  "down": 2 * shapes["down"][0] * rec.sq_mid[ref]}
    trace = Trace(mean=sum(per_matrix.values()), stderr=0.0, probes=0, per_matrix=per_matrix)
    node = ExpertNode(
        id=ref.id, layer=ref.layer, expert=ref.expert, shared=ref.shared, params=params, shapes=shapes,
        bytes=nbytes, bf16_bytes=2 * params, tokens=rec.tokens[ref],
        frequency=rec.tokens[ref] / max(total_tokens, 1), routing_mass=rec.mass[ref] / max(total_tokens, 1),
        tokens_by_modality=dict(rec.modality[ref]), trace={"hessian-local": trace}, perturbation=perturbation)
    return add_sensitivity(node)


def add_sensitivity(node: ExpertNode) -> ExpertNode:
    """``Omega_b = trace / params * perturbation_b`` for every curvature source on the node."""
    node.sensitivity = {
        source: {b: max(t.mean, 0.0) / node.params * p for b, p in node.perturbation.items()}
        for source, t in node.trace.items()
    }
    return node


def similarity_edges(adapter, layer: int, k: int = SIMILAR_NEIGHBOURS) -> list[tuple[str, str, float]]:
    """Cosine similarity of flattened expert weights; each expert keeps its ``k`` nearest neighbours."""
    refs = [ExpertRef(layer, j) for j in range(adapter.num_experts(layer))]
    flat = torch.stack([torch.cat([w.detach().float().flatten() for w in adapter.expert_weights(r).values()])
                        for r in refs])
    flat = torch.nn.functional.normalize(flat, dim=1)
    sim = flat @ flat.t()
    sim.fill_diagonal_(-2.0)
    edges = {}
    for i, row in enumerate(sim):
        for j in row.topk(min(k, len(refs) - 1)).indices.tolist():
            a, b = sorted((refs[i].id, refs[j].id))
            edges[(a, b)] = round(float(sim[i, j]), 6)
    return [(a, b, w) for (a, b), w in sorted(edges.items())]


def non_expert_bytes(loaded: LoadedModel) -> int:
    expert_params = {id(p) for ref in loaded.adapter.experts() for p in loaded.adapter.expert_parameters(ref)}
    return sum(2 * p.numel() for p in loaded.model.parameters() if id(p) not in expert_params)


def profile_model(loaded: LoadedModel, batches: list[dict], calibration: dict, bits=(2, 3, 4, 8),
                  group_size: int = 128, symmetric: bool = False, clip_search: bool = False, seed: int = 0,
                  progress: bool = True) -> Profile:
    """Profile every expert of ``loaded`` on ``batches``. Example: ``profile_model(open_model("demo"), ...)``."""
    torch.manual_seed(seed)
    settings = {"bits": sorted(bits), "group_size": group_size, "symmetric": symmetric,
                "clip_search": clip_search, "seed": seed}
    rec, loss = run_calibration(loaded, batches, progress)
    total = calibration["tokens"]
    refs = loaded.adapter.experts()
    nodes = [expert_node(loaded.adapter, r, rec, total, settings)
             for r in tqdm(refs, desc="quant error", unit="expert", disable=not progress)]
    edges = [e for layer in loaded.adapter.moe_layers() for e in similarity_edges(loaded.adapter, layer)]
    meta = ProfileMeta(model_id=loaded.model_id, family=loaded.adapter.family, config_hash=loaded.config_hash,
                       calibration=dict(calibration, loss=loss), settings=settings, top_k=loaded.adapter.top_k(),
                       non_expert_bytes=non_expert_bytes(loaded))
    return Profile(meta=meta, experts=nodes, edges=edges)
