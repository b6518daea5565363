"""profile.json + spec -> plan.json.

Budgets count **expert bytes only** (routed + shared experts, ``node.bytes[str(bits)]`` from the
profile, scales and zero points included). Definitions used throughout:

- ``avg_bits`` = 8 * bytes / params over the experts: packed bits per expert weight *including* the
  scale/zero-point overhead. A budget ``avg_bits: b`` means
  ``budget_bytes = sum_e (params_e * b / 8 + overhead_e)`` with ``overhead_e = bytes_e[w] - params_e * w / 8``
  (the same for every width ``w``; taken at the smallest candidate width), so ``avg_bits: 3`` is exactly
  the size of a uniform 3-bit plan. ``avg_code_bits`` is the parameter-weighted mean bit width.
- ``fraction: f`` means ``f * sum_e bf16_bytes_e``.
- ``scope: layer``: a layer listed in ``layer_budgets`` gets that budget (computed on its own experts);
  every other layer gets ``budget`` applied to its own experts for ``avg_bits``/``fraction``, or an
  equal share of what ``bytes`` leaves after the listed layers.
- ``totals.predicted_loss`` is the objective: the sum of the chosen sensitivity costs.

Example::

    plan = make_plan(load_spec("specs/demo.yaml"), read_profile("profile.json"))
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass

import numpy as np

from mopeq.schemas import CURVATURE_SOURCES, ExpertNode, ExpertPlan, InputError, Plan, Profile, SolverReport

from . import ilp
from .cluster import assign_clusters
from .spec import Budget, Scope, Spec, Target


@dataclass
class Problem:
    """Everything a solve needs, built once per (spec, profile) and reused across sweep budgets."""

    spec: Spec
    profile: Profile
    widths: list[int]
    costs: np.ndarray  # [E, W] per-expert cost
    sizes: np.ndarray  # [E, W] per-expert bytes
    allowed: np.ndarray  # [E, W] pins
    cluster_names: list[str]
    cluster_of: np.ndarray  # [E] cluster index
    knapsack: ilp.Knapsack
    relaxation: ilp.Relaxation | None

    @property
    def params(self) -> np.ndarray:
        return np.array([node.params for node in self.profile.experts], dtype=float)

    @property
    def layers(self) -> np.ndarray:
        return np.array([node.layer for node in self.profile.experts])


def make_plan(spec: Spec, profile: Profile, budget=None) -> Plan:
    """Choose one width per expert (cluster); ``budget`` (Budget, dict or avg_bits) overrides the spec's."""
    return plan_problem(build_problem(spec, profile), _as_budget(budget) if budget is not None else spec.budget)


