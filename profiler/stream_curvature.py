"""Loss curvature with one decoder layer resident: a backward sweep from the last layer to the first.

The forward sweep of the layer-streamed profiler keeps every layer's input (its *boundary
activations*: in RAM, or in a scratch folder when they do not fit). A backward sweep then starts at
the head (resident with everything outside the layers) with one cotangent per *stream* and walks the
layers down: reload layer ``l``, recompute its forward from the stored input with gradients, backpropagate
each stream's cotangent, accumulate each expert's squared gradient norms, and hand the input gradient to
layer ``l - 1``. Peak memory: weights outside the layers + one layer + the boundary activations + one
stream's graph.

* ``fisher``: one stream per calibration sequence, cotangent ``d (n_s * loss_s) / d h_L``; exact, like
  ``curvature.fisher_trace``.
* ``gauss-newton``: one stream per (probe, batch), cotangent from the output gradient
  ``(sqrt p * u - p <sqrt p, u>) / sqrt M`` through head and final norm; the Rademacher ``u`` are drawn
  in exactly the in-memory order (``curvature.gauss_newton_probe_block``), so with the same seed the
  streamed traces equal the in-memory ones up to float rounding. One sweep per probe block; the stopping
  rule (``curvature.converged``) is checked between blocks, as in memory.
* ``hessian``: Hutchinson ``v^T H v`` per expert, with the probes ``curvature.layer_probe`` draws (the
  in-memory ones, tensor by tensor). A forward sweep carries each probe's tangent ``t_l`` (stored beside
  the boundary activations); at the head the gradient ``g_L`` and its tangent ``H_out t_L``; the backward
  sweep differentiates each layer's pullback along ``(v_l, t_l, dg_{l+1})``: its parameter part is
  ``(H v)_l``, its input part the tangent handed down (see ``hessian_block``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..models.base import MATRICES, ExpertRef
from ..schemas import InputError, Trace, atomic_write
from .curvature import (CurvatureSource, converged, expert_blocks, layer_probe, rademacher, sample_batches,
                        scored_tokens, softmax_root_times, summarize, total_tokens)
from .stream import release_heap
from .streamed_experts import GradNormSink, StreamedExperts

STREAMED_SOURCES = tuple(s.value for s in CurvatureSource)


class BoundaryStore:
    """Each decoder layer's input for every calibration batch: in RAM, or one safetensors file per layer."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.ram: dict[int, list[torch.Tensor]] = {}

    def put(self, layer: int, hidden: list[torch.Tensor]) -> None:
        if self.folder is None:
            self.ram[layer] = [h.detach() for h in hidden]
            return
        tensors = {f"batch{i}": h.detach().contiguous() for i, h in enumerate(hidden)}
        atomic_write(self.folder / f"input-{layer:05d}.safetensors", lambda tmp: save_file(tensors, str(tmp)))

    def get(self, layer: int):
        """The batches' inputs of ``layer``: a list, or (on disk) a sequence reading one batch per access."""
        if self.folder is None:
            return self.ram[layer]
        return _OnDisk(self.folder / f"input-{layer:05d}.safetensors")

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for hs in self.ram.values() for h in hs)


