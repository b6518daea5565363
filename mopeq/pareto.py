"""``mopeq pareto``: size vs. measured quality, for every allocation method, on the demo model.

Profile once, then for each (method, scope, budget) plan, compile, load the artifact and measure it
on the held-out data: perplexity per window, exact-match answers per question, and KL divergence to
the unquantized model. Every point is written to ``points/`` as soon as it is measured, so an
interrupted sweep resumes from the finished points. Identical plans are measured once.

Comparisons are paired bootstraps over held-out windows / questions (the same resampled indices for
both sides), reported as 95 % intervals.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .schemas import InputError, atomic_write

DEFAULT_METHODS = ("hessian", "fisher", "gauss-newton", "hessian-local", "ablation", "frequency")
BOOTSTRAP = 2000


@dataclass
class Measured:
    nll: np.ndarray  # [windows] mean NLL per held-out window
    correct: np.ndarray  # [questions] 0/1
    kl: np.ndarray  # [windows] mean KL(unquantized || quantized) per window

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))

    def summary(self) -> dict:
        return {"perplexity": self.perplexity, "accuracy": float(self.correct.mean()), "kl": float(self.kl.mean())}


class DemoJudge:
    """Held-out measurements of a model, with the unquantized model's log-probs kept for the KL."""

    def __init__(self, text_windows: int | None = None, batch: int = 32, questions: int | None = None):
        from .demo.data import VQASet, text_windows as windows, vqa_set
        from .models import open_model

        self.windows = windows("test", limit=text_windows)
        self.vqa = vqa_set("test")
        if questions is not None and questions < len(self.vqa.questions):  # an evenly strided subset
            pick = np.linspace(0, len(self.vqa.questions) - 1, questions).round().astype(int).tolist()
            self.vqa = VQASet(self.vqa.images[pick], [self.vqa.questions[i] for i in pick],
                              [self.vqa.answers[i] for i in pick])
        self.batch = batch
        reference = open_model("demo")
        self.reference_logp = None
        self.reference = self.measure(reference)

    @torch.no_grad()
    def measure(self, loaded) -> Measured:
        from .evaluate import demo_answers

        nll, kl, logps = [], [], []
        for i, chunk in enumerate(self.windows.split(self.batch)):
            logp = F.log_softmax(loaded.adapter.forward({"input_ids": chunk}).float()[:, :-1], -1)
            nll.append(-logp.gather(-1, chunk[:, 1:, None]).squeeze(-1).mean(1))
            if self.reference_logp is None:
                logps.append(logp)
                kl.append(torch.zeros(len(chunk)))
            else:
                ref = self.reference_logp[i]
                kl.append((ref.exp() * (ref - logp)).sum(-1).mean(1))
        if self.reference_logp is None:
            self.reference_logp = logps
        correct = demo_answers(loaded.model, self.vqa)
        return Measured(torch.cat(nll).numpy(), np.array(correct, dtype=float), torch.cat(kl).numpy())


def paired_interval(a: np.ndarray, b: np.ndarray, stat, seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and 95 % bootstrap interval of ``stat(a) - stat(b)`` over paired samples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))
    diffs = np.array([stat(a[i]) - stat(b[i]) for i in idx])
    return float(stat(a) - stat(b)), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def ppl_stat(nll: np.ndarray) -> float:
    return math.exp(float(nll.mean()))


def plan_key(plan) -> str:
    bits = json.dumps({k: v.bits for k, v in sorted(plan.experts.items())}).encode()
    return hashlib.sha256(bits).hexdigest()[:16]


def measure_plan(plan, judge: DemoJudge, workdir: Path) -> Measured:
    """Compile ``plan`` into a temporary artifact, load it through the runtime, and measure it."""
    from .compiler.artifact import compile_artifact
    from .runtime.load import load

    artifact = workdir / f"artifact-{plan_key(plan)}"
    compile_artifact("demo", plan, artifact, overwrite=True, progress=False)
    try:
        return judge.measure(load(artifact))
    finally:
        shutil.rmtree(artifact, ignore_errors=True)


def _point_path(out: Path, method: str, scope: str, budget: float) -> Path:
    return out / "points" / f"{method}-{scope}-{budget:.4f}.json"


def _save_point(path: Path, point: dict, measured: Measured) -> None:
    data = dict(point, per_window_nll=measured.nll.tolist(), per_question_correct=measured.correct.tolist(),
                per_window_kl=measured.kl.tolist())
    _atomic_text(path, json.dumps(data))


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _load_point(path: Path, profile_sha: str):
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("profile_sha256") != profile_sha:
        return None
    # float32, as measured: a resumed sweep must give the same statistics as an uninterrupted one
    measured = Measured(np.array(data.pop("per_window_nll"), dtype=np.float32),
                        np.array(data.pop("per_question_correct")), np.array(data.pop("per_window_kl"), dtype=np.float32))
    return data, measured


