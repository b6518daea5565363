"""Curvature of the real calibration loss restricted to each expert's weights.

The loss is the token-weighted mean next-token cross-entropy over the whole calibration set,
``L = sum_b (n_b / M) * loss_b`` (``loss_b`` = ``adapter.loss(batch)``, the mean over the ``n_b`` scored
tokens of batch ``b``; ``M = sum_b n_b``); images are part of the batch for the VLM. For an expert ``e``
with weights ``theta_e`` (its gate, up and down matrices) three traces are estimated:

``hessian``       ``tr(H_ee)``, ``H = d^2 L / d theta^2``, by Hutchinson: ``E[v_e^T (H v)_e]`` with one
                  Rademacher vector ``v`` over *all* expert parameters (the fused ``[E, 2I, H]`` /
                  ``[E, H, I]`` tensors and shared-expert matrices) and ``H v`` by double backward. The
                  cross terms ``v_e^T H_ef v_f`` have zero mean, so every expert is estimated from the same
                  probes: the cost is per probe, not per expert. Blocks are indefinite; error bars matter.
``fisher``        empirical Fisher, exact: ``(1/M) sum_s ||grad_e l_s||^2`` where ``l_s`` is the summed
                  token cross-entropy of one calibration sequence (window) ``s``. Dividing by ``M`` puts
                  it on the scale of ``H`` (it equals the per-token empirical Fisher of ``L`` when a
                  window's token gradients are uncorrelated). One backward per sequence.
``gauss-newton``  ``tr(J_e^T H_out J_e)``, ``J`` = d logits / d theta, ``H_out`` = Hessian of ``L`` in the
                  logits: per scored token ``(1/M)(diag(p) - p p^T) = (1/M) B B^T`` with
                  ``B = diag(sqrt p) - p sqrt(p)^T``. With Rademacher ``u`` over (token, vocab),
                  ``E ||J_e^T B u||^2 = tr(J_e^T B B^T J_e)``: one backward per probe and batch with
                  output gradient ``(sqrt p * u - p <sqrt p, u>) / sqrt M``, reusing the forward. Every
                  sample is ``>= 0`` (the estimate of a PSD matrix's trace).

Experts that receive no calibration token do not influence the loss: their gradient and curvature
are exactly zero, so every source reports ``mean = 0, stderr = 0`` for them (finite, never NaN).

Hutchinson stops when every expert's standard error is below ``tolerance * |mean|`` (an expert with
``stderr == 0`` counts as converged) or at ``max_probes``; probes run in blocks of ``block`` that
share one forward and first backward per batch.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch

from ..models.base import MATRICES, ExpertRef, MoEAdapter
from ..schemas import InputError, Trace


class CurvatureSource(str, Enum):
    HESSIAN = "hessian"
    FISHER = "fisher"
    GAUSS_NEWTON = "gauss-newton"


SOURCES = tuple(s.value for s in CurvatureSource)


def parse_sources(text: str) -> list[str]:
    """``"hessian,fisher"`` -> ``["hessian", "fisher"]``; raises InputError for unknown names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in SOURCES]
    if bad:
        raise InputError(f"--curvature: got {', '.join(bad)}, expected a comma-separated subset of {', '.join(SOURCES)}")
    return names


# --- expert blocks as views into the parameters ------------------------------------------------------

@dataclass
class ExpertBlocks:
    """Every expert parameter once, and each expert matrix as ``(param index, shape, stride, offset)``."""

    params: list[torch.nn.Parameter]
    refs: list[ExpertRef]
    views: list[list[tuple[int, tuple, tuple, int]]]  # [expert][matrix] in MATRICES order

    def take(self, tensors: list[torch.Tensor], expert: int, matrix: int) -> torch.Tensor:
        """The matrix of ``expert`` inside ``tensors`` (laid out like ``params``)."""
        index, shape, stride, offset = self.views[expert][matrix]
        t = tensors[index].contiguous()
        return t.as_strided(shape, stride, t.storage_offset() + offset)

    def restrict(self, fn, *tensor_lists) -> torch.Tensor:
        """``[experts, 3]``: ``fn`` applied to each expert matrix of the given param-shaped tensors."""
        return torch.tensor([[float(fn(*(self.take(t, e, m) for t in tensor_lists))) for m in range(len(MATRICES))]
                             for e in range(len(self.refs))], dtype=torch.float64)


