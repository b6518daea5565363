"""CPU runtime cost: forward time of the demo artifact (torch path, experts packed) vs. the unquantized model.

Usage: python bench/bench_runtime_cpu.py [--repeats 7] [--plan PLAN.json]
       MOPEQ_NATIVE=0 python bench/bench_runtime_cpu.py   # torch dequantization instead of the native kernel
Compiles the demo model with a mixed 2/3/4/8-bit plan (or the given plan), then times, in one run and
interleaved, a prefill batch and a decode-like step on both models. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mopeq.compiler.artifact import compile_artifact
from mopeq.models import open_model
from mopeq.runtime.load import load
from mopeq.schemas import ExpertPlan, Plan, SolverReport, read_plan


def mixed_plan(loaded) -> Plan:
    bits = {r.id: (4 if r.shared else (2, 3, 3, 4)[r.expert % 4]) for r in loaded.adapter.experts()}
    return Plan(model_id="demo", family=loaded.adapter.family, config_hash=loaded.config_hash, profile_sha256="",
                spec={}, group_size=128, symmetric=False,
                experts={k: ExpertPlan(bits=b, cluster=k) for k, b in bits.items()}, layers={}, totals={},
                solver=SolverReport(backend="fixed", status="feasible", objective=0, bound=0, gap=0, seconds=0))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--plan", type=Path, default=None)
    args = p.parse_args()
    base = open_model("demo")
    plan = read_plan(args.plan) if args.plan else mixed_plan(base)
    with tempfile.TemporaryDirectory() as tmp:
        quant = load(compile_artifact("demo", plan, Path(tmp) / "artifact", progress=False))
    gen = torch.Generator().manual_seed(0)
    cases = {"prefill 16x128": torch.randint(0, 256, (16, 128), generator=gen),
             "decode 1x32": torch.randint(0, 256, (1, 32), generator=gen)}
    from mopeq.compiler import native

    kernel = "native (runtime/dequant.c)" if native.enabled() and native.library() is not None else "torch"
    print(f"torch threads {torch.get_num_threads()}; medians of {args.repeats}; dequantization {kernel}")
    with torch.no_grad():
        for name, ids in cases.items():
            times = {"unquantized": [], "artifact": []}
            for _ in range(args.repeats):  # interleave so both see the same machine load
                for label, model in (("unquantized", base), ("artifact", quant)):
                    times[label] += timed(lambda m=model: m.adapter.forward({"input_ids": ids}), 1)
            a, b = statistics.median(times["unquantized"]), statistics.median(times["artifact"])
            print(f"{name:16s} unquantized {1e3 * a:8.2f} ms   artifact {1e3 * b:8.2f} ms   ratio {b / a:5.2f}x")


if __name__ == "__main__":
    main()
