"""Same inputs and seed -> byte-identical profile.json, plan.json and artifact, across runs and across a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from .conftest import main, tiny_profile_args, tree_bytes
from mopeq.profiler.calibration import summary, text_file_batches
from mopeq.profiler.stream import profile_streamed


def chain(tiny_dir: Path, spec: Path, out: Path, extra=()) -> dict[str, bytes]:
    assert main(tiny_profile_args(tiny_dir, out / "profile.json") + ["--curvature", "hessian,fisher", "--probes", "4",
                                                                     *extra]) == 0
    assert main(["plan", spec, "--profile", out / "profile.json", "-o", out / "plan.json"]) == 0
    assert main(["compile", tiny_dir, "--plan", out / "plan.json", "-o", out / "artifact"]) == 0
    return tree_bytes(out)


@pytest.fixture(scope="module")
def two_chains(tiny_dir, tiny_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("chains")
    return chain(tiny_dir, tiny_spec, out / "a"), chain(tiny_dir, tiny_spec, out / "b")


def test_chain_is_byte_identical_across_runs(two_chains):
    first, second = two_chains
    assert sorted(first) == sorted(second) and {"profile.json", "plan.json", "artifact/mopeq.json"} <= set(first)
    assert any(name.endswith(".safetensors") for name in first)
    assert first == second


class Interrupted(Exception):
    pass


def _stop_after_first_layer(layer: int) -> None:
    raise Interrupted(layer)


def test_resumed_profile_is_byte_identical(tiny_dir, tmp_path):
    calib = tiny_dir / "calib.txt"
    batches = text_file_batches(calib, AutoTokenizer.from_pretrained(tiny_dir))
    with pytest.raises(Interrupted):  # what a crash after layer 0 leaves behind: its checkpoint only
        profile_streamed(str(tiny_dir), batches, summary(batches, str(calib)), (2, 4), 8,
                         checkpoint_dir=tmp_path / "ck", on_layer_done=_stop_after_first_layer)
    assert [p.name for p in (tmp_path / "ck").glob("layer-*.json")] == ["layer-00000.json"]
    assert main(tiny_profile_args(tiny_dir, tmp_path / "resumed.json") + ["--resume", tmp_path / "ck"]) == 0
    assert main(tiny_profile_args(tiny_dir, tmp_path / "fresh.json") + ["--resume", tmp_path / "ck2"]) == 0
    assert (tmp_path / "resumed.json").read_bytes() == (tmp_path / "fresh.json").read_bytes()