def expert_blocks(adapter: MoEAdapter, refs: list[ExpertRef] | None = None) -> ExpertBlocks:
    """Collect expert parameters (fused or per-expert) and locate each expert matrix as a strided view."""
    refs = adapter.experts() if refs is None else refs
    params, where, views = [], {}, []
    for ref in refs:
        for p in adapter.expert_parameters(ref):
            if id(p) not in where:
                assert p.is_contiguous(), "expert parameters must be contiguous"
                where[id(p)] = len(params)
                params.append(p)
        views.append([_locate(params, adapter.expert_weights(ref)[m]) for m in MATRICES])
    return ExpertBlocks(params, refs, views)


def _locate(params, view: torch.Tensor) -> tuple[int, tuple, tuple, int]:
    ptr = view.untyped_storage().data_ptr()
    for i, p in enumerate(params):
        if p.untyped_storage().data_ptr() == ptr:
            return i, tuple(view.shape), tuple(view.stride()), view.storage_offset() - p.storage_offset()
    raise AssertionError("expert matrix is not a view of an expert parameter")


@contextmanager
def expert_grads_only(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Turn off gradients of every non-expert parameter (cheaper backward); restore afterwards."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _grad(outputs, params, grad_outputs=None, **kw):
    return torch.autograd.grad(outputs, params, grad_outputs, allow_unused=True, materialize_grads=True, **kw)


# --- the calibration loss ------------------------------------------------------------------------------

def scored_logits(adapter: MoEAdapter, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, V]`` (float) and labels ``[N]`` of the scored tokens, shifted as ``adapter.loss`` does."""
    return shift_scored(batch, adapter.forward(batch))


def shift_scored(batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored rows of ``logits`` ``[B, T, V]`` and their labels (next tokens, or ``batch["labels"]``)."""
    labels = batch.get("labels")
    if labels is None:
        labels, logits = batch["input_ids"][:, 1:], logits[:, :-1]
    keep = labels.reshape(-1) != -100
    return logits.reshape(-1, logits.shape[-1])[keep].float(), labels.reshape(-1)[keep]


def scored_tokens(batch: dict) -> int:
    labels = batch.get("labels")
    if labels is None:
        return int(batch["input_ids"][:, 1:].numel())
    return int((labels != -100).sum())


def total_tokens(batches: list[dict]) -> int:
    total = sum(scored_tokens(b) for b in batches)
    if total == 0:
        raise InputError("calibration: no scored tokens (every label is -100)")
    return total


def sample_batches(batch: dict) -> list[dict]:
    """One batch per sequence (window), keeping images and labels aligned."""
    out = []
    for s in range(batch["input_ids"].shape[0]):
        out.append({k: (v[s:s + 1] if torch.is_tensor(v) else v) for k, v in batch.items()})
    return out


# --- Hutchinson on the Hessian ---------------------------------------------------------------------------

def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like.dtype)