class _OnDisk:
    """``batch{i}`` tensors of a safetensors file, each read when indexed."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(str(path), "pt") as f:
            self.count = len(list(f.keys()))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(f"batch{i}")


class SweepCheckpoint:
    """Resume points of the curvature sweeps under ``folder`` (``--resume DIR/curvature``); None: no files.

    Each finished probe block (or the Fisher sweep) is ``{tag}.safetensors`` (its samples); inside a
    backward sweep, every finished layer writes its sums ``{tag}-sums-NNNNN`` first, then replaces
    ``{tag}-cotangents`` (the streams' cotangents, tagged with the layer: the commit point), both
    atomically; a rerun continues below the last finished layer."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    def write(self, name: str, tensors: dict, meta: dict | None = None) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(self.folder / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp), meta))

    def read(self, name: str) -> dict | None:
        path = self.folder / f"{name}.safetensors" if self.folder else None
        return load_file(str(path)) if path is not None and path.is_file() else None

    def block(self, tag: str) -> torch.Tensor | None:
        found = self.read(tag)
        return None if found is None else found["samples"]

    def finish_block(self, tag: str, samples: torch.Tensor) -> torch.Tensor:
        if self.folder is not None:
            self.write(tag, {"samples": samples})
            for path in self.folder.glob(f"{tag}-*.safetensors"):
                path.unlink()
        return samples

    def resume_sweep(self, tag: str, streams: list["Stream"]) -> tuple[int | None, dict[int, torch.Tensor]]:
        """The lowest finished layer of sweep ``tag`` (None: none) with every finished layer's sums; the streams'
        cotangents are set to where it stopped."""
        saved = self.read(f"{tag}-cotangents")
        if saved is None:
            return None, {}
        with safe_open(str(self.folder / f"{tag}-cotangents.safetensors"), "pt") as f:
            lowest = int(f.metadata()["layer"])
        for i, stream in enumerate(streams):
            if stream.folder is None:
                stream.set(saved[f"s{i}"], lowest)
            elif not stream.file(lowest).is_file():
                raise InputError(f"{stream.file(lowest)}: missing from the resume folder; use a fresh --resume folder")
            else:
                stream.path = stream.file(lowest)
        sums = {}
        for path in self.folder.glob(f"{tag}-sums-*.safetensors"):
            layer = int(path.stem.rsplit("-", 1)[1])
            if layer >= lowest:
                sums[layer] = load_file(str(path))["sums"]
        return lowest, sums

    def finish_layer(self, tag: str, layer: int, sums: torch.Tensor, streams: list["Stream"]) -> None:
        if self.folder is None:
            return
        self.write(f"{tag}-sums-{layer:05d}", {"sums": sums})
        in_ram = {f"s{i}": s.cotangent for i, s in enumerate(streams) if s.folder is None}  # else in their files
        self.write(f"{tag}-cotangents", in_ram or {"none": torch.zeros(0)}, {"layer": str(layer)})


class Stream:
    """One backward pass through the layers: which batch (and sequence), where it adds up, and its cotangent at the
    current layer boundary: in RAM, or (``folder`` given) in one file per layer, ``L{layer}-s{index}``, so that
    only the streams of one batch are in memory at a time. Files of the boundary above are kept until
    ``drop_previous`` (after the sweep's resume point has moved past them)."""

    def __init__(self, batch: int, rows: slice | None, cotangent: torch.Tensor, slot: int,
                 folder: Path | None = None, index: int = 0):
        self.batch, self.rows, self.slot = batch, rows, slot  # rows: one sequence (fisher) or None (whole batch)
        self.folder, self.index = folder, index
        self.value: torch.Tensor | None = None
        self.path: Path | None = None
        self.previous: Path | None = None
        self.set(cotangent, HEAD)

    def file(self, layer: int) -> Path:
        return self.folder / f"L{layer:05d}-s{self.index:06d}.safetensors"

    @property
    def cotangent(self) -> torch.Tensor:
        return self.value if self.folder is None else load_file(str(self.path))["c"]

    def set(self, value: torch.Tensor, layer: int) -> None:
        """The cotangent at layer ``layer``'s input (``HEAD``: at the last hidden state)."""
        if self.folder is None:
            self.value = value
            return
        path = atomic_write(self.file(layer), lambda tmp: save_file({"c": value.contiguous()}, str(tmp)))
        self.previous, self.path = self.path, path

    def drop_previous(self) -> None:
        if self.previous is not None and self.previous != self.path:
            self.previous.unlink(missing_ok=True)
        self.previous = None


HEAD = 99999  # the layer index of the cotangents at the last hidden state


def backward_sweep(streamer, store: BoundaryStore, streams: list[Stream], slots: int,
                   checkpoint: SweepCheckpoint | None = None, tag: str = "") -> dict[ExpertRef, torch.Tensor]:
    """``{ref: [slots, 3]}`` sums of squared gradient norms per expert matrix, one layer resident at a time."""
    adapter = streamer.adapter
    checkpoint = checkpoint or SweepCheckpoint(None)
    lowest, finished = checkpoint.resume_sweep(tag, streams)
    acc: dict[ExpertRef, torch.Tensor] = {}
    for layer in reversed(range(len(adapter.decoder_layers()))):
        refs = [r for r in adapter.experts() if r.layer == layer]
        if lowest is not None and layer >= lowest:
            sums = finished[layer]
        else:
            sums = _layer_sums(streamer, store, streams, slots, layer, refs)
            checkpoint.finish_layer(tag, layer, sums, streams)
            for stream in streams:
                stream.drop_previous()
        for i, ref in enumerate(refs):
            acc[ref] = sums[:, i]
    return acc


def _layer_sums(streamer, store: BoundaryStore, streams: list[Stream], slots: int, layer: int, refs) -> torch.Tensor:
    """``[slots, experts of the layer, 3]``; each stream's cotangent moves to the layer's input."""
    adapter = streamer.adapter
    module = streamer.load_layer(layer)
    sink, routed = None, []
    if isinstance(experts := adapter.experts_module(layer) if refs else None, StreamedExperts):
        sink = experts.sink = GradNormSink(experts.num_experts)  # routed experts: norms without full gradients
        routed = [i for i, r in enumerate(refs) if not r.shared]
    rest = [r for r in refs if sink is None or r.shared]
    blocks = expert_blocks(adapter, rest) if rest else None
    params = blocks.params if blocks else []
    keep = {id(p) for p in params}
    for p in module.parameters():
        p.requires_grad_(id(p) in keep)
    inputs = store.get(layer)
    sums = torch.zeros(slots, len(refs), len(MATRICES), dtype=torch.float64)
    where = [i for i, r in enumerate(refs) if r in rest]
    groups: dict[tuple, list[Stream]] = {}  # streams on the same rows share one forward
    for stream in streams:
        rows = (stream.rows.start, stream.rows.stop) if stream.rows is not None else None
        groups.setdefault((stream.batch, rows), []).append(stream)
    with torch.enable_grad():
        for (batch, _), group in groups.items():
            x = inputs[batch] if group[0].rows is None else inputs[batch][group[0].rows]
            x = x.detach().requires_grad_(True)
            out = streamer.run_layer(layer, x)
            for i, stream in enumerate(group):
                grads = torch.autograd.grad(out, [x, *params], stream.cotangent, allow_unused=True,
                                            materialize_grads=True, retain_graph=i < len(group) - 1)
                stream.set(grads[0].detach(), layer)
                if blocks:
                    sums[stream.slot, where] += blocks.restrict(lambda g: g.double().pow(2).sum(), list(grads[1:]))
                if sink is not None:
                    sums[stream.slot, routed] += sink.take()[[refs[i].expert for i in routed]]
            del out, x, grads
            release_heap()
    streamer.unload_layer(layer)
    return sums


def head_streams_fisher(streamer, batches, last: list[torch.Tensor], folder: Path | None = None) -> list[Stream]:
    """One stream per scored sequence: the gradient of its summed token loss at the last hidden state."""
    streams = []
    for b, batch in enumerate(batches):
        for s, sample in enumerate(sample_batches(batch)):
            n = scored_tokens(sample)
            if n == 0:
                continue
            h = last[b][s:s + 1].detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(streamer.loss(sample, h) * n, h)
            streams.append(Stream(b, slice(s, s + 1), grad, 0, folder, len(streams)))
    return streams


def head_streams_gauss_newton(streamer, batches, last: list[torch.Tensor], k: int, gen: torch.Generator,
                              folder: Path | None = None) -> list[Stream]:
    """``k`` probes per batch, drawn in the in-memory order; cotangents through head and final norm."""
    m = total_tokens(batches)
    streams = []
    for b, batch in enumerate(batches):
        h = last[b].detach().requires_grad_(True)
        with torch.enable_grad():
            logits, _ = streamer.scored_logits(batch, h)
            probs = logits.detach().softmax(-1)
            for j in range(k):
                u = rademacher(logits, gen)
                (grad,) = torch.autograd.grad(logits, h, softmax_root_times(probs, u) / math.sqrt(m),
                                              retain_graph=True)
                streams.append(Stream(b, None, grad, j, folder, len(streams)))
    return streams


def streamed_curvature(streamer, batches, store: BoundaryStore, last: list[torch.Tensor], sources: list[str],
                       max_probes: int = 32, tolerance: float = 0.1, block: int = 8, seed: int = 0,
                       checkpoint: Path | None = None) -> dict[str, dict[ExpertRef, Trace]]:
    """``{source: {ref: Trace}}`` (see the module docstring); ``checkpoint``: a folder to resume from."""
    out = {}
    refs = streamer.adapter.experts()
    saved = SweepCheckpoint(checkpoint)
    for source in sources:
        if source == CurvatureSource.FISHER.value:
            samples = saved.block("fisher")
            if samples is None:
                streams = head_streams_fisher(streamer, batches, last, _cotangent_folder(store, "fisher"))
                acc = backward_sweep(streamer, store, streams, 1, saved, "fisher")
                samples = saved.finish_block("fisher", torch.stack([acc[r] for r in refs], 1))
                _drop_cotangents(store, "fisher")
            m = total_tokens(batches)
            out[source] = {r: _fisher_trace(samples[0, i] / m) for i, r in enumerate(refs)}
            continue
        gen = torch.Generator().manual_seed(seed)
        chunks = []
        while (done := sum(len(c) for c in chunks)) < max_probes:
            k = min(block, max_probes - done)
            tag = f"{source}-probes-{done:05d}"
            samples = saved.block(tag)
            if source == CurvatureSource.HESSIAN.value:
                if samples is None:
                    samples = hessian_block(streamer, batches, store, last, range(done, done + k), seed, saved, tag)
            else:
                folder = _cotangent_folder(store, tag) if samples is None else None
                streams = head_streams_gauss_newton(streamer, batches, last, k, gen, folder)  # draws u in order, always
                if samples is None:
                    acc = backward_sweep(streamer, store, streams, k, saved, tag)
                    samples = torch.stack([acc[r] for r in refs], 1)  # [k, experts, 3]
            chunks.append(saved.finish_block(tag, samples))
            _drop_cotangents(store, tag)
            if converged(torch.cat(chunks), tolerance):
                break
        out[source] = summarize(torch.cat(chunks), refs)
    return out


def _cotangent_folder(store: BoundaryStore, tag: str) -> Path | None:
    """Where a sweep's cotangents go: beside the boundary activations when those are on disk (else RAM)."""
    return None if store.folder is None else store.folder / "cotangents" / tag


def _drop_cotangents(store: BoundaryStore, tag: str) -> None:
    if store.folder is not None:
        shutil.rmtree(store.folder / "cotangents" / tag, ignore_errors=True)


# --- Hessian: forward tangents, then the derivative of each layer's pullback ----------------------------

def _resident(adapter, layer: int, refs, probes: range, seed: int):
    """The resident layer's expert parameters (only they require grad), blocks, and each probe's vectors."""
    module = adapter.decoder_layers()[layer]
    blocks = expert_blocks(adapter, refs) if refs else None
    params = blocks.params if blocks else []
    keep = {id(p) for p in params}
    for p in module.parameters():
        p.requires_grad_(id(p) in keep)
    return params, blocks, [layer_probe(params, seed, j, layer) for j in probes]


def _dot(xs, ys) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))


