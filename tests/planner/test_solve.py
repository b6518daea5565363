import itertools

import numpy as np
import pytest

from .planner_helpers import random_profile
from mopeq.planner import Spec, make_plan, sweep, write_pareto
from mopeq.planner.plan import build_problem, row_budgets
from mopeq.schemas import InputError


def brute_force(problem, budgets):
    k = problem.knapsack
    best = np.inf
    for combo in itertools.product(range(k.sizes.shape[1]), repeat=len(k.rows)):
        c = np.array(combo)
        s = k.sizes[np.arange(len(c)), c]
        if np.isfinite(s).all() and all(s[k.rows == r].sum() <= b + 1e-6 for r, b in budgets.items()):
            best = min(best, k.costs[np.arange(len(c)), c].sum())
    return best


CASES = [({"scope": "global"}, 0), ({"scope": "layer"}, 1), ({"pins": [{"match": "L*.S*", "bits": 4}]}, 2),
         ({"clusters": {"per_layer": 2}}, 3), ({"clusters": {"per_layer": 2, "method": "graph"}, "scope": "layer"}, 4),
         ({"pins": [{"match": "L1.*", "min_bits": 3}], "scope": "layer"}, 5)]


@pytest.mark.parametrize("extra,seed", CASES)
@pytest.mark.parametrize("avg_bits", [2.4, 2.9, 3.5])
def test_optimal_against_brute_force(extra, seed, avg_bits):
    profile = random_profile(layers=2, experts=3, shared=1, bits=(2, 3, 4), seed=seed)
    spec = Spec.model_validate({"budget": {"avg_bits": avg_bits}, **extra})
    problem = build_problem(spec, profile)
    budgets = row_budgets(problem, spec.budget)
    try:
        plan = make_plan(spec, profile)
    except InputError:
        assert brute_force(problem, budgets) == np.inf
        return
    assert plan.solver.status == "optimal"
    assert plan.totals["predicted_loss"] == pytest.approx(brute_force(problem, budgets), rel=1e-9)
    assert_feasible(plan, spec, profile)


def assert_feasible(plan, spec, profile):
    assert plan.totals["bytes"] <= plan.totals["budget_bytes"] + 1e-6
    for layer, row in plan.layers.items():
        if spec.scope.value == "layer":
            assert row["bytes"] <= row["budget_bytes"] + 1e-6
    for node in profile.experts:
        bits = plan.experts[node.id].bits
        assert bits in spec.bits
        for pin in spec.pins:
            if __import__("fnmatch").fnmatchcase(node.id, pin.match):
                assert pin.allows(bits)
    for cluster in plan.model_extra["clusters"].values():
        assert {plan.experts[m].bits for m in cluster["members"]} == {cluster["bits"]}


@pytest.mark.parametrize("seed", range(4))
def test_larger_plans_feasible_and_proven(seed):
    profile = random_profile(layers=4, experts=32, shared=2, bits=(2, 3, 4), seed=seed)
    for scope in ("global", "layer"):
        spec = Spec.model_validate({"budget": {"avg_bits": 2.7}, "scope": scope,
                                    "pins": [{"match": "L*.S*", "bits": 4}], "clusters": {"per_layer": 8}})
        plan = make_plan(spec, profile)
        assert plan.solver.status == "optimal" and plan.solver.gap <= 1e-9
        assert_feasible(plan, spec, profile)
        highs = make_plan(spec.model_copy(update={"solver": spec.solver.model_copy(update={"backend": "highs"})}),
                          profile)
        assert highs.totals["predicted_loss"] == pytest.approx(plan.totals["predicted_loss"], rel=1e-7)


def test_vllm_ties_layers():
    profile = random_profile(layers=3, experts=6, symmetric=True, seed=7)
    spec = Spec.model_validate({"target": "vllm", "budget": {"avg_bits": 5.5}})
    plan = make_plan(spec, profile)
    for layer in range(3):
        widths = {plan.experts[n.id].bits for n in profile.experts if n.layer == layer and not n.shared}
        assert len(widths) == 1 and widths <= {4, 8}
    assert plan.symmetric and plan.group_size == 128
    assert_feasible(plan, spec, profile)


def test_infeasible_budget_names_smallest_size():
    profile = random_profile(layers=2, experts=4, bits=(2, 3, 4))
    spec = Spec.model_validate({"budget": {"avg_bits": 2.0}, "pins": [{"match": "L*.S*", "bits": 4}]})
    with pytest.raises(InputError, match=r"below the smallest plan the pins allow \([0-9.]+ MB at [0-9.]+ avg bits\)"):
        make_plan(spec, profile)
    with pytest.raises(InputError, match="layer 0: budget"):
        make_plan(spec.model_copy(update={"scope": "layer"}), profile)


def test_profile_settings_checked():
    profile = random_profile(bits=(2, 3, 4))
    with pytest.raises(InputError, match="re-profile"):
        make_plan(Spec.model_validate({"bits": [2, 8], "budget": {"avg_bits": 3}}), profile)
    with pytest.raises(InputError, match="group_size"):
        make_plan(Spec.model_validate({"group_size": 64, "budget": {"avg_bits": 3}}), profile)