def probe_generator(seed: int, probe: int, layer: int, index: int) -> torch.Generator:
    """The generator of Hessian probe ``probe`` on expert parameter ``index`` of ``layer``: one per tensor, so
    the layer-streamed profiler draws, one layer at a time, exactly the probes the in-memory one draws."""
    digest = hashlib.sha256(f"mopeq-probe/{seed}/{probe}/{layer}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def layer_probe(params: list[torch.Tensor], seed: int, probe: int, layer: int) -> list[torch.Tensor]:
    """Probe ``probe``'s Rademacher vectors on one layer's expert parameters (``expert_blocks`` order)."""
    return [rademacher(p, probe_generator(seed, probe, layer, i)) for i, p in enumerate(params)]


def probe_keys(adapter, blocks: ExpertBlocks) -> list[tuple[int, int]]:
    """``(layer, index within the layer's expert parameters)`` of every parameter of ``blocks``."""
    keys = {}
    for layer in sorted({r.layer for r in blocks.refs}):
        per_layer = expert_blocks(adapter, [r for r in blocks.refs if r.layer == layer])
        keys.update({id(p): (layer, i) for i, p in enumerate(per_layer.params)})
    return [keys[id(p)] for p in blocks.params]


def hessian_probe_block(adapter, batches, blocks: ExpertBlocks, probes: list[list[torch.Tensor]]) -> torch.Tensor:
    """``[len(probes), experts, 3]`` samples ``v_e^T (H v)_e``; one forward + backward per batch for the block."""
    m = total_tokens(batches)
    hv = [[torch.zeros_like(p) for p in blocks.params] for _ in probes]
    for batch in batches:
        loss = adapter.loss(batch) * (scored_tokens(batch) / m)
        grads = _grad(loss, blocks.params, create_graph=True)
        for k, v in enumerate(probes):
            dot = sum((g * vi).sum() for g, vi in zip(grads, v))
            for acc, h in zip(hv[k], _grad(dot, blocks.params, retain_graph=True)):
                acc += h.detach()
    return torch.stack([blocks.restrict(lambda a, b: (a * b).sum(), v, h) for v, h in zip(probes, hv)])


def summarize(samples: torch.Tensor, refs: list[ExpertRef]) -> dict[ExpertRef, Trace]:
    """Per-expert ``Trace`` from ``[probes, experts, 3]`` samples: mean, stderr of the mean, per-matrix means."""
    n = samples.shape[0]
    totals = samples.sum(-1)  # [probes, experts]
    mean = totals.mean(0)
    stderr = totals.std(0, correction=1) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    per = samples.mean(0)
    return {ref: Trace(mean=float(mean[i]), stderr=float(stderr[i]), probes=n,
                       per_matrix={m: float(per[i, j]) for j, m in enumerate(MATRICES)})
            for i, ref in enumerate(refs)}


def converged(samples: torch.Tensor, tolerance: float) -> bool:
    traces = summarize(samples, list(range(samples.shape[1])))
    return all(t.stderr <= tolerance * abs(t.mean) for t in traces.values())


def hutchinson(adapter, batches, probe_block_fn, max_probes: int = 32, tolerance: float = 0.1,
               block: int = 8, seed: int = 0, refs=None) -> dict[ExpertRef, Trace]:
    """Run ``probe_block_fn`` in blocks of Rademacher probes until converged or ``max_probes``."""
    blocks = expert_blocks(adapter, refs)
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    with expert_grads_only(adapter.model, blocks.params):
        while sum(len(c) for c in chunks) < max_probes:
            k = min(block, max_probes - sum(len(c) for c in chunks))
            chunks.append(probe_block_fn(adapter, batches, blocks, k, gen))
            if converged(torch.cat(chunks), tolerance):
                break
    return summarize(torch.cat(chunks), blocks.refs)


def hessian_trace(adapter, batches, max_probes: int = 32, tolerance: float = 0.1, block: int = 8,
                  seed: int = 0, refs=None) -> dict[ExpertRef, Trace]:
    """Hutchinson ``tr(H_ee)`` of the calibration loss for every expert. Example: ``hessian_trace(a, batches)``.

    Probes are drawn per layer and tensor (``probe_generator``), as the layer-streamed profiler draws them."""
    drawn = []

    def run(adapter, batches, blocks, k, gen):
        keys = probe_keys(adapter, blocks)
        probes = [[rademacher(p, probe_generator(seed, len(drawn) + j, *key)) for p, key in zip(blocks.params, keys)]
                  for j in range(k)]
        drawn.extend(range(k))
        return hessian_probe_block(adapter, batches, blocks, probes)
    return hutchinson(adapter, batches, run, max_probes, tolerance, block, seed, refs)


# --- Gauss-Newton ----------------------------------------------------------------------------------------

def softmax_root_times(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``B u`` with ``B = diag(sqrt p) - p sqrt(p)^T`` per row, so that ``B B^T = diag(p) - p p^T``."""
    root = probs.sqrt()
    return root * u - probs * (root * u).sum(-1, keepdim=True)


def gauss_newton_probe_block(adapter, batches, blocks: ExpertBlocks, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[k, experts, 3]`` samples ``sum_b ||(J_b^T B_b u_b)_e||^2 / M``; one forward per batch for the block."""
    m = total_tokens(batches)
    out = torch.zeros(k, len(blocks.refs), len(MATRICES), dtype=torch.float64)
    for batch in batches:
        logits, _ = scored_logits(adapter, batch)
        probs = logits.detach().softmax(-1)
        for j in range(k):
            u = rademacher(logits, gen)
            grads = _grad(logits, blocks.params, softmax_root_times(probs, u) / math.sqrt(m), retain_graph=True)
            out[j] += blocks.restrict(lambda g: g.pow(2).sum(), grads)
    return out


def gauss_newton_trace(adapter, batches, max_probes: int = 32, tolerance: float = 0.1, block: int = 8,
                       seed: int = 0, refs=None) -> dict[ExpertRef, Trace]:
    """Hutchinson ``tr(J_e^T H_out J_e)`` for every expert (PSD; see the module docstring)."""
    return hutchinson(adapter, batches, gauss_newton_probe_block, max_probes, tolerance, block, seed, refs)


# --- empirical Fisher ------------------------------------------------------------------------------------

def fisher_trace(adapter, batches, refs=None) -> dict[ExpertRef, Trace]:
    """Exact empirical Fisher trace ``(1/M) sum_s ||grad_e l_s||^2`` per expert, one backward per sequence."""
    blocks = expert_blocks(adapter, refs)
    m = total_tokens(batches)
    acc = torch.zeros(len(blocks.refs), len(MATRICES), dtype=torch.float64)
    with expert_grads_only(adapter.model, blocks.params):
        for batch in batches:
            for sample in sample_batches(batch):
                n = scored_tokens(sample)
                if n == 0:
                    continue
                grads = _grad(adapter.loss(sample) * n, blocks.params)
                acc += blocks.restrict(lambda g: g.double().pow(2).sum(), grads)
    acc /= m
    return {ref: Trace(mean=float(acc[i].sum()), stderr=0.0, probes=0,
                       per_matrix={mat: float(acc[i, j]) for j, mat in enumerate(MATRICES)})
            for i, ref in enumerate(blocks.refs)}


ESTIMATORS = {
    CurvatureSource.HESSIAN.value: hessian_trace,
    CurvatureSource.GAUSS_NEWTON.value: gauss_newton_trace,
}


def curvature_traces(adapter, batches, sources: list[str], max_probes: int = 32, tolerance: float = 0.1,
                     seed: int = 0) -> dict[str, dict[ExpertRef, Trace]]:
    """Every requested source for every expert: ``{source: {ref: Trace}}``."""
    out = {}
    for source in sources:
        if source == CurvatureSource.FISHER.value:
            out[source] = fisher_trace(adapter, batches)
        else:
            out[source] = ESTIMATORS[source](adapter, batches, max_probes, tolerance, seed=seed)
    return out


# --- reference: one-expert quantization ablation ---------------------------------------------------------

@torch.no_grad()
def calibration_loss(adapter, batches) -> float:
    """The token-weighted mean cross-entropy ``L`` over all calibration batches."""
    m = total_tokens(batches)
    return sum(float(adapter.loss(b)) * scored_tokens(b) / m for b in batches)


@torch.no_grad()
def ablation(adapter, batches, refs, bits, group_size: int, symmetric: bool = False,
             clip_search: bool = False) -> dict[ExpertRef, dict[str, float]]:
    """``L(expert e alone quantized to b bits) - L`` for every expert and width (one pass each; small models)."""
    from ..compiler.quantize import fake_quantize

    base = calibration_loss(adapter, batches)
    out = {}
    for ref in refs:
        original = {m: w.detach().clone() for m, w in adapter.expert_weights(ref).items()}
        out[ref] = {}
        for b in bits:
            adapter.set_expert_weights(ref, {m: fake_quantize(w.float(), b, group_size, symmetric, clip_search)
                                             for m, w in original.items()})
            out[ref][str(b)] = calibration_loss(adapter, batches) - base
        adapter.set_expert_weights(ref, original)
    return out