def _grads(outputs, inputs, cotangent, **kw):
    return torch.autograd.grad(outputs, inputs, cotangent, allow_unused=True, materialize_grads=True, **kw)


def hessian_block(streamer, batches, store: BoundaryStore, last, probes: range, seed: int,
                  checkpoint: SweepCheckpoint | None = None, tag: str = "") -> torch.Tensor:
    """``[len(probes), experts, 3]`` samples ``v_e^T (H v)_e``, equal to ``curvature.hessian_probe_block``.

    Per layer and batch one forward and one backward with ``create_graph`` serve every probe: the forward
    tangent ``t_{l+1} = J_theta v + J_x t_l`` is the derivative, in a dummy cotangent ``u``, of ``<a(u), (t_l, v)>``
    with ``a(u) = J^T u``; going down, with ``phi = <f(theta, x), g>`` the derivative of the pullback along
    ``(v, t_l, dg)`` is ``Hess(phi) (v, t_l) + J^T dg``: its parameter part is ``(H v)_l``, its input part
    ``dg_l``.

    Resume (``checkpoint`` with a folder; the tangents are then on disk beside the layer inputs): the forward
    pass continues at the last layer whose input tangents were written; every finished layer of the backward
    pass commits ``{tag}-hessian`` (the sums so far, ``g`` and ``dg`` at its input), and a rerun continues below it."""
    adapter = streamer.adapter
    refs_all = adapter.experts()
    layers, k = len(adapter.decoder_layers()), len(probes)
    checkpoint = checkpoint or SweepCheckpoint(None)
    tangents = BoundaryStore(store.folder / "tangents" / tag if store.folder else None)
    committed = checkpoint.read(f"{tag}-hessian")
    with torch.enable_grad():
        if committed is None:
            out, g, dg = _hessian_forward(streamer, batches, store, tangents, last, probes, seed)
            lowest = layers
        else:
            lowest = int(committed.pop("layer"))
            out = committed.pop("out")
            g = [committed[f"g{b}"] for b in range(len(batches))]
            dg = [committed[f"dg{i}"] for i in range(len(batches) * k)]
        for layer in reversed(range(lowest)):  # backward: the pullback and its derivative
            streamer.load_layer(layer, float_experts=True)
            refs = [r for r in refs_all if r.layer == layer]
            params, blocks, vs = _resident(adapter, layer, refs, probes, seed)
            ts = tangents.get(layer)
            for b, x in enumerate(store.get(layer)):
                x = x.detach().requires_grad_(True)
                y = streamer.run_layer(layer, x)
                pull = _grads(y, [x, *params], g[b], create_graph=True)
                for j in range(k):
                    i = b * k + j
                    second = _grads(_dot(pull, [ts[i], *vs[j]]), [x, *params], None, retain_graph=True)
                    first = _grads(y, [x, *params], dg[i], retain_graph=True)
                    dg[i] = (second[0] + first[0]).detach()
                    if blocks:
                        hv = [(s_ + f_).detach() for s_, f_ in zip(second[1:], first[1:])]
                        lo = refs_all.index(refs[0])
                        out[j, lo:lo + len(refs)] += blocks.restrict(lambda v, w: (v.double() * w.double()).sum(),
                                                                     vs[j], hv)
                g[b] = pull[0].detach()
            if checkpoint.folder is not None:
                state = {"out": out, "layer": torch.tensor(layer), **{f"g{b}": v for b, v in enumerate(g)},
                         **{f"dg{i}": v for i, v in enumerate(dg)}}
                checkpoint.write(f"{tag}-hessian", state)
            streamer.unload_layer(layer)
    if tangents.folder is not None:
        shutil.rmtree(tangents.folder, ignore_errors=True)
    return out


