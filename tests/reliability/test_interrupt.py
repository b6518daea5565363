"""Interrupted work: ``mopeq profile`` / ``compile`` / ``pareto`` killed with SIGKILL at random moments leave
no half-written output at the target path, and a rerun resumes and ends byte-identical to an
uninterrupted run."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from .conftest import cli, tiny_profile_args, tree_bytes
from mopeq.cli import main as cli_main

DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "mopeq" / "demo" / "weights" / "model.safetensors"


def main(args) -> int:
    return cli_main([str(a) for a in args])


def kill_when(args, moment, timeout: float = 60.0) -> bool:
    """Start ``mopeq ARGS``; SIGKILL it once ``moment()()`` is true. Returns whether it was still running."""
    proc = cli(*args)
    ready = moment()  # clocks start with the process
    start = time.time()
    while proc.poll() is None and not ready() and time.time() - start < timeout:
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.kill()
    proc.communicate()
    return alive


def run(args) -> None:
    """``mopeq ARGS`` in a subprocess, like the killed runs, to completion."""
    proc = cli(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def after(seconds: float):
    def moment():
        start = time.time()
        return lambda: time.time() - start >= seconds
    return moment


def exists(directory: Path, pattern: str):
    return lambda: lambda: any(directory.glob(pattern))


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_spec, tmp_path_factory):
    """Uninterrupted streamed profile, plan and artifact of the tiny checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    assert main(tiny_profile_args(tiny_dir, out / "profile.json") + ["--resume", out / "ck"]) == 0
    assert main(["plan", tiny_spec, "--profile", out / "profile.json", "-o", out / "plan.json"]) == 0
    assert main(["compile", tiny_dir, "--plan", out / "plan.json", "-o", out / "artifact"]) == 0
    return out


def test_profile_killed_then_resumed(tiny_dir, reference, tmp_path):
    out, ck = tmp_path / "profile.json", tmp_path / "ck"
    args = tiny_profile_args(tiny_dir, out) + ["--resume", ck]
    rng = random.Random(10)
    moments = [exists(ck, "layer-00000.json"), after(rng.uniform(2.5, 5.5)), after(rng.uniform(2.5, 5.5))]
    for ready in moments:
        kill_when(args, ready)
        assert not out.exists() or out.read_bytes() == (reference / "profile.json").read_bytes()
        assert all(json.loads(p.read_text())["layer"] >= 0 for p in ck.glob("layer-*.json"))  # never half-written
    finished = {p.name: p.stat().st_mtime_ns for p in ck.glob("layer-*.json")}
    assert finished, "the first kill came after layer 0 was checkpointed"
    assert main(args) == 0
    assert {p: (ck / p).stat().st_mtime_ns for p in finished} == finished  # finished layers were not redone
    assert out.read_bytes() == (reference / "profile.json").read_bytes()


def test_compile_killed_then_rerun(tiny_dir, reference, tmp_path):
    out = tmp_path / "artifact"
    args = ["compile", tiny_dir, "--plan", reference / "plan.json", "-o", out, "--overwrite"]
    rng = random.Random(11)
    moments = [exists(tmp_path, ".artifact.partial"), after(rng.uniform(2.5, 5.5))]
    for ready in moments:
        kill_when(args, ready)
        # the partial directory is only renamed into place once complete
        assert not out.exists() or tree_bytes(out) == tree_bytes(reference / "artifact")
    assert main(args) == 0
    assert tree_bytes(out) == tree_bytes(reference / "artifact")


PARETO_SPEC = """version: 1
bits: [2, 3, 4]
group_size: 128
budget: {avg_bits: 2.5}
sensitivity: hessian-local
pins: [{match: "L*.S*", bits: 4}]
sweep: {avg_bits: [2.5, 2.75]}
"""


@pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="demo weights not trained yet (mopeq/demo/weights)")
def test_pareto_killed_then_resumed(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(PARETO_SPEC)
    args = ["pareto", spec, "--methods", "hessian-local", "--scopes", "global", "--eval-windows", "24",
            "--eval-questions", "60"]
    reference = tmp_path / "reference"
    run(args + ["-o", reference])  # every run in a fresh process: float results depend on the thread count
    out = tmp_path / "out"
    for ready in [exists(out / "points", "*.json"), after(random.Random(12).uniform(3.0, 8.0))]:
        kill_when(args + ["-o", out], ready)
        for path in (out / "points").glob("*.json"):
            json.loads(path.read_text())  # every finished point is complete
    done = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    assert done
    run(args + ["-o", out])
    assert {p: (out / "points" / p).stat().st_mtime_ns for p in done} == done
    for name in ("points.csv", "points.json", "report.md"):
        assert (out / name).read_text() == (reference / name).read_text()
