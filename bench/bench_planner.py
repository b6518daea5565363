"""Planner benchmark: a synthetic DeepSeek-V3-scale problem (58 MoE layers x 256 routed experts + 1
shared, heterogeneous sizes and sensitivities, widths {2, 3, 4}).

Prints solve time and proven gap for a global and a layer-wise budget (median of --repeats runs) and
the time of a 20-point Pareto sweep. Targets: gap <= 1e-6 within 2 s each; sweep within 10 s.

    .venv/bin/python bench/bench_planner.py
"""

import argparse
import statistics
import time

import numpy as np

from mopeq.planner import Spec, make_plan, sweep
from mopeq.schemas import ExpertNode, Profile, ProfileMeta


def synthetic_profile(layers=58, experts=256, seed=0) -> Profile:
    rng = np.random.default_rng(seed)
    nodes = []
    for layer in range(layers):
        for e in range(experts + 1):
            shared = e == experts
            params = int(3 * 7168 * 2048 * (2 if shared else rng.uniform(0.5, 1.5))) // 128 * 128
            trace = float(rng.lognormal(0, 1.5))
            pert = {str(b): float(params * 4.0 ** -b * rng.uniform(0.8, 1.2)) for b in (2, 3, 4)}
            nodes.append(ExpertNode(
                id=f"L{layer}.S0" if shared else f"L{layer}.E{e}", layer=layer, expert=e, shared=shared,
                params=params, shapes={}, bytes={str(b): params * b // 8 + params // 128 * 4 for b in (2, 3, 4)},
                bf16_bytes=2 * params, perturbation=pert,
                sensitivity={"hessian-local": {k: trace * v / params for k, v in pert.items()}}))
    meta = ProfileMeta(model_id="synthetic-deepseek-v3", family="deepseek_v3", config_hash="bench",
                       calibration={}, settings={"bits": [2, 3, 4], "group_size": 128, "symmetric": False}, top_k=8)
    return Profile(meta=meta, experts=nodes, sha256="0" * 64)


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    profile = synthetic_profile()
    routed = sum(not n.shared for n in profile.experts)
    print(f"problem: {len(profile.experts)} experts ({routed} routed + shared) x 3 widths")
    base = {"bits": [2, 3, 4], "budget": {"avg_bits": 2.5}, "pins": [{"match": "L*.S*", "bits": 4}]}
    for scope in ("global", "layer"):
        spec = Spec.model_validate({**base, "scope": scope})
        seconds, plan = timed(lambda: make_plan(spec, profile), args.repeats)
        s = plan.solver
        print(f"{scope:6s}: make_plan {seconds:.3f} s (solve {s.seconds:.3f} s), status {s.status}, "
              f"gap {s.gap:.2e}, backend {s.backend}, avg_bits {plan.totals['avg_bits']:.4f}")
    spec = Spec.model_validate({**base, "sweep": {"avg_bits": {"start": 2.1, "stop": 3.9, "num": 20}}})
    seconds, plans = timed(lambda: sweep(spec, profile), max(1, args.repeats // 2))
    worst = max(p.solver.gap for p in plans)
    optimal = sum(p.solver.status == "optimal" for p in plans)
    print(f"sweep : 20 points in {seconds:.3f} s, {optimal}/20 optimal, worst gap {worst:.2e}")


if __name__ == "__main__":
    main()