def _hessian_forward(streamer, batches, store: BoundaryStore, tangents: BoundaryStore, last, probes: range, seed: int):
    """The forward tangents of every (batch, probe) into ``tangents`` (continuing after the last layer whose input
    tangents are on disk), then the head: ``(out, g, dg)`` to start the backward pass from."""
    adapter = streamer.adapter
    refs_all = adapter.experts()
    layers, k = len(adapter.decoder_layers()), len(probes)
    start, t = 0, [torch.zeros_like(h) for h in last for _ in probes]  # [batch * k]: the embedding has no experts
    written = sorted(int(p.stem.split("-")[1]) for p in tangents.folder.glob("input-*.safetensors")) \
        if tangents.folder is not None and tangents.folder.is_dir() else []
    if written:
        start, t = written[-1], list(tangents.get(written[-1]))
    for layer in range(start, layers):
        streamer.load_layer(layer, float_experts=True)
        if layer > start or not written:
            tangents.put(layer, t)
        params, _, vs = _resident(adapter, layer, [r for r in refs_all if r.layer == layer], probes, seed)
        for b, x in enumerate(store.get(layer)):
            x = x.detach().requires_grad_(True)
            y = streamer.run_layer(layer, x)
            u = torch.zeros_like(y, requires_grad=True)
            a = _grads(y, [x, *params], u, create_graph=True)
            for j in range(k):
                t[b * k + j] = _grads(_dot(a, [t[b * k + j], *vs[j]]), [u], None, retain_graph=True)[0].detach()
        streamer.unload_layer(layer)
    m, g, dg = total_tokens(batches), [], []
    for b, batch in enumerate(batches):  # the head: gradient and its tangent H_out t_L
        h = last[b].detach().requires_grad_(True)
        (gb,) = _grads(streamer.loss(batch, h) * (scored_tokens(batch) / m), [h], None, create_graph=True)
        g.append(gb.detach())
        dg += [_grads(_dot([gb], [t[b * k + j]]), [h], None, retain_graph=True)[0].detach() for j in range(k)]
    return torch.zeros(k, len(refs_all), len(MATRICES), dtype=torch.float64), g, dg


def _fisher_trace(per_matrix: torch.Tensor) -> Trace:
    return Trace(mean=float(per_matrix.sum()), stderr=0.0, probes=0,
                 per_matrix={m: float(per_matrix[j]) for j, m in enumerate(MATRICES)})