def uniform_budget(spec, profile, width: int) -> dict:
    """Bytes of the plan with every expert at ``width`` except where pins forbid it (then the nearest allowed)."""
    from .planner.plan import pin_table

    widths = sorted(spec.bits)
    allowed = pin_table(spec, profile.experts, widths)
    total = 0
    for node, ok in zip(profile.experts, allowed):
        choices = [w for w, a in zip(widths, ok) if a]
        pick = min((w for w in choices if w >= width), default=max(choices))
        total += node.bytes[str(pick)]
    return {"bytes": total}


def sweep_points(spec, profile, out: Path, methods, scopes, budgets, judge: DemoJudge, progress=True):
    """Plan, compile and measure every (method, scope, budget); resume from ``out/points``."""
    from .planner import make_plan
    from .planner.spec import Scope

    jobs = [(m, s, b) for m in methods for s in scopes for b in budgets]
    jobs += [("uniform", "global", float(b)) for b in sorted(set(budgets) | {float(w) for w in spec.bits})]
    results, cache = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, scope, budget in tqdm(jobs, desc="pareto", unit="point", disable=not progress):
            path = _point_path(out, method, scope, budget)
            done = _load_point(path, profile.sha256)
            if done is None:
                scoped = spec.model_copy(update={"sensitivity": method, "scope": Scope(scope)})
                uniform_width = method == "uniform" and float(budget) in {float(w) for w in spec.bits}
                plan = make_plan(scoped, profile, uniform_budget(spec, profile, int(budget)) if uniform_width else budget)
                key = plan_key(plan)
                measured = cache.get(key) or measure_plan(plan, judge, Path(tmp))
                cache[key] = measured
                point = {"method": method, "scope": scope, "budget_avg_bits": budget, "profile_sha256": profile.sha256,
                         "avg_bits": plan.totals["avg_bits"], "avg_code_bits": plan.totals["avg_code_bits"],
                         "bytes": plan.totals["bytes"], "gap": plan.solver.gap, "plan_key": key,
                         **measured.summary()}
                _save_point(path, point, measured)
                done = point, measured
            results.append(done)
    return results


def run_pareto(spec_path: Path, out: Path, methods=None, scopes=("global", "layer"), progress: bool = True,
               text_windows: int | None = None, questions: int | None = None) -> dict:
    """The whole sweep on the demo model; writes CSV, JSON, PNG and a Markdown report into ``out``."""
    from .planner import load_spec
    from .schemas import read_profile

    spec = load_spec(spec_path)
    if spec.sweep is None:
        raise InputError(f"{spec_path}: no sweep section (e.g. sweep: {{avg_bits: [2.25, 2.5, 2.75, 3.0]}})")
    budgets = [b.avg_bits for b in spec.sweep.budgets()]
    if any(b is None for b in budgets):
        raise InputError(f"{spec_path}: sweep: mopeq pareto sweeps avg_bits budgets")
    out.mkdir(parents=True, exist_ok=True)
    profile_path = out / "profile.json"
    methods = list(methods or DEFAULT_METHODS)
    if not profile_path.is_file():
        _profile_demo(spec, profile_path, methods, progress)
    profile = read_profile(profile_path)
    methods = [m for m in methods if m in ("frequency", "uniform", "ablation") or m in profile.experts[0].sensitivity]
    judge = DemoJudge(text_windows, questions=questions)
    results = sweep_points(spec, profile, out, methods, list(scopes), budgets, judge, progress)
    return write_outputs(out, results, judge)


def _profile_demo(spec, path: Path, methods, progress: bool) -> None:
    from .models import open_model
    from .profiler.calibration import demo_batches, summary
    from .profiler.profile import profile_model
    from .schemas import write_profile

    loaded = open_model("demo")
    batches = demo_batches(loaded.config)
    extra = {}
    curvature = [m for m in methods if m in ("hessian", "fisher", "gauss-newton")]
    if curvature:
        extra["curvature"] = curvature
    if "ablation" in methods:
        extra["ablation"] = True
    profile = profile_model(loaded, batches, summary(batches, "demo"), spec.bits, spec.group_size, spec.symmetric,
                            spec.clip_search, progress=progress, **extra)
    write_profile(profile, path)


