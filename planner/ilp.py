"""The multiple-choice knapsack: one width per group (cluster), minimise total cost under byte budgets.

A problem is two ``[G, W]`` tables (``sizes`` in bytes, ``costs`` in predicted loss; ``inf`` where a
width is not allowed) and a budget row per group (one row for a global budget, one per layer for
layer-wise budgets; rows are independent problems). Each row is solved in four steps:

1. **Convex hull** (once per problem, reused by every budget of a sweep): per group the lower convex
   hull of cost vs. size, as increments ordered by cost saved per byte. Taking increments in that
   order is the LP relaxation's optimum; the increment that no longer fits, taken fractionally, gives
   the LP bound and its dual price ``lam`` (Dantzig / Sinha-Zoltners).
2. **Greedy incumbent**: the whole increments before the break, then every later one that still fits.
3. **Reduced-cost fixing**: for any feasible plan ``x``, ``cost(x) >= L(lam) + sum_g r_g(x_g)`` with
   ``r_g(j) = c_gj + lam*s_gj - min_k (c_gk + lam*s_gk)`` and ``L`` the Lagrangian (= LP) bound, so a
   choice with ``r > incumbent - L`` is never optimal. Usually only a few dozen groups keep two or
   more choices: the core.
4. **Exact core solve**: a dynamic programme over (size, cost) Pareto states of the core with the
   same reduced-cost pruning (``backend="dp"``, exact), or the core as a MIP for HiGHS via OR-Tools
   MathOpt (``backend="highs"``, time limit, seed, proven bound). ``auto`` runs the DP and hands the
   core to HiGHS if the DP's state count explodes.

Example::

    problem = Knapsack(sizes, costs, rows=np.zeros(len(sizes), int))
    solution = solve(Relaxation(problem), budgets=[3.5e9])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

BACKENDS = ("auto", "dp", "highs")
MAX_DP_STATES = 400_000


@dataclass(frozen=True)
class Knapsack:
    sizes: np.ndarray  # [G, W] bytes of group g at width column w; inf where not allowed
    costs: np.ndarray  # [G, W] predicted loss; inf where not allowed
    rows: np.ndarray  # [G] budget row of each group


@dataclass
class Solution:
    choice: np.ndarray  # [G] chosen width column per group
    status: str  # "optimal" or "feasible"
    objective: float
    bound: float
    backend: str
    seconds: float
    core_groups: int = 0

    @property
    def gap(self) -> float:
        # relative to the plan's own scale: predicted losses of 1e-20 are as provable as losses of 1e6
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), abs(self.bound), 1e-300)


@dataclass
class RowHull:
    """The LP relaxation of one budget row: base choice and hull increments sorted by efficiency."""

    groups: np.ndarray  # [g] global group indices in this row
    base: np.ndarray  # [g] column of the smallest allowed width
    base_size: float
    base_cost: float
    step_col: np.ndarray  # [g, W-1] column reached after each hull step (-1 if none)
    inc_group: np.ndarray  # [n] local group of each increment, in efficiency order
    inc_step: np.ndarray  # [n] hull step index within its group
    inc_size: np.ndarray  # [n] bytes added
    inc_cost: np.ndarray  # [n] cost added (negative)
    cum_size: np.ndarray = field(init=False)
    cum_cost: np.ndarray = field(init=False)

    def __post_init__(self):
        self.cum_size = np.cumsum(self.inc_size)
        self.cum_cost = np.cumsum(self.inc_cost)


class Relaxation:
    """Hulls of every row of ``problem``, built once and reused for every budget (sweeps)."""

    def __init__(self, problem: Knapsack):
        self.problem = problem
        base, steps = _hull_steps(problem.sizes, problem.costs)
        self.rows = {int(r): _row_hull(problem, base, steps, r) for r in np.unique(problem.rows)}

    def min_size(self, row: int) -> float:
        return self.rows[row].base_size


def _hull_steps(sizes: np.ndarray, costs: np.ndarray):
    """Vectorised lower convex hull per group; returns base columns and (group, step, col) rows."""
    n_groups, n_widths = sizes.shape
    idx = np.arange(n_groups)
    smallest = np.where(sizes == sizes.min(1, keepdims=True), costs, np.inf)
    current = smallest.argmin(1)
    base, steps = current.copy(), []
    for step in range(n_widths - 1):
        d_size = sizes - sizes[idx, current][:, None]
        d_cost = costs - costs[idx, current][:, None]
        valid = (d_size > 0) & (d_cost < 0) & np.isfinite(costs) & np.isfinite(sizes)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(valid, d_cost / np.where(valid, d_size, 1.0), np.inf)
        nxt = slope.argmin(1)
        ok = valid.any(1)
        steps.append((idx[ok], np.full(ok.sum(), step), nxt[ok]))
        current = np.where(ok, nxt, current)
    return base, [np.concatenate(a) for a in zip(*steps)] if steps else [np.zeros(0, int)] * 3


def _row_hull(problem: Knapsack, base: np.ndarray, steps, row: int) -> RowHull:
    groups = np.flatnonzero(problem.rows == row)
    local = np.full(len(problem.rows), -1)
    local[groups] = np.arange(len(groups))
    g_all, step_all, col_all = steps
    mask = problem.rows[g_all] == row
    g, step, col = local[g_all[mask]], step_all[mask], col_all[mask]
    step_col = np.full((len(groups), max(problem.sizes.shape[1] - 1, 1)), -1)
    step_col[g, step] = col
    prev = np.where(step == 0, base[groups[g]], step_col[g, np.maximum(step - 1, 0)])
    sizes, costs = problem.sizes[groups], problem.costs[groups]
    d_size, d_cost = sizes[g, col] - sizes[g, prev], costs[g, col] - costs[g, prev]
    order = np.lexsort((step, g, d_cost / d_size))  # most cost saved per byte first
    return RowHull(groups, base[groups], float(sizes[np.arange(len(groups)), base[groups]].sum()),
                   float(costs[np.arange(len(groups)), base[groups]].sum()), step_col,
                   g[order], step[order], d_size[order], d_cost[order])


@dataclass
class RowResult:
    choice: np.ndarray  # [g] local choice columns
    objective: float
    bound: float
    optimal: bool
    backend: str
    core_groups: int


def solve(relaxation: Relaxation, budgets: dict[int, float], backend: str = "auto",
          time_limit_s: float = 10.0, seed: int = 0, relative_gap: float = 1e-7) -> Solution:
    """Solve every row against its budget; rows must all be feasible (check ``min_size`` first)."""
    assert backend in BACKENDS, backend
    start = time.perf_counter()
    problem = relaxation.problem
    choice = np.zeros(len(problem.rows), dtype=int)
    results = []
    for row, hull in relaxation.rows.items():
        result = solve_row(problem, hull, budgets[row], backend, time_limit_s, seed, relative_gap)
        choice[hull.groups] = result.choice
        results.append(result)
    return _merge(choice, results, time.perf_counter() - start)


def _merge(choice: np.ndarray, results: list[RowResult], seconds: float) -> Solution:
    backends = sorted({r.backend for r in results})
    return Solution(choice=choice, status="optimal" if all(r.optimal for r in results) else "feasible",
                    objective=sum(r.objective for r in results), bound=sum(r.bound for r in results),
                    backend="+".join(backends), seconds=seconds,
                    core_groups=sum(r.core_groups for r in results))


def solve_row(problem: Knapsack, hull: RowHull, budget: float, backend: str,
              time_limit_s: float, seed: int, relative_gap: float) -> RowResult:
    sizes, costs = problem.sizes[hull.groups], problem.costs[hull.groups]
    cap = budget - hull.base_size
    assert cap >= -1e-6, "infeasible row must be caught by the caller"
    n_full, lp_bound, lam = _lp_break(hull, cap)
    incumbent = _greedy(hull, n_full, cap)
    upper = float(costs[np.arange(len(incumbent)), incumbent].sum())
    reduced, lagrangian = _reduced_costs(sizes, costs, lam, budget)
    bound = max(lp_bound, lagrangian)
    # relative stopping rule; the absolute part covers float rounding of sums at the costs' own magnitude
    scale = float(np.abs(costs[np.isfinite(costs)]).max(initial=0.0))
    target = relative_gap * abs(upper) + 1e-12 * (abs(upper) + scale)
    if upper - bound <= target:
        return RowResult(incumbent, upper, min(bound, upper), True, "greedy", 0)
    keep = np.isfinite(reduced) & (reduced <= upper - lagrangian)
    keep[np.arange(len(incumbent)), incumbent] = True
    core = Core.build(sizes, costs, reduced, keep, budget, _prices(hull, n_full, lam))
    if backend in ("auto", "dp"):
        found = _core_dp(core, upper, target)
        if found is not None:
            picks = incumbent[core.groups] if found[0] is None else found[0]
            return core.result(costs, picks, max(bound, found[1]), target, "dp")
        if backend == "dp":
            raise RuntimeError(f"core DP exceeded {MAX_DP_STATES} states on {len(core.groups)} groups")
    picks, core_bound = _core_highs(core, time_limit_s, seed, relative_gap)
    return core.result(costs, picks, max(bound, core_bound), target, "highs")


def _prices(hull: RowHull, n_full: int, lam: float) -> np.ndarray:
    """Budget prices for Lagrangian bounds: the LP dual and the slopes of hull steps around the break."""
    efficiency = -hull.inc_cost / hull.inc_size
    offsets = np.array([0] + [sign * 2**i for i in range(13) for sign in (-1, 1)])
    picked = efficiency[np.clip(n_full + offsets, 0, len(efficiency) - 1)] if len(efficiency) else []
    return np.unique(np.concatenate([[0.0, lam], picked]))


def _lp_break(hull: RowHull, cap: float) -> tuple[int, float, float]:
    """Number of whole increments that fit, the LP bound, and the dual price of the budget."""
    n_full = int(np.searchsorted(hull.cum_size, cap, side="right"))
    taken = hull.cum_cost[n_full - 1] if n_full else 0.0
    if n_full == len(hull.inc_size):
        return n_full, hull.base_cost + taken, 0.0
    used = hull.cum_size[n_full - 1] if n_full else 0.0
    fraction = (cap - used) / hull.inc_size[n_full]
    lam = -hull.inc_cost[n_full] / hull.inc_size[n_full]
    return n_full, hull.base_cost + taken + fraction * hull.inc_cost[n_full], float(lam)


def _greedy(hull: RowHull, n_full: int, cap: float) -> np.ndarray:
    """Whole increments before the LP break, then every later one that still fits, in order."""
    n_groups = len(hull.groups)
    next_step = np.zeros(n_groups, dtype=int)
    blocked = np.zeros(n_groups, dtype=bool)
    np.add.at(next_step, hull.inc_group[:n_full], 1)
    room = cap - (hull.cum_size[n_full - 1] if n_full else 0.0)
    tail_min = np.minimum.accumulate(hull.inc_size[::-1])[::-1]
    for i in range(n_full, len(hull.inc_size)):
        if tail_min[i] > room:
            break
        g = hull.inc_group[i]
        if blocked[g] or next_step[g] != hull.inc_step[i]:
            continue
        if hull.inc_size[i] <= room:
            room -= hull.inc_size[i]
            next_step[g] += 1
        else:
            blocked[g] = True  # later hull steps of g would skip this one
    return _columns(hull, next_step)


def _columns(hull: RowHull, steps_taken: np.ndarray) -> np.ndarray:
    col = hull.base.copy()
    moved = steps_taken > 0
    col[moved] = hull.step_col[np.flatnonzero(moved), steps_taken[moved] - 1]
    return col


def _reduced_costs(sizes, costs, lam: float, budget: float) -> tuple[np.ndarray, float]:
    priced = np.where(np.isfinite(costs), costs + lam * np.where(np.isfinite(sizes), sizes, 0.0), np.inf)
    best = priced.min(1)
    return priced - best[:, None], float(best.sum() - lam * budget)


@dataclass
class Core:
    """Groups that reduced-cost fixing left with more than one choice; the rest sit at ``anchor``."""

    groups: np.ndarray  # [k] row-local indices of the core groups, in DP order
    anchor: np.ndarray  # [g] the Lagrangian-best column of every group of the row
    sizes: np.ndarray  # [k, W]
    costs: np.ndarray  # [k, W]
    keep: np.ndarray  # [k, W]
    cap: float  # bytes left for the core once every other group sits at its anchor
    outside_cost: float
    prices: np.ndarray  # [K] budget prices for the state bounds

    @classmethod
    def build(cls, sizes, costs, reduced, keep, budget, prices) -> "Core":
        anchor = np.where(keep, reduced, np.inf).argmin(1)
        core = np.flatnonzero(keep.sum(1) > 1)
        second = np.sort(np.where(keep[core], reduced[core], np.inf), 1)[:, 1]
        core = core[np.argsort(second, kind="stable")]  # cheapest alternatives first: good plans early
        rows = np.arange(len(anchor))
        outside = np.ones(len(anchor), bool)
        outside[core] = False
        return cls(core, anchor, sizes[core], costs[core], keep[core],
                   budget - float(sizes[rows, anchor][outside].sum()), float(costs[rows, anchor][outside].sum()),
                   prices)

    def result(self, costs, picks, bound, target, backend) -> RowResult:
        choice = self.anchor.copy()
        choice[self.groups] = picks
        objective = float(costs[np.arange(len(choice)), choice].sum())
        bound = min(bound, objective)
        return RowResult(choice, objective, bound, objective - bound <= target, backend, len(self.groups))


def _core_dp(core: Core, upper: float, target: float):
    """Exact DP over (size, cost)-Pareto states of the core, pruned by Lagrangian bounds.

    Every state is also completed with the anchors of the groups not yet processed; the best feasible
    completion is the incumbent. States whose bound is within ``target`` of it are dropped, and the
    smallest dropped bound is the proven bound. Returns (picks, bound) or None if states explode.
    """
    k = len(core.groups)
    lam = core.prices[:, None]  # [K, 1]
    priced_min = np.where(core.keep, core.costs[None] + lam[..., None] * np.where(core.keep, core.sizes, 0.0)[None], np.inf).min(2)  # [K, k]
    rest_price = np.concatenate([np.cumsum(priced_min[:, ::-1], 1)[:, ::-1], np.zeros((len(lam), 1))], 1)
    anchor_cols = core.anchor[core.groups]
    rest_size = _suffix(core.sizes[np.arange(k), anchor_cols])
    rest_cost = _suffix(core.costs[np.arange(k), anchor_cols])
    rest_min_size = _suffix(np.where(core.keep, core.sizes, np.inf).min(1))
    best_cost, best_picks, pruned_bound = upper - core.outside_cost, None, np.inf
    size, cost, history = np.zeros(1), np.zeros(1), []
    for g in range(k):
        cols = np.flatnonzero(core.keep[g])
        size = (size[:, None] + core.sizes[g, cols]).ravel()  # [states * choices]
        cost = (cost[:, None] + core.costs[g, cols]).ravel()
        parent = np.repeat(np.arange(len(size) // len(cols)), len(cols))
        pick = np.tile(cols, len(size) // len(cols))
        alive = np.flatnonzero(size + rest_min_size[g + 1] <= core.cap + 1e-6)
        done_cost = cost[alive] + rest_cost[g + 1]
        fits = size[alive] + rest_size[g + 1] <= core.cap + 1e-6
        if fits.any() and done_cost[fits].min() < best_cost:
            state = int(alive[fits][done_cost[fits].argmin()])
            best_cost = float(done_cost[fits].min())
            best_picks = _backtrack(history, int(parent[state]), anchor_cols.copy())
            best_picks[g] = pick[state]
        bound = (cost[alive] + lam * (size[alive] - core.cap) + rest_price[:, g + 1:g + 2]).max(0)
        drop = bound > best_cost - target
        if drop.any():
            pruned_bound = min(pruned_bound, float(bound[drop].min()))
        alive = alive[~drop]
        alive = alive[_pareto(size[alive], cost[alive])]
        if len(alive) > MAX_DP_STATES:
            return None
        history.append((parent[alive], pick[alive]))
        size, cost = size[alive], cost[alive]
        if not len(alive):
            break
    return best_picks, core.outside_cost + min(best_cost, pruned_bound)


def _suffix(values: np.ndarray) -> np.ndarray:
    return np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])


def _pareto(sizes: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Indices of states not dominated in (size, cost)."""
    order = np.lexsort((costs, sizes))
    ordered = costs[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(ordered)[:-1]])
    return order[ordered < best_before]


