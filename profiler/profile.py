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
SIMILARITY_BLOCK = 16 << 20  # bytes of expert rows stacked at a time for the similarity Gram


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
                self.handles.append(shared.down_proj.register_forward_pre_hook(self._shared_mid_hook(layer)))

    def _routed_hook(self, layer: int):
        def hook(module, args):
            hidden, index, weights = args[0], args[1], args[2]
            self.observe_routed(layer, hidden.detach(), index, weights.detach())
        return hook

    def _shared_hook(self, layer: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            self._add(ExpertRef(layer, 0, shared=True), len(x), float(len(x)), float(x.pow(2).sum()), 0.0)
        return hook

    def _shared_mid_hook(self, layer: int):
        """The shared expert's down-projection input ``h`` is captured, not recomputed."""
        def hook(module, args):
            self.sq_mid[ExpertRef(layer, 0, shared=True)] += float(args[0].detach().float().pow(2).sum())
        return hook

    @torch.no_grad()
    def observe_routed(self, layer: int, hidden, index, weights) -> None:
        """Per-expert token count, routing mass, ``sum g^2 ||x||^2`` and ``sum g^2 ||h||^2``, vectorised.

        ``h = act(x W_gate^T) * (x W_up^T)`` (the down-projection input) is recomputed for every
        (token, expert) pair with one grouped matmul over tokens sorted by expert.
        """
        flat = index.reshape(-1)
        order = flat.argsort(stable=True)
        token = torch.div(order, index.shape[1], rounding_mode="floor")
        g2 = weights.reshape(-1)[order].float().pow(2)
        x = hidden[token].float()  # [N*k, H], grouped by expert
        num = self.adapter.num_experts(layer)
        counts = torch.bincount(flat, minlength=num)
        h_sq = self._mid_norms(layer, x, counts)
        stats = torch.zeros(4, num, dtype=torch.float64)
        stats[0] = counts.double()
        stats[1].index_add_(0, flat, weights.reshape(-1).double())
        stats[2].index_add_(0, flat[order], (g2 * x.pow(2).sum(-1)).double())
        stats[3].index_add_(0, flat[order], (g2 * h_sq).double())
        for j in counts.nonzero().flatten().tolist():
            self._add(ExpertRef(layer, j), int(stats[0, j]), float(stats[1, j]), float(stats[2, j]), float(stats[3, j]))

    def _mid_norms(self, layer: int, x, counts) -> torch.Tensor:
        """``||h||^2`` per row of ``x`` (rows grouped by expert, ``counts`` rows each)."""
        module = self.adapter.experts_module(layer)
        gate_up = getattr(module, "gate_up_proj", None)
        fused = gate_up is not None and gate_up.dim() == 3 and gate_up.shape[-1] == x.shape[-1]
        if fused and x.dtype == gate_up.dtype == torch.float32:
            offs = counts.cumsum(0).to(torch.int32)
            gu = torch.nn.functional.grouped_mm(x, gate_up.detach().transpose(-2, -1), offs=offs)  # [N*k, 2I]
            gate, up = gu.chunk(2, dim=-1)
            return (module.act_fn(gate) * up).pow(2).sum(-1)
        out, start = [], 0
        for j, n in enumerate(counts.tolist()):
            if n:
                w = self.adapter.expert_weights(ExpertRef(layer, j))
                xs = x[start:start + n]
                out.append((module.act_fn(xs @ w["gate"].float().t()) * (xs @ w["up"].float().t())).pow(2).sum(-1))
            start += n
        return torch.cat(out) if out else x.new_zeros(0)

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
    """Cosine similarity of flattened expert weights; each expert keeps its ``k`` nearest neighbours.

    The Gram matrix of the flattened experts is summed over row blocks of each matrix (float64), so no copy of
    the layer's experts is made: a few MiB at a time."""
    refs = [ExpertRef(layer, j) for j in range(adapter.num_experts(layer))]
    weights = [adapter.expert_weights(r) for r in refs]
    gram = torch.zeros(len(refs), len(refs), dtype=torch.float64)
    for m in MATRICES:
        rows, cols = weights[0][m].shape
        step = max(1, SIMILARITY_BLOCK // (8 * cols * len(refs)))
        for r0 in range(0, rows, step):
            block = torch.stack([w[m][r0:r0 + step].detach().double().flatten() for w in weights])
            gram += block @ block.t()
    norm = gram.diagonal().clamp(min=1e-300).sqrt()
    sim = (gram / norm[:, None] / norm[None, :]).float()
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
                  progress: bool = True, curvature: tuple[str, ...] = (), probes: int = 32,
                  tolerance: float = 0.1, ablation: bool = False) -> Profile:
    """Profile every expert of ``loaded`` on ``batches``. Example: ``profile_model(open_model("demo"), ...)``.

    ``curvature`` adds loss-curvature sources from ``curvature.SOURCES`` ("hessian", "fisher",
    "gauss-newton") to every node's ``trace``; ``ablation`` fills ``node.ablation`` (one loss per expert
    and width: small models only).
    """
    torch.manual_seed(seed)
    settings = {"bits": sorted(bits), "group_size": group_size, "symmetric": symmetric,
                "clip_search": clip_search, "seed": seed}
    if curvature:
        settings.update(curvature=list(curvature), probes=probes, tolerance=tolerance)
    rec, loss = run_calibration(loaded, batches, progress)
    total = calibration["tokens"]
    refs = loaded.adapter.experts()
    nodes = [expert_node(loaded.adapter, r, rec, total, settings)
             for r in tqdm(refs, desc="quant error", unit="expert", disable=not progress)]
    add_curvature(loaded.adapter, batches, nodes, curvature, probes, tolerance, seed)
    if ablation:
        add_ablation(loaded.adapter, batches, nodes, settings)
    edges = [e for layer in loaded.adapter.moe_layers() for e in similarity_edges(loaded.adapter, layer)]
    meta = ProfileMeta(model_id=loaded.model_id, family=loaded.adapter.family, config_hash=loaded.config_hash,
                       calibration=dict(calibration, loss=loss), settings=settings, top_k=loaded.adapter.top_k(),
                       non_expert_bytes=non_expert_bytes(loaded))
    return Profile(meta=meta, experts=nodes, edges=edges)


def add_curvature(adapter, batches, nodes: list[ExpertNode], sources, probes: int, tolerance: float, seed: int) -> None:
    """Add each requested loss-curvature source (see ``curvature.py``) to every node and redo sensitivity."""
    from .curvature import curvature_traces

    if not sources:
        return
    traces = curvature_traces(adapter, batches, list(sources), probes, tolerance, seed)
    for node in nodes:
        ref = ExpertRef(node.layer, node.expert, node.shared)
        for source, by_ref in traces.items():
            node.trace[source] = by_ref[ref]
        add_sensitivity(node)


def add_ablation(adapter, batches, nodes: list[ExpertNode], settings: dict) -> None:
    from .curvature import ablation

    refs = [ExpertRef(n.layer, n.expert, n.shared) for n in nodes]
    losses = ablation(adapter, batches, refs, settings["bits"], settings["group_size"], settings["symmetric"],
                      settings["clip_search"])
    for node, ref in zip(nodes, refs):
        node.ablation = losses[ref]
