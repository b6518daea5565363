"""The planner: YAML budget spec + profile.json -> plan.json (per-expert bit widths, proven optimal)."""

from .pareto import sweep, write_pareto
from .plan import make_plan
from .spec import Budget, Spec, load_spec, parse_bytes

__all__ = ["Budget", "Spec", "load_spec", "make_plan", "parse_bytes", "sweep", "write_pareto"]
