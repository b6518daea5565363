"""Plans built directly (no planner) for compiler tests."""

from pathlib import Path

from mopeq.models import read_config, skeleton
from mopeq.schemas import ExpertPlan, Plan, SolverReport, config_hash


def make_plan(directory: Path, bits, group_size: int = 32, symmetric: bool = False, clip_search: bool = False,
              spec: dict | None = None) -> Plan:
    """A Plan for every expert of the model at ``directory``; ``bits`` is an int or a function of the ExpertRef."""
    config = read_config(Path(directory))
    refs = skeleton(config, Path(directory)).experts()
    choose = bits if callable(bits) else (lambda ref: bits)
    return Plan(model_id=Path(directory).name, family=config["model_type"], config_hash=config_hash(config),
                profile_sha256="0" * 64, spec=spec or {}, group_size=group_size, symmetric=symmetric,
                clip_search=clip_search, experts={r.id: ExpertPlan(bits=choose(r), cluster=r.id) for r in refs},
                layers={}, totals={}, solver=SolverReport(backend="test", status="optimal", objective=0.0, bound=0.0,
                                                          gap=0.0, seconds=0.0))