def _as_budget(budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    return Budget(**budget) if isinstance(budget, dict) else Budget(avg_bits=float(budget))


def build_problem(spec: Spec, profile: Profile) -> Problem:
    check_profile(spec, profile)
    widths = list(spec.bits)
    costs = cost_table(profile, spec.sensitivity, widths)
    sizes = np.array([[node.bytes[str(w)] for w in widths] for node in profile.experts], dtype=float)
    allowed = pin_table(spec, profile.experts, widths)
    names = assign_clusters(profile, costs, spec.clusters, spec.target == Target.VLLM)
    cluster_names, cluster_of = np.unique(np.array(names), return_inverse=True)
    knapsack = _group(costs, sizes, allowed, cluster_of, _rows(spec, profile), list(cluster_names))
    relaxation = None if spec.sensitivity == "uniform" else ilp.Relaxation(knapsack)
    return Problem(spec, profile, widths, costs, sizes, allowed, list(cluster_names), cluster_of, knapsack, relaxation)


def check_profile(spec: Spec, profile: Profile) -> None:
    """The profile must have been measured with the spec's widths and quantizer settings."""
    settings = profile.meta.settings
    redo = f"re-profile with bits {spec.bits}, group_size {spec.group_size}, symmetric {spec.symmetric}"
    missing = [b for b in spec.bits if b not in settings.get("bits", spec.bits)]
    if missing:
        raise InputError(f"profile was measured for bits {settings.get('bits')}, spec needs {missing}; {redo}")
    for key in ("group_size", "symmetric"):
        if key in settings and settings[key] != getattr(spec, key):
            raise InputError(f"profile has {key} {settings[key]}, spec has {getattr(spec, key)}; {redo}")
    if not profile.experts:
        raise InputError("profile has no experts")
    node = next((n for n in profile.experts if any(str(b) not in n.bytes for b in spec.bits)), None)
    if node is not None:
        raise InputError(f"profile has no byte sizes for {node.id} at bits {spec.bits}; {redo}")


def cost_table(profile: Profile, source: str, widths: list[int]) -> np.ndarray:
    """``[E, W]`` predicted loss of each expert at each width, from the spec's sensitivity source."""
    if source == "uniform":
        source = _report_source(profile)
    rows = [[_cost(node, source, w) for w in widths] for node in profile.experts]
    return np.array(rows, dtype=float)


def _report_source(profile: Profile) -> str:
    """``uniform`` ignores costs; predicted loss is still reported with the best available source."""
    return "hessian-local" if "hessian-local" in profile.experts[0].sensitivity else "frequency"


def _cost(node: ExpertNode, source: str, bits: int) -> float:
    key = str(bits)
    if source in CURVATURE_SOURCES:
        table = node.sensitivity.get(source, {})
    elif source == "ablation":
        table = node.ablation
    else:  # frequency: the usual activation-frequency baseline
        table = {k: node.frequency * v for k, v in node.perturbation.items()}
    if key not in table or not math.isfinite(table[key]):
        raise InputError(f"profile has no finite '{source}' sensitivity for {node.id} at {bits} bits; "
                         f"re-profile with that source or pick another sensitivity")
    return float(table[key])


def pin_table(spec: Spec, experts: list[ExpertNode], widths: list[int]) -> np.ndarray:
    """``[E, W]`` widths each expert may take: every matching pin must allow it."""
    allowed = np.ones((len(experts), len(widths)), dtype=bool)
    for i, pin in enumerate(spec.pins):
        hits = np.array([fnmatch.fnmatchcase(node.id, pin.match) for node in experts])
        if not hits.any():
            raise InputError(f"pins.{i}.match: '{pin.match}' matches no expert id (ids look like "
                             f"'{experts[0].id}')")
        allowed[hits] &= np.array([pin.allows(w) for w in widths])
    empty = np.flatnonzero(~allowed.any(1))
    if len(empty):
        raise InputError(f"pins leave no width from {widths} for {experts[empty[0]].id}")
    return allowed


def _rows(spec: Spec, profile: Profile) -> np.ndarray:
    if spec.scope == Scope.LAYER:
        return np.array([node.layer for node in profile.experts])
    return np.zeros(len(profile.experts), dtype=int)


def _group(costs, sizes, allowed, cluster_of, rows, names) -> ilp.Knapsack:
    """Sum members' costs and sizes per cluster; a width is allowed if every member allows it."""
    n = len(names)
    group_costs, group_sizes = np.zeros((n, costs.shape[1])), np.zeros((n, costs.shape[1]))
    np.add.at(group_costs, cluster_of, costs)
    np.add.at(group_sizes, cluster_of, sizes)
    group_allowed = np.ones_like(group_costs, dtype=bool)
    np.logical_and.at(group_allowed, cluster_of, allowed)
    if not group_allowed.any(1).all():
        bad = names[int(np.flatnonzero(~group_allowed.any(1))[0])]
        raise InputError(f"pins of the experts in cluster {bad} leave no common width; adjust pins or clusters")
    group_rows = np.zeros(n, dtype=int)
    group_rows[cluster_of] = rows
    return ilp.Knapsack(np.where(group_allowed, group_sizes, np.inf), np.where(group_allowed, group_costs, np.inf),
                        group_rows)


def plan_problem(problem: Problem, budget: Budget) -> Plan:
    budgets = row_budgets(problem, budget)
    check_feasible(problem, budgets)
    if problem.spec.sensitivity == "uniform":
        choice, report = solve_uniform(problem, budgets)
    else:
        choice, report = solve_knapsack(problem, budgets)
    return report_plan(problem, choice, budgets, report, budget)


def budget_bytes(budget: Budget, problem: Problem, members: np.ndarray) -> float:
    """Bytes a budget grants to the experts selected by the boolean mask ``members``."""
    if budget.bytes is not None:
        return float(budget.bytes)
    if budget.fraction is not None:
        return budget.fraction * sum(n.bf16_bytes for n, m in zip(problem.profile.experts, members) if m)
    params = problem.params[members]
    overhead = problem.sizes[members, 0] - params * problem.widths[0] / 8
    return float((params * budget.avg_bits / 8 + overhead).sum())


def row_budgets(problem: Problem, budget: Budget) -> dict[int, float]:
    """Budget bytes per knapsack row (row 0 = global, or one row per layer)."""
    if problem.spec.scope == Scope.GLOBAL:
        return {0: budget_bytes(budget, problem, np.ones(len(problem.layers), bool))}
    layers = sorted(set(problem.layers.tolist()))
    unknown = sorted(set(problem.spec.layer_budgets) - set(layers))
    if unknown:
        raise InputError(f"layer_budgets.{unknown[0]}: no MoE layer {unknown[0]} in the profile (layers {layers})")
    explicit = {l: budget_bytes(b, problem, problem.layers == l) for l, b in problem.spec.layer_budgets.items()}
    rest = [l for l in layers if l not in explicit]
    if budget.bytes is not None:
        share = (budget.bytes - sum(explicit.values())) / max(len(rest), 1)
        return {**explicit, **{l: share for l in rest}}
    return {**explicit, **{l: budget_bytes(budget, problem, problem.layers == l) for l in rest}}


def check_feasible(problem: Problem, budgets: dict[int, float]) -> None:
    """An infeasible budget is answered with the smallest size the pins allow."""
    smallest = np.where(problem.knapsack.sizes < np.inf, problem.knapsack.sizes, np.inf).min(1)
    for row, budget in budgets.items():
        floor = float(smallest[problem.knapsack.rows == row].sum())
        if budget < floor - 1e-6:
            members = problem.layers == row if problem.spec.scope == Scope.LAYER else np.ones(len(problem.layers), bool)
            bits = 8 * floor / problem.params[members].sum()
            where = f"layer {row}: " if problem.spec.scope == Scope.LAYER else ""
            raise InputError(f"{where}budget {_mb(budget)} is below the smallest plan the pins allow "
                             f"({_mb(floor)} at {bits:.3f} avg bits)")


def _mb(n: float) -> str:
    return f"{n / 1e6:.6g} MB"


def solve_knapsack(problem: Problem, budgets: dict[int, float]):
    settings = problem.spec.solver
    solution = ilp.solve(problem.relaxation, budgets, settings.backend, settings.time_limit_s,
                         settings.seed, settings.relative_gap)
    report = SolverReport(backend=solution.backend, status=solution.status, objective=solution.objective,
                          bound=solution.bound, gap=solution.gap, seconds=solution.seconds)
    return solution.choice, report


def solve_uniform(problem: Problem, budgets: dict[int, float]):
    """Per row, the largest candidate width whose uniform plan (pins honoured) fits."""
    start = time.perf_counter()
    knapsack = problem.knapsack
    choice = np.zeros(len(knapsack.rows), dtype=int)
    for row, budget in budgets.items():
        members = np.flatnonzero(knapsack.rows == row)
        choice[members] = _uniform_row(knapsack.sizes[members], budget)
    objective = float(knapsack.costs[np.arange(len(choice)), choice].sum())
    return choice, SolverReport(backend="uniform", status="feasible", objective=objective, bound=objective,
                                gap=0.0, seconds=time.perf_counter() - start)


def _uniform_row(sizes: np.ndarray, budget: float) -> np.ndarray:
    fallback = np.where(np.isfinite(sizes), sizes, np.inf).argmin(1)
    for column in range(sizes.shape[1] - 1, -1, -1):
        # pinned groups that cannot take this width take their nearest allowed width below it, else smallest
        picks = np.array([_nearest(row, column, low) for row, low in zip(sizes, fallback)], dtype=int)
        if sizes[np.arange(len(picks)), picks].sum() <= budget + 1e-6:
            return picks
    return fallback


def _nearest(sizes_row: np.ndarray, column: int, fallback: int) -> int:
    ok = np.flatnonzero(np.isfinite(sizes_row[:column + 1]))
    return int(ok[-1]) if len(ok) else int(np.flatnonzero(np.isfinite(sizes_row))[0])


def report_plan(problem: Problem, group_choice: np.ndarray, budgets: dict[int, float], report, budget: Budget) -> Plan:
    bits = np.array(problem.widths)[group_choice[problem.cluster_of]]  # [E]
    column = group_choice[problem.cluster_of]
    expert_bytes = problem.sizes[np.arange(len(bits)), column]
    expert_costs = problem.costs[np.arange(len(bits)), column]
    meta, spec = problem.profile.meta, problem.spec
    experts = {node.id: ExpertPlan(bits=int(b), cluster=problem.cluster_names[c])
               for node, b, c in zip(problem.profile.experts, bits, problem.cluster_of)}
    return Plan(model_id=meta.model_id, family=meta.family, config_hash=meta.config_hash,
                profile_sha256=problem.profile.sha256, spec=spec.model_dump(mode="json"),
                group_size=spec.group_size, symmetric=spec.symmetric, clip_search=spec.clip_search,
                experts=experts, layers=_layer_report(problem, bits, expert_bytes, budgets),
                totals=_totals(problem, bits, expert_bytes, budgets, report.objective), solver=report,
                clusters=_cluster_report(problem, bits, expert_bytes, expert_costs),
                budget=budget.model_dump(mode="json"))


def _totals(problem: Problem, bits, expert_bytes, budgets, objective) -> dict[str, float]:
    params = problem.params
    return {"bytes": float(expert_bytes.sum()), "budget_bytes": float(sum(budgets.values())),
            "avg_bits": float(8 * expert_bytes.sum() / params.sum()),
            "avg_code_bits": float((bits * params).sum() / params.sum()),
            "bf16_bytes": float(sum(n.bf16_bytes for n in problem.profile.experts)),
            "non_expert_bytes": float(problem.profile.meta.non_expert_bytes), "predicted_loss": float(objective)}


def _layer_report(problem: Problem, bits, expert_bytes, budgets) -> dict[str, dict[str, float]]:
    """Per layer bytes vs. budget; under a global budget a layer's share is proportional to its params."""
    params, layers, out = problem.params, problem.layers, {}
    total_budget = sum(budgets.values())
    for layer in sorted(set(layers.tolist())):
        m = layers == layer
        share = budgets[layer] if problem.spec.scope == Scope.LAYER else total_budget * params[m].sum() / params.sum()
        out[str(layer)] = {"bytes": float(expert_bytes[m].sum()), "budget_bytes": float(share),
                           "avg_bits": float(8 * expert_bytes[m].sum() / params[m].sum()),
                           "avg_code_bits": float((bits[m] * params[m]).sum() / params[m].sum())}
    return out


def _cluster_report(problem: Problem, bits, expert_bytes, expert_costs) -> dict[str, dict]:
    """Per cluster its width, members, bytes and predicted loss."""
    n = len(problem.cluster_names)
    cluster_bytes = np.bincount(problem.cluster_of, expert_bytes, n)
    cluster_costs = np.bincount(problem.cluster_of, expert_costs, n)
    members = [[] for _ in range(n)]
    for node, c in zip(problem.profile.experts, problem.cluster_of.tolist()):
        members[c].append(node.id)
    cluster_bits = np.zeros(n, dtype=int)
    cluster_bits[problem.cluster_of] = bits
    return {name: {"bits": int(cluster_bits[c]), "members": members[c], "bytes": float(cluster_bytes[c]),
                   "predicted_loss": float(cluster_costs[c])} for c, name in enumerate(problem.cluster_names)}