def write_outputs(out: Path, results, judge: DemoJudge) -> dict:
    rows = [p for p, _ in results]
    cols = ["method", "scope", "budget_avg_bits", "avg_bits", "avg_code_bits", "bytes", "perplexity",
            "accuracy", "kl", "gap"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_text(out / "points.csv", table.getvalue())
    reference = dict(judge.reference.summary(), kl=0.0)
    comparisons = compare(results)
    _atomic_text(out / "points.json", json.dumps({"version": 1, "unquantized": reference, "points": rows,
                                                  "comparisons": comparisons}, indent=1) + "\n")
    atomic_write(out / "pareto.png", lambda tmp: plot(rows, reference, tmp))
    _atomic_text(out / "report.md", report(rows, reference, comparisons))
    return {"unquantized": reference, "points": rows, "comparisons": comparisons}


def compare(results) -> list[dict]:
    """At each budget: every method vs. frequency and vs. the uniform plan under the same budget (paired bootstrap)."""
    by = {(p["method"], p["scope"], p["budget_avg_bits"]): m for p, m in results}
    out = []
    for (method, scope, budget), m in sorted(by.items()):
        if method in ("uniform", "frequency"):
            continue
        baselines = {"frequency": by.get(("frequency", scope, budget)), "uniform": by.get(("uniform", "global", budget)),
                     "uniform 3-bit": by.get(("uniform", "global", 3.0)) if budget < 3.0 else None}
        for name, base in baselines.items():
            if base is None:
                continue
            d, lo, hi = paired_interval(m.nll, base.nll, ppl_stat)
            a, alo, ahi = paired_interval(m.correct, base.correct, np.mean)
            out.append({"method": method, "scope": scope, "budget_avg_bits": budget, "versus": name,
                        "perplexity_diff": d, "perplexity_ci": [lo, hi], "accuracy_diff": a, "accuracy_ci": [alo, ahi]})
    return out


def best_method(rows, scope: str = "global") -> tuple[str, float] | None:
    """The curvature-based method with the lowest mean perplexity over the sweep's budgets."""
    means = {}
    for method in {r["method"] for r in rows} - {"uniform", "frequency", "ablation"}:
        pts = [r["perplexity"] for r in rows if r["method"] == method and r["scope"] == scope]
        if pts:
            means[method] = sum(pts) / len(pts)
    return min(means.items(), key=lambda kv: kv[1]) if means else None


def gap_recovered(rows, method: str, scope: str, budget: float) -> float | None:
    """Share of the uniform-2-bit -> uniform-3-bit perplexity gap that ``method`` recovers at ``budget``."""
    find = lambda m, s, b: next((r for r in rows if (r["method"], r["scope"], r["budget_avg_bits"]) == (m, s, b)), None)  # noqa: E731
    u2, u3, point = find("uniform", "global", 2.0), find("uniform", "global", 3.0), find(method, scope, budget)
    if not (u2 and u3 and point) or u2["perplexity"] == u3["perplexity"]:
        return None
    return (u2["perplexity"] - point["perplexity"]) / (u2["perplexity"] - u3["perplexity"])


def plot(rows, reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in rows})
    color = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}  # one colour per method
    for (method, scope) in sorted({(r["method"], r["scope"]) for r in rows}):
        pts = sorted((r for r in rows if (r["method"], r["scope"]) == (method, scope)), key=lambda r: r["bytes"])
        style = "s--" if method == "uniform" else ("o-" if scope == "global" else "^:")
        for ax, key in zip(axes, ("perplexity", "accuracy")):
            ax.plot([p["avg_code_bits"] for p in pts], [p[key] for p in pts], style, color=color[method],
                    label=f"{method} ({scope})")
    for ax, key, label in zip(axes, ("perplexity", "accuracy"), ("held-out perplexity (per byte)", "question accuracy")):
        ax.axhline(reference[key], color="k", lw=1, label="unquantized")
        ax.set_xlabel("average expert bits (codes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("mopeq on the demo model: size vs. measured quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def report(rows, reference: dict, comparisons) -> str:
    lines = ["# mopeq Pareto report (demo model)", "",
             f"Unquantized: perplexity {reference['perplexity']:.4f}, accuracy {100 * reference['accuracy']:.2f} %.", "",
             "| method | scope | budget (avg bits) | avg code bits | perplexity | accuracy | KL | gap recovered |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget_avg_bits"], r["method"], r["scope"])):
        g = gap_recovered(rows, r["method"], r["scope"], r["budget_avg_bits"])
        lines.append(f"| {r['method']} | {r['scope']} | {r['budget_avg_bits']:.2f} | {r['avg_code_bits']:.3f} | "
                     f"{r['perplexity']:.4f} | {100 * r['accuracy']:.2f} % | {r['kl']:.4f} | "
                     f"{'' if g is None else f'{100 * g:.0f} %'} |")
    best = best_method(rows)
    if best is not None:
        budgets = sorted({r["budget_avg_bits"] for r in rows if r["method"] == best[0]})
        recovered = {b: gap_recovered(rows, best[0], "global", b) for b in budgets}
        lines += ["", f"Best curvature source (global scope, lowest mean perplexity over the sweep): **{best[0]}**; "
                  "share of the uniform 2-bit -> 3-bit perplexity gap it recovers: "
                  + ", ".join(f"{100 * g:.0f} % at {b:.2f} bits" for b, g in recovered.items() if g is not None) + "."]
    lines += ["", "Paired bootstrap (95 %) of perplexity differences (negative = better than the baseline):", "",
              "| method | scope | budget | vs. | Δ perplexity | interval | Δ accuracy | interval |", "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['method']} | {c['scope']} | {c['budget_avg_bits']:.2f} | {c['versus']} | "
                     f"{c['perplexity_diff']:+.4f} | [{c['perplexity_ci'][0]:+.4f}, {c['perplexity_ci'][1]:+.4f}] | "
                     f"{100 * c['accuracy_diff']:+.2f} | [{100 * c['accuracy_ci'][0]:+.2f}, {100 * c['accuracy_ci'][1]:+.2f}] |")
    return "\n".join(lines) + "\n"
