"""The budget spec: YAML in, a typed ``Spec`` out, errors naming the file, line and YAML path.

Example (``specs/demo.yaml``)::

    version: 1
    bits: [2, 3, 4]
    budget: {avg_bits: 2.5}
    pins: [{match: "L*.S*", bits: 4}]

    spec = load_spec("specs/demo.yaml")
"""

from __future__ import annotations

import json
import reprlib
from enum import Enum
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mopeq.schemas import InputError, parse_bytes

ALLOWED_BITS = (2, 3, 4, 8)
VLLM_BITS = (4, 8)


class Scope(str, Enum):
    GLOBAL = "global"
    LAYER = "layer"


class Target(str, Enum):
    NATIVE = "native"
    VLLM = "vllm"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _exactly_one_budget_kind(model):
    given = [k for k in ("bytes", "avg_bits", "fraction") if getattr(model, k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of bytes, avg_bits, fraction (got {given or 'none'})")
    return model


class Budget(Strict):
    """Exactly one of: bytes of all experts, average expert bits, or a fraction of their bf16 size."""

    bytes: Optional[Union[int, str]] = Field(None, description="e.g. 3500000000, '3.5 GB', '900MiB'")
    avg_bits: Optional[float] = Field(None, gt=0, le=16, description="packed bits per expert weight")
    fraction: Optional[float] = Field(None, gt=0, le=1, description="of the experts' bf16 bytes")

    @field_validator("bytes")
    @classmethod
    def _bytes(cls, value):
        return None if value is None else parse_bytes(value)

    @model_validator(mode="after")
    def _exactly_one(self):
        return _exactly_one_budget_kind(self)

    def describe(self) -> str:
        return next(f"{k} {getattr(self, k)}" for k in ("bytes", "avg_bits", "fraction") if getattr(self, k) is not None)


class Pin(Strict):
    """Widths for experts whose id matches a glob (``L*.S*``: shared experts; ``L3.*``: layer 3)."""

    match: str = Field(min_length=1)
    bits: Optional[Literal[2, 3, 4, 8]] = None
    min_bits: Optional[Literal[2, 3, 4, 8]] = None
    max_bits: Optional[Literal[2, 3, 4, 8]] = None

    @model_validator(mode="after")
    def _one_rule(self):
        if self.bits is None and self.min_bits is None and self.max_bits is None:
            raise ValueError("give bits, or min_bits and/or max_bits")
        if self.bits is not None and (self.min_bits is not None or self.max_bits is not None):
            raise ValueError("give either bits or min_bits/max_bits, not both")
        if self.min_bits is not None and self.max_bits is not None and self.min_bits > self.max_bits:
            raise ValueError(f"min_bits {self.min_bits} > max_bits {self.max_bits}")
        return self

    def allows(self, bits: int) -> bool:
        if self.bits is not None:
            return bits == self.bits
        return (self.min_bits or 0) <= bits <= (self.max_bits or 99)


class Clusters(Strict):
    per_layer: Optional[int] = Field(None, ge=1, description="clusters per layer; null = one per expert")
    method: Literal["kmeans", "graph"] = "kmeans"


class Range(Strict):
    start: float
    stop: float
    num: int = Field(ge=2, le=1000)

    def values(self) -> list[float]:
        return [float(v) for v in np.linspace(self.start, self.stop, self.num)]


class Sweep(Strict):
    """Budgets of a Pareto sweep: a list or an inclusive range for exactly one budget kind."""

    bytes: Optional[list[Union[int, str]]] = Field(None, min_length=1)
    avg_bits: Optional[Union[list[float], Range]] = None
    fraction: Optional[Union[list[float], Range]] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        return _exactly_one_budget_kind(self)

    def budgets(self) -> list[Budget]:
        kind = next(k for k in ("bytes", "avg_bits", "fraction") if getattr(self, k) is not None)
        values = getattr(self, kind)
        values = values.values() if isinstance(values, Range) else values
        return [Budget(**{kind: v}) for v in values]


class Solver(Strict):
    backend: Literal["auto", "dp", "highs"] = "auto"
    time_limit_s: float = Field(10.0, gt=0)
    seed: int = 0
    relative_gap: float = Field(0.0, ge=0, le=0.1, description="stop once proven within this gap")


class Spec(Strict):
    """A budget spec (``version: 1``). See specs/*.yaml and specs/schema.json."""

    version: Literal[1] = 1
    bits: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: [2, 3, 4], min_length=1)
    group_size: int = Field(128, ge=8, le=8192)
    symmetric: bool = False
    clip_search: bool = False
    budget: Budget
    scope: Scope = Scope.GLOBAL
    layer_budgets: dict[int, Budget] = Field(default_factory=dict, description="layer index -> budget")
    pins: list[Pin] = Field(default_factory=list)
    sensitivity: Literal["hessian", "fisher", "gauss-newton", "hessian-local", "ablation", "frequency",
                         "uniform"] = "hessian-local"
    clusters: Clusters = Field(default_factory=Clusters)
    target: Target = Target.NATIVE
    sweep: Optional[Sweep] = None
    solver: Solver = Field(default_factory=Solver)

    @field_validator("bits")
    @classmethod
    def _bits(cls, bits):
        if len(set(bits)) != len(bits):
            raise ValueError(f"duplicate widths in {bits}")
        return sorted(bits)

    @model_validator(mode="before")
    @classmethod
    def _vllm_defaults(cls, data):
        if isinstance(data, dict) and data.get("target") == "vllm":
            data = {"bits": list(VLLM_BITS), "symmetric": True, **data}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        for i, pin in enumerate(self.pins):
            if not any(pin.allows(b) for b in self.bits):
                raise ValueError(f"pins.{i} allows none of the candidate bits {self.bits}")
        if self.layer_budgets and self.scope != Scope.LAYER:
            raise ValueError("layer_budgets needs scope: layer")
        if self.target == Target.VLLM:
            _check_vllm(self)
        return self


def _check_vllm(spec: Spec) -> None:
    if not set(spec.bits) <= set(VLLM_BITS):
        raise ValueError(f"target vllm: bits must be a subset of {list(VLLM_BITS)}, got {spec.bits}")
    if not spec.symmetric or spec.group_size != 128:
        raise ValueError("target vllm: needs symmetric: true and group_size: 128 (what stock vLLM loads)")


def load_spec(path) -> Spec:
    """Read and validate a YAML spec; every error is one line ``file:line: yaml.path: problem``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: spec file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:200]
        raise InputError(f"{path}:{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise InputError(f"{path}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}:1: expected a mapping of spec fields, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise InputError(_describe(path, root, max(exc.errors(), key=lambda e: len(e["loc"])))) from None


def _describe(path: Path, root, error: dict) -> str:
    keys = [k for k in error["loc"] if isinstance(k, int) or not _is_union_tag(k)]
    node, where = _locate(root, keys)
    line = node.start_mark.line + 1
    dotted = ".".join(str(k) for k in where) or "(top level)"
    return f"{path}:{line}: {dotted}: {_problem(error)}"


def _is_union_tag(key: str) -> bool:
    return key in ("int", "str", "float", "list[float]", "Range", "list[union[int,str]]") or "[" in key


def _locate(root, keys):
    """The deepest YAML node along ``keys`` (and the keys it matched, plus any missing one)."""
    node, where = root, []
    for key in keys:
        child = _child(node, key)
        where.append(key)
        if child is None:
            break
        node = child
    return node, where


def _child(node, key):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if str(k.value) == str(key):
                return k if v is None else v
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]
    return None


_EXPECTED = {"float_parsing": "expected a number", "float_type": "expected a number",
             "int_parsing": "expected an integer", "int_type": "expected an integer",
             "int_from_float": "expected an integer", "bool_parsing": "expected true or false",
             "bool_type": "expected true or false", "string_type": "expected a string",
             "list_type": "expected a list", "dict_type": "expected a mapping",
             "model_type": "expected a mapping", "model_attributes_type": "expected a mapping"}


def _problem(error: dict) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return "unknown field"
    message = error["msg"].removeprefix("Value error, ")
    expected = _EXPECTED.get(kind, message[:1].lower() + message[1:])
    return expected if isinstance(value, dict) else f"got {_SHORT.repr(value)}, {expected}"


# an alias bomb (YAML anchors nested 9 deep: billions of leaves) is shown as a few items, not expanded
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 4, 60


def write_schema(path) -> None:
    """Export the spec's JSON Schema (``specs/schema.json``)."""
    schema = Spec.model_json_schema()
    Path(path).write_text(json.dumps(schema, indent=1) + "\n")
