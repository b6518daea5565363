"""File contracts between the stages: ``profile.json`` (expert graph) and ``plan.json``.

Every hand-off carries a ``version`` and the hashes of its inputs, so a stale file is refused with a
clear message instead of silently mixing models. The planner reads only these types; the compiler
reads only ``Plan``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROFILE_VERSION = 1
PLAN_VERSION = 1

# Curvature / sensitivity sources, as written in profile.json and named in specs.
CURVATURE_SOURCES = ("hessian", "fisher", "gauss-newton", "hessian-local")
SENSITIVITY_SOURCES = CURVATURE_SOURCES + ("ablation", "frequency", "uniform")


class InputError(ValueError):
    """Bad user input: the CLI prints its message on one line and exits with code 2."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    """Hash of a model config dict, independent of key order and of transformers' bookkeeping fields."""
    skip = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "quantization_config"}
    clean = {k: v for k, v in config.items() if k not in skip}
    return sha256_bytes(json.dumps(clean, sort_keys=True, default=str).encode())[:16]


class Trace(BaseModel):
    """A curvature estimate restricted to one expert's weights."""

    mean: float
    stderr: float = 0.0
    probes: int = 0
    per_matrix: dict[str, float] = Field(default_factory=dict)


class ExpertNode(BaseModel):
    """Attributes of one node (one expert) of the expert graph."""

    model_config = ConfigDict(extra="allow")

    id: str  # "L{layer}.E{expert}" or "L{layer}.S{index}" for shared experts
    layer: int
    expert: int
    shared: bool = False
    params: int
    shapes: dict[str, list[int]]  # matrix -> [out, in]
    bytes: dict[str, int]  # bits (as str) -> packed bytes at that width
    bf16_bytes: int
    tokens: int = 0
    frequency: float = 0.0  # tokens routed / calibration tokens
    routing_mass: float = 0.0  # summed routing weight / calibration tokens
    tokens_by_modality: dict[str, int] = Field(default_factory=dict)
    trace: dict[str, Trace] = Field(default_factory=dict)  # source -> estimate
    perturbation: dict[str, float] = Field(default_factory=dict)  # bits -> ||W - Q_b(W)||^2
    sensitivity: dict[str, dict[str, float]] = Field(default_factory=dict)  # source -> bits -> Omega
    ablation: dict[str, float] = Field(default_factory=dict)  # bits -> calibration loss increase


class ProfileMeta(BaseModel):
    """Graph-level attributes of ``profile.json``."""

    model_config = ConfigDict(extra="allow")

    version: int = PROFILE_VERSION
    model_id: str
    family: str
    config_hash: str
    calibration: dict[str, Any]
    settings: dict[str, Any]  # bits, group_size, symmetric, clip_search, seed, ...
    top_k: int
    non_expert_bytes: int = 0


class Profile(BaseModel):
    meta: ProfileMeta
    experts: list[ExpertNode]
    edges: list[tuple[str, str, float]] = Field(default_factory=list)  # same-layer similarity
    sha256: str = ""

    def graph(self) -> nx.Graph:
        g = nx.Graph(**self.meta.model_dump())
        for node in self.experts:
            g.add_node(node.id, **node.model_dump(exclude={"id"}))
        for a, b, w in self.edges:
            g.add_edge(a, b, weight=w)
        return g


def write_profile(profile: Profile, path: Path) -> None:
    data = nx.node_link_data(profile.graph(), edges="edges")
    _atomic_write_json(path, data)


def read_profile(path: Path) -> Profile:
    raw = _read_json(path, "profile")
    _check_node_link(path, raw)
    ids = [n["id"] for n in raw.get("nodes", [])]
    if len(set(map(str, ids))) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: expert {twice} listed twice; not a mopeq profile")
    try:
        graph = nx.node_link_graph(raw, edges="edges")
        meta = ProfileMeta(**graph.graph)
        nodes = [ExpertNode(id=n, **attrs) for n, attrs in graph.nodes(data=True)]
        edges = [(a, b, float(d.get("weight", 0.0))) for a, b, d in graph.edges(data=True)]
    except (ValidationError, KeyError, TypeError, ValueError, nx.NetworkXError) as exc:
        raise InputError(f"{path}: not a mopeq profile ({_first_error(exc)})") from None
    if meta.version != PROFILE_VERSION:
        raise InputError(f"{path}: profile version {meta.version}, expected {PROFILE_VERSION}; re-run `mopeq profile`")
    return Profile(meta=meta, experts=nodes, edges=edges, sha256=sha256_file(path))


