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
