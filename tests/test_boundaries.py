"""Adapters own everything family-specific: no switch on the model type outside ``mopeq/models``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SOURCES = ("mopeq", "profiler", "planner", "compiler", "runtime", "bench")
# `config["model_type"] == ...`, `config.get("model_type") in (...)`, `adapter.family == "molmo"`, ...
SWITCH = re.compile(r"""model_type[]"')]*\s*(==|!=|\bin\b|\bnot in\b)|\bfamily[]"')]*\s*(==|!=|\bin\b)\s*["'(]""")


def family_switches() -> list[str]:
    """``path:line: text`` of every model-type or family comparison in the source tree outside ``mopeq/models``."""
    hits = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_relative_to(ROOT / "mopeq" / "models"):
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if SWITCH.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return hits


def test_pattern_catches_the_usual_spellings():
    for line in ('config["model_type"] == "x"', "config.get('model_type') in ('a', 'b')", "model_type not in FAMILIES",
                 'if self.adapter.family == "molmo":', "model_type != 'demo'"):
        assert SWITCH.search(line), line
    for line in ('raise InputError(f"model_type {t!r} takes no images")', 'family=loaded.adapter.family,'):
        assert not SWITCH.search(line), line


def test_no_family_switch_outside_models():
    assert family_switches() == [], "move these decisions into the model adapters (mopeq/models)"


# --- import boundaries between the stages ----------------------------------------------------------------

STAGES = ("profiler", "planner", "compiler", "runtime")


def imported(package: str) -> dict[str, set[str]]:
    """``{file: the mopeq modules it imports}`` (``mopeq.x.y``; relative imports resolved, lazy ones included)."""
    import ast

    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        here = ["mopeq", package, *path.relative_to(ROOT / package).with_suffix("").parts]
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.split(".")[0] in ("mopeq", *STAGES)}
            elif isinstance(node, ast.ImportFrom):
                base = here[:-node.level] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names |= {f"{module}.{a.name}" if not node.module else module for a in node.names}
        out[str(path.relative_to(ROOT))] = {n if n.startswith("mopeq") else f"mopeq.{n}" for n in names
                                            if n.split(".")[0] in ("mopeq", *STAGES)}
    return out


def crossings(package: str, allowed) -> list[str]:
    return [f"{file}: {name}" for file, names in imported(package).items() for name in sorted(names)
            if name.split(".")[1] not in (package, *allowed) and not name.startswith(f"mopeq.{package}")]


def test_stages_import_only_what_they_may():
    """The runtime runs without the planner and the profiler; the planner needs only the file schemas; the
    compiler never plans."""
    everything_but = lambda *banned: [m for m in ("models", "schemas", "safety", "compiler", "runtime", "profiler",  # noqa: E731
                                                  "planner", "__version__", "demo", "vlm") if m not in banned]
    assert crossings("runtime", everything_but("planner", "profiler")) == []
    assert crossings("planner", ["schemas"]) == []
    assert crossings("compiler", everything_but("planner")) == []


def test_import_scan_sees_relative_and_lazy_imports():
    runtime = imported("runtime")
    assert "mopeq.compiler.pack" in runtime["runtime/qlayer.py"]  # `from ..compiler.pack import unpack_int32`
    assert any(n.startswith("mopeq.schemas") for n in imported("planner")["planner/plan.py"])