def _check_node_link(path: Path, raw: Any) -> None:
    """The networkx node-link shape (before networkx sees it), and no NaN or infinite numbers anywhere."""
    if not isinstance(raw, dict) or not isinstance(raw.get("graph", {}), dict):
        raise InputError(f"{path}: not a mopeq profile (expected an object with graph, nodes and edges)")
    for part, needs in (("nodes", ("id",)), ("edges", ("source", "target"))):
        items = raw.get(part, [])
        if not isinstance(items, list) or not all(isinstance(x, dict) and all(k in x for k in needs) for x in items):
            raise InputError(f"{path}: not a mopeq profile ({part}: expected a list of objects with {', '.join(needs)})")
        if not all(isinstance(x[k], (str, int)) for x in items for k in needs):
            raise InputError(f"{path}: not a mopeq profile ({part}: {', '.join(needs)} must be strings)")
    bad = _non_finite(raw)
    if bad:
        raise InputError(f"{path}: {bad} is NaN or infinite; profiles hold finite numbers only")


def _non_finite(value: Any, where: str = "") -> str:
    """Dotted path of the first NaN/inf number in a JSON tree ('' if none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found = _non_finite(child, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return ""


class SolverReport(BaseModel):
    backend: str
    status: str  # "optimal", "feasible", "infeasible"
    objective: float
    bound: float
    gap: float  # (objective - bound) / max(|objective|, eps), proven
    seconds: float = 0.0  # wall clock of the solve; kept in memory, not written to plan.json (determinism)


class ExpertPlan(BaseModel):
    bits: int
    cluster: str


class Plan(BaseModel):
    """What the compiler builds: one bit width per expert, and the evidence of how it was chosen."""

    model_config = ConfigDict(extra="allow")

    version: int = PLAN_VERSION
    model_id: str
    family: str
    config_hash: str
    profile_sha256: str
    spec: dict[str, Any]
    group_size: int
    symmetric: bool
    clip_search: bool = False
    experts: dict[str, ExpertPlan]  # expert id -> bits, cluster
    layers: dict[str, dict[str, float]]  # layer -> {bytes, budget_bytes, avg_bits}
    totals: dict[str, float]  # bytes, budget_bytes, avg_bits, bf16_bytes, predicted_loss
    solver: SolverReport


def write_plan(plan: Plan, path: Path) -> None:
    """Write ``plan.json``; the solve's wall-clock time is left out so equal inputs give equal bytes."""
    _atomic_write_json(path, plan_record(plan))


def plan_record(plan: Plan) -> dict:
    data = plan.model_dump()
    data["solver"].pop("seconds", None)
    return data


def read_plan(path: Path) -> Plan:
    raw = _read_json(path, "plan")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a mopeq plan (expected a JSON object, got {type(raw).__name__})")
    try:
        plan = Plan(**raw)
    except ValidationError as exc:
        raise InputError(f"{path}: not a mopeq plan ({_first_error(exc)})") from None
    if plan.version != PLAN_VERSION:
        raise InputError(f"{path}: plan version {plan.version}, expected {PLAN_VERSION}; re-run `mopeq plan`")
    return plan


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        return f"{where}: {err['msg']}"
    return str(exc)


def _read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        return strict_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:200]})") from None


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses what strict readers refuse: ``NaN``/``Infinity`` and duplicate keys (which
    would otherwise silently keep the last)."""
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    return json.loads(text, parse_constant=no_constant, object_pairs_hook=unique)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:([kKmMgGtT])(iB|B)?|B)?\s*$")


def parse_bytes(value: Any) -> int:
    """The one size syntax of specs and ``--max-memory``: a byte count, SI (``"3.5 GB"`` = 3.5e9, ``"12kB"``),
    IEC (``"900MiB"``) or a bare letter, binary as in ``ulimit`` and container limits (``"8G"`` = 8 GiB).
    ``ValueError`` for anything else."""
    if isinstance(value, bool):
        raise ValueError("expected a byte count or a size like '3.5 GB'")
    if isinstance(value, (int, float)) and value > 0 and float(value).is_integer():
        return int(value)
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError("expected a positive byte count or a size like '3.5 GB', '900MiB', '8G', '12kB'")
    number, letter, suffix = match.groups()
    power = "kmgt".index(letter.lower()) + 1 if letter else 0
    size = float(number) * (1000 if suffix == "B" else 1024) ** power
    if size < 1:
        raise ValueError("expected a size of at least 1 byte")
    return int(round(size))


def check_file_output(path) -> Path:
    """``path`` if a file can be written there; a one-line ``InputError`` for a folder (``.``, ``/``, a directory)."""
    path = Path(path)
    if Path(os.path.abspath(path)).name in ("", ".", "..") or path.is_dir():
        raise InputError(f"-o {path}: is a folder; give a file name, e.g. {path / 'out.json'}")
    return path


def atomic_write(path, write) -> Path:
    """``write(tmp)`` to a hidden temporary file beside ``path``, then rename it into place: readers see the old
    file or the whole new one. If writing fails (a full disk, an interruption) the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _atomic_write_json(path: Path, data: Any) -> None:
    path = check_file_output(path)
    try:
        text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
    except ValueError:
        raise InputError(f"{path}: a value is NaN or infinite; nothing written (strict JSON readers refuse them)") from None
    atomic_write(path, lambda tmp: tmp.write_text(text))
