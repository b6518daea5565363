"""Pareto fronts: solve one problem at many budgets, reusing its model (hulls, clusters, costs).

Example::

    plans = sweep(spec, profile)            # spec.sweep, or budgets=[2.25, 2.5, 3.0] (avg bits)
    write_pareto(plans, "pareto/")          # pareto.csv, pareto.json, pareto.png
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mopeq.schemas import InputError, Plan, Profile

from .plan import _as_budget, build_problem, plan_problem
from .spec import Budget, Spec

COLUMNS = ("budget", "budget_bytes", "bytes", "avg_bits", "avg_code_bits", "predicted_loss", "bound", "gap",
           "status", "seconds")


def sweep(spec: Spec, profile: Profile, budgets=None) -> list[Plan]:
    """One plan per budget (Budget, dict, or avg bits); the problem is built once and reused."""
    budgets = sweep_budgets(spec) if budgets is None else [_as_budget(b) for b in budgets]
    problem = build_problem(spec, profile)
    return [plan_problem(problem, budget) for budget in budgets]


def sweep_budgets(spec: Spec) -> list[Budget]:
    if spec.sweep is None:
        raise InputError("sweep: the spec has no sweep section (e.g. sweep: {avg_bits: {start: 2.25, stop: 3.0, num: 4}})")
    return spec.sweep.budgets()


def pareto_rows(plans: list[Plan]) -> list[dict]:
    rows = []
    for plan in plans:
        t, s = plan.totals, plan.solver
        rows.append({"budget": _budget_label(plan), "budget_bytes": t["budget_bytes"], "bytes": t["bytes"],
                     "avg_bits": t["avg_bits"], "avg_code_bits": t["avg_code_bits"],
                     "predicted_loss": t["predicted_loss"], "bound": s.bound, "gap": s.gap,
                     "status": s.status, "seconds": s.seconds})
    return rows


def _budget_label(plan: Plan) -> str:
    budget = plan.model_extra.get("budget") or plan.spec["budget"]
    return Budget(**budget).describe()


def write_pareto(plans: list[Plan], out_dir) -> dict[str, Path]:
    """Write pareto.csv, pareto.json and pareto.png (size vs. predicted loss) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = pareto_rows(plans)
    paths = {"csv": out / "pareto.csv", "json": out / "pareto.json", "png": out / "pareto.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"version": 1, "points": rows}, indent=1) + "\n")
    _plot(rows, paths["png"])
    return paths


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["bytes"] / 1e6 for r in rows], [r["predicted_loss"] for r in rows], "o-")
    ax.set_xlabel("expert bytes (MB)")
    ax.set_ylabel("predicted loss (sum of sensitivities)")
    ax.set_title("mopeq Pareto front")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
