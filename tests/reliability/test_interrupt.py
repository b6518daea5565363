"""Interrupted work: ``mopeq profile`` / ``compile`` / ``pareto`` stopped at each commit point (just before and
just after it) leave no half-written output at the target path, and a rerun resumes, redoes no finished
step and ends byte-identical to an uninterrupted run. Faults are injected in-process at the commit points
(deterministic); one subprocess killed with SIGKILL checks that a real kill behaves the same."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import cli, main, tiny_profile_args, tree_bytes

DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "mopeq" / "demo" / "weights" / "model.safetensors"


class Crash(BaseException):
    """Stands for a kill: not an ``Exception``, so no error handler turns it into a clean exit."""


def crash_at(monkeypatch, owner, name: str, call: int, after: bool) -> None:
    """Make the ``call``-th call (0-based) of ``owner.name`` raise ``Crash``, before or after it did its work."""
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) - 1 == call and not after:
            raise Crash()
        out = real(*args, **kwargs)
        if len(calls) - 1 == call:
            raise Crash()
        return out

    monkeypatch.setattr(owner, name, wrapped)


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_spec, tmp_path_factory):
    """Uninterrupted streamed profile, plan and artifact of the tiny checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    assert main(tiny_profile_args(tiny_dir, out / "profile.json") + ["--resume", out / "ck"]) == 0
    assert main(["plan", tiny_spec, "--profile", out / "profile.json", "-o", out / "plan.json"]) == 0
    assert main(["compile", tiny_dir, "--plan", out / "plan.json", "-o", out / "artifact"]) == 0
    return out


# the streamed profile's commit points: each layer's hidden states, then its record (2 layers), then the profile
PROFILE_COMMITS = [("mopeq.profiler.stream", "atomic_write", n) for n in range(4)] + [("mopeq.schemas", "write_profile", 0)]


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("module,name,call", PROFILE_COMMITS)
def test_profile_stopped_at_a_commit_point_resumes(tiny_dir, reference, tmp_path, monkeypatch, module, name, call,
                                                   after):
    import importlib

    out, ck = tmp_path / "profile.json", tmp_path / "ck"
    args = tiny_profile_args(tiny_dir, out) + ["--resume", ck]
    with monkeypatch.context() as patch:
        crash_at(patch, importlib.import_module(module), name, call, after)
        with pytest.raises(Crash):
            main(args)
    assert not out.exists() or out.read_bytes() == (reference / "profile.json").read_bytes()
    assert not list(ck.glob("*.tmp"))  # nothing half-written under a final name
    finished = {p.name: p.stat().st_mtime_ns for p in ck.glob("layer-*.json")}
    assert all(json.loads((ck / p).read_text())["layer"] >= 0 for p in finished)
    assert main(args) == 0
    assert {p: (ck / p).stat().st_mtime_ns for p in finished} == finished  # finished layers were not redone
    assert out.read_bytes() == (reference / "profile.json").read_bytes()


@pytest.mark.parametrize("point", ["writing", "before-rename", "after-rename"])
def test_compile_stopped_leaves_the_previous_artifact_or_the_new_one(tiny_dir, reference, tmp_path, monkeypatch,
                                                                     point):
    from mopeq.compiler import artifact

    import shutil

    out = tmp_path / "artifact"
    shutil.copytree(reference / "artifact", out)  # an older artifact (mopeq's manifest) with a file of its own
    (out / "NOTE.txt").write_text("from an earlier compile")
    previous = tree_bytes(out)
    args = ["compile", tiny_dir, "--plan", reference / "plan.json", "-o", out, "--overwrite"]
    with monkeypatch.context() as patch:
        if point == "writing":
            crash_at(patch, artifact.StreamingShardWriter, "add", 3, after=False)
        else:
            crash_at(patch, artifact, "_replace", 0, after=point == "after-rename")
        with pytest.raises(Crash):
            main(args)
    if point == "after-rename":
        assert tree_bytes(out) == tree_bytes(reference / "artifact")
    else:
        assert tree_bytes(out) == previous  # untouched until the new one is complete
    assert main(args) == 0
    assert tree_bytes(out) == tree_bytes(reference / "artifact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no partial or moved-aside folder left


PARETO_SPEC = """version: 1
bits: [2, 3, 4]
group_size: 128
budget: {avg_bits: 2.5}
sensitivity: hessian-local
pins: [{match: "L*.S*", bits: 4}]
sweep: {avg_bits: [2.5, 2.75]}
"""


@pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="demo weights not trained yet (mopeq/demo/weights)")
def test_pareto_stopped_after_a_point_resumes(tmp_path, monkeypatch):
    from mopeq import pareto

    spec = tmp_path / "spec.yaml"
    spec.write_text(PARETO_SPEC)
    out = tmp_path / "out"
    args = ["pareto", spec, "--methods", "hessian-local", "--scopes", "global", "--eval-windows", "8",
            "--eval-questions", "16", "-o", out]
    with monkeypatch.context() as patch:
        crash_at(patch, pareto, "_save_point", 1, after=False)
        with pytest.raises(Crash):
            main(args)
    done = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    assert len(done) == 1 and not (out / "points.json").exists()
    json.loads(next(iter((out / "points").glob("*.json"))).read_text())  # the finished point is complete
    assert main(args) == 0
    assert {p: (out / "points" / p).stat().st_mtime_ns for p in done} == done
    points = json.loads((out / "points.json").read_text())["points"]
    assert len(points) == len(list((out / "points").glob("*.json"))) > 1


def test_profile_killed_for_real_then_resumed(tiny_dir, reference, tmp_path):
    """SIGKILL (no handler runs) once the first layer is checkpointed; the rerun continues from it."""
    out, ck = tmp_path / "profile.json", tmp_path / "ck"
    args = tiny_profile_args(tiny_dir, out) + ["--resume", ck]
    proc = cli(*args)
    start = time.time()
    while proc.poll() is None and not (ck / "layer-00000.json").exists() and time.time() - start < 120:
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    finished = {p.name: p.stat().st_mtime_ns for p in ck.glob("layer-*.json")}
    assert main(args) == 0
    assert {p: (ck / p).stat().st_mtime_ns for p in finished} == finished
    assert out.read_bytes() == (reference / "profile.json").read_bytes()
