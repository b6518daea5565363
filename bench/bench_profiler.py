"""Profiler costs on the demo model: layer-local overhead, curvature costs, Hutchinson ranking stability.

Run: ``OMP_NUM_THREADS=1 python bench/bench_profiler.py [--model demo|DIR] [--probes 64]``

Prints
- the layer-local ("hessian-local") overhead: calibration forward with RoutingRecorder / plain forward;
- each curvature source's cost relative to one forward+backward pass over the calibration set;
- Spearman rank correlation of expert traces between two disjoint halves of the probes, per probe count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from mopeq.models import open_model
from mopeq.profiler import curvature as cv
from mopeq.profiler.calibration import demo_batches
from mopeq.profiler.profile import run_calibration


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(a, b, repeat: int = 7) -> tuple[float, float]:
    """Minimum times of ``a`` and ``b`` run alternately (the machine is shared; minima are stable)."""
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(timed(a, 1))
        tb.append(timed(b, 1))
    return min(ta), min(tb)


def plain_forward(adapter, batches):
    with torch.no_grad():
        for b in batches:
            adapter.loss(b)


def forward_backward(adapter, batches):
    blocks = cv.expert_blocks(adapter)
    with cv.expert_grads_only(adapter.model, blocks.params):
        for b in batches:
            torch.autograd.grad(adapter.loss(b), blocks.params, allow_unused=True)


def probe_samples(adapter, batches, source: str, probes: int, seed: int = 0) -> torch.Tensor:
    """``[probes, experts]`` raw Hutchinson samples."""
    blocks = cv.expert_blocks(adapter)
    gen = torch.Generator().manual_seed(seed)
    with cv.expert_grads_only(adapter.model, blocks.params):
        if source == "hessian":
            chunks = [cv.hessian_probe_block(adapter, batches, blocks,
                                             [[cv.rademacher(p, gen) for p in blocks.params] for _ in range(8)])
                      for _ in range(probes // 8)]
        else:
            chunks = [cv.gauss_newton_probe_block(adapter, batches, blocks, 8, gen) for _ in range(probes // 8)]
    return torch.cat(chunks).sum(-1)


def stability(samples: torch.Tensor) -> dict[int, float]:
    """Spearman correlation of per-expert means over probes [0, n) and [n, 2n)."""
    out, n = {}, 2
    while 2 * n <= samples.shape[0]:
        out[n] = float(spearmanr(samples[:n].mean(0), samples[n:2 * n].mean(0)).statistic)
        n *= 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--probes", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = open_model(args.model)
    batches = demo_batches(loaded.config)
    adapter = loaded.adapter
    t_fwd, t_rec = interleaved(lambda: plain_forward(adapter, batches),
                               lambda: run_calibration(loaded, batches, progress=False))
    t_fb = timed(lambda: forward_backward(adapter, batches))
    print(f"model {args.model}: {len(batches)} calibration batches, {len(adapter.experts())} experts")
    print(f"plain forward {t_fwd:.3f} s; forward+backward {t_fb:.3f} s ({t_fb / t_fwd:.2f}x forward)")
    print(f"layer-local overhead: calibration forward with RoutingRecorder / plain forward = {t_rec / t_fwd:.3f}")
    cost_report(adapter, batches, t_fb)
    for source in ("hessian", "gauss-newton"):
        samples = probe_samples(adapter, batches, source, args.probes)
        line = ", ".join(f"{n}: {r:.3f}" for n, r in stability(samples).items())
        print(f"{source} ranking stability (probes per half: Spearman) {line}")


def cost_report(adapter, batches, t_fb: float) -> None:
    runs = {"hessian (per probe)": (lambda: cv.hessian_trace(adapter, batches, 8, 0.0, 8), 8),
            "gauss-newton (per probe)": (lambda: cv.gauss_newton_trace(adapter, batches, 8, 0.0, 8), 8),
            "fisher (exact, total)": (lambda: cv.fisher_trace(adapter, batches), 1)}
    for name, (fn, per) in runs.items():
        t = timed(fn, repeat=1) / per
        print(f"cost {name}: {t:.3f} s = {t / t_fb:.2f}x forward+backward")


if __name__ == "__main__":
    main()