def _backtrack(history, state: int, picks: np.ndarray) -> np.ndarray:
    """Fill ``picks`` for the groups in ``history`` by following parents back from ``state``."""
    for g in range(len(history) - 1, -1, -1):
        parent, pick = history[g]
        picks[g] = pick[state]
        state = parent[state]
    return picks


def build_core_model(core: Core):
    """The core as a MathOpt MIP: one binary per kept (group, width), exactly one per group. Returns the model, its
    variables, the constant left out (each group's cheapest cost) and the objective's unit (costs are divided by it)."""
    from ortools.math_opt.python import mathopt

    model = mathopt.Model(name="mopeq-core")
    x = {(g, w): model.add_binary_variable(name=f"x_{g}_{w}") for g, w in zip(*np.nonzero(core.keep))}
    floor = np.where(core.keep, core.costs, np.inf).min(1)  # costs relative to each group's cheapest
    excess = np.where(core.keep, core.costs - floor[:, None], 0.0)
    unit = float(excess.max(initial=0.0)) or 1.0  # objective scaled to at most 1: HiGHS's tolerances are absolute
    model.minimize(mathopt.fast_sum((excess[g, w] / unit) * v for (g, w), v in x.items()))
    for g in range(len(core.groups)):
        model.add_linear_constraint(mathopt.fast_sum(x[g, w] for w in np.flatnonzero(core.keep[g])) == 1)
    model.add_linear_constraint(mathopt.fast_sum(core.sizes[g, w] * v for (g, w), v in x.items()) <= core.cap)
    return model, x, float(floor.sum()), unit


def _core_highs(core: Core, time_limit_s: float, seed: int, relative_gap: float):
    """Solve the core with HiGHS (MathOpt); returns picks and the proven bound of the whole row."""
    from ortools.math_opt.python import mathopt

    model, x, floor, unit = build_core_model(core)
    params = mathopt.SolveParameters(time_limit=timedelta(seconds=time_limit_s), random_seed=seed,
                                     relative_gap_tolerance=relative_gap, absolute_gap_tolerance=0.0)
    result = mathopt.solve(model, mathopt.SolverType.HIGHS, params=params)
    if not result.has_primal_feasible_solution():
        raise RuntimeError(f"HiGHS found no plan for the core: {result.termination}")
    values = result.variable_values()
    picks = np.array([max(np.flatnonzero(core.keep[g]), key=lambda w: values[x[g, w]])
                      for g in range(len(core.groups))], dtype=int)
    return picks, core.outside_cost + floor + unit * result.best_objective_bound()
