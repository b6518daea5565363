"""``mopeq demo``: the whole chain on the built-in demo model, ending in one table."""

from __future__ import annotations

import time
from pathlib import Path

from ..schemas import InputError

REPO_SPECS = Path(__file__).resolve().parents[2] / "specs"


def default_spec() -> Path:
    path = REPO_SPECS / "demo.yaml"
    if not path.is_file():
        raise InputError(f"{path}: default demo spec not found; pass --spec")
    return path


def run_demo(spec_path: Path | None, out: Path, progress: bool = True) -> dict:
    """Profile, plan, compile, load and evaluate; print and return the table's numbers."""
    from ..compiler.artifact import compile_artifact
    from ..evaluate import demo_quality
    from ..models import DEMO, open_model
    from ..planner import load_spec, make_plan
    from ..profiler.calibration import demo_batches, summary
    from ..profiler.profile import profile_model
    from ..runtime.load import load
    from ..schemas import read_plan, read_profile, write_plan, write_profile

    start = time.time()
    spec = load_spec(spec_path or default_spec())
    out.mkdir(parents=True, exist_ok=True)
    step = _stepper(progress)
    loaded = open_model(DEMO)
    step("evaluate the unquantized model")
    base = demo_quality(loaded, progress)
    step("profile")
    batches = demo_batches(loaded.config)
    profile = profile_model(loaded, batches, summary(batches, DEMO), spec.bits, spec.group_size, spec.symmetric,
                            spec.clip_search, progress=progress)
    write_profile(profile, out / "profile.json")
    step("plan")
    write_plan(make_plan(spec, read_profile(out / "profile.json")), out / "plan.json")
    plan = read_plan(out / "plan.json")
    step("compile")
    artifact = compile_artifact(DEMO, plan, out / "artifact", overwrite=True, progress=progress)
    step("load the artifact and evaluate")
    quant = demo_quality(load(artifact), progress)
    row = _table(loaded, profile, plan, artifact, base, quant)
    print(f"\n(total {time.time() - start:.0f}s; outputs in {out})")
    return row


def _stepper(progress: bool):
    def step(name: str) -> None:
        if progress:
            print(f"== {name}", flush=True)
    return step


def _table(loaded, profile, plan, artifact: Path, base: dict, quant: dict) -> dict:
    expert_bf16 = sum(n.bf16_bytes for n in profile.experts)
    dense_bytes = sum(p.numel() * 2 for p in loaded.model.parameters())
    on_disk = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
    row = {
        "unquantized_perplexity": base["perplexity"], "unquantized_accuracy": base["accuracy"],
        "unquantized_bytes_fp16": dense_bytes, "expert_bytes_fp16": expert_bf16,
        "plan_avg_bits": plan.totals["avg_bits"], "plan_avg_code_bits": plan.totals["avg_code_bits"],
        "plan_expert_bytes": plan.totals["bytes"],
        "artifact_bytes": on_disk, "quantized_perplexity": quant["perplexity"], "quantized_accuracy": quant["accuracy"],
        "solver": f"{plan.solver.backend} {plan.solver.status} gap {plan.solver.gap:.1e}",
    }
    lines = [
        ("", "unquantized", "quantized"),
        ("held-out perplexity (per byte)", f"{base['perplexity']:.4f}", f"{quant['perplexity']:.4f}"),
        ("held-out question accuracy", f"{100 * base['accuracy']:.2f} %", f"{100 * quant['accuracy']:.2f} %"),
        ("expert weights", f"{expert_bf16 / 2**20:.2f} MiB (fp16)", f"{plan.totals['bytes'] / 2**20:.2f} MiB (plan)"),
        ("model on disk", f"{dense_bytes / 2**20:.2f} MiB (fp16)", f"{on_disk / 2**20:.2f} MiB (artifact)"),
        ("average expert bits (codes)", "16", f"{plan.totals['avg_code_bits']:.3f}"),
        ("average expert bits (with scales)", "16", f"{plan.totals['avg_bits']:.3f}"),
        ("solver", "", row["solver"]),
    ]
    width = max(len(a) for a, _, _ in lines)
    print()
    for a, b, c in lines:
        print(f"{a:<{width}}  {b:>22}  {c:>34}")
    return row