@pytest.mark.parametrize("source", ["hessian", "fisher", "gauss-newton", "ablation", "frequency", "uniform"])
def test_sources(source):
    profile = random_profile(bits=(2, 3, 4), seed=3)
    plan = make_plan(Spec.model_validate({"budget": {"avg_bits": 2.6}, "sensitivity": source}), profile)
    assert plan.totals["bytes"] <= plan.totals["budget_bytes"]
    if source == "uniform":
        assert len({e.bits for e in plan.experts.values()}) == 1


def test_plan_fields_and_budget_kinds():
    profile = random_profile(bits=(2, 3, 4))
    for budget in ({"bytes": "200kB"}, {"fraction": 0.2}, {"avg_bits": 3.0}):
        plan = make_plan(Spec.model_validate({"budget": budget}), profile)
        assert set(plan.totals) >= {"bytes", "budget_bytes", "avg_bits", "avg_code_bits", "bf16_bytes",
                                    "non_expert_bytes", "predicted_loss"}
    assert plan.totals["avg_code_bits"] == pytest.approx(3.0, abs=0.02)  # avg_bits 3 ~ uniform 3-bit size
    assert plan.profile_sha256 == profile.sha256 and plan.spec["budget"]["avg_bits"] == 3.0


def test_layer_budgets_explicit():
    profile = random_profile(layers=3, bits=(2, 3, 4))
    spec = Spec.model_validate({"budget": {"avg_bits": 2.5}, "scope": "layer", "layer_budgets": {1: {"avg_bits": 4}}})
    plan = make_plan(spec, profile)
    assert plan.layers["1"]["avg_code_bits"] > 3.5 > plan.layers["0"]["avg_code_bits"]
    bad = Spec.model_validate({"budget": {"avg_bits": 2.5}, "scope": "layer", "layer_budgets": {9: {"avg_bits": 4}}})
    with pytest.raises(InputError, match="layer_budgets.9"):
        make_plan(bad, profile)


def test_sweep_monotone_and_files(tmp_path):
    profile = random_profile(layers=3, experts=8, bits=(2, 3, 4), seed=5)
    spec = Spec.model_validate({"budget": {"avg_bits": 2.5}, "sweep": {"avg_bits": {"start": 2.2, "stop": 3.8, "num": 6}}})
    plans = sweep(spec, profile)
    losses = [p.totals["predicted_loss"] for p in plans]
    assert len(plans) == 6 and losses == sorted(losses, reverse=True)
    assert all(p.solver.status == "optimal" for p in plans)
    assert [p.totals["predicted_loss"] for p in sweep(spec, profile, [2.2, 3.8])] == [losses[0], losses[-1]]
    paths = write_pareto(plans, tmp_path)
    assert paths["png"].stat().st_size > 0 and len(paths["csv"].read_text().splitlines()) == 7


@pytest.mark.parametrize("backend", ["dp", "highs"])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-13, 1e-11, 1.0, 1e13, 1e30])
def test_optimal_means_optimal_at_any_cost_scale(scale, backend):
    """The same knapsacks with costs multiplied by ``scale``: a plan called optimal is within the relative gap of
    the brute-force optimum, and the reported gap is never below the real one."""
    from mopeq.planner.ilp import Knapsack, Relaxation, solve

    rng = np.random.default_rng(7)
    for trial in range(12):
        groups = 7
        sizes = np.sort(rng.uniform(1, 10, (groups, 3)), axis=1)
        costs = -np.sort(-rng.lognormal(0, 2, (groups, 3)), axis=1) * scale  # wider = cheaper
        knapsack = Knapsack(sizes, costs, np.zeros(groups, dtype=int))
        budget = float(sizes[:, 0].sum() + rng.uniform(0.2, 0.8) * (sizes[:, -1] - sizes[:, 0]).sum())
        best = min(costs[np.arange(groups), c].sum() for c in itertools.product(range(3), repeat=groups)
                   if sizes[np.arange(groups), c].sum() <= budget)
        solution = solve(Relaxation(knapsack), {0: budget}, backend=backend)
        real_gap = (solution.objective - best) / best
        assert solution.status == "optimal", (trial, solution)
        assert real_gap <= 1e-6 and solution.gap >= real_gap - 1e-9, (trial, real_gap, solution.gap)


def test_clusters_of_negative_ablation_costs_plan_without_error():
    """Measured ablation can lower the loss (negative cost); k-means clustering of such costs still plans, optimally."""
    profile = random_profile(seed=11)
    for i, node in enumerate(profile.experts):
        if i % 3 == 0:
            node.sensitivity["ablation"] = {k: -v for k, v in node.sensitivity.get("ablation", node.ablation).items()}
            node.ablation = {k: -v for k, v in node.ablation.items()}
    spec = Spec(version=1, bits=[2, 3, 4, 8], budget={"avg_bits": 3.5}, sensitivity="ablation",
                clusters={"per_layer": 2})
    plan = make_plan(spec, profile)
    assert plan.solver.status == "optimal"
    assert sorted(m for c in plan.clusters.values() for m in c["members"]) == sorted(n.id for n in profile.experts)
