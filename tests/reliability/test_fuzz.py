"""A short, derandomized fuzzing campaign (the long one is ``bench/fuzz.py``): mutated specs, profiles,
plans, artifacts and source checkpoints are either accepted or refused with a one-line ``InputError``;
never a traceback."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mopeq.schemas import InputError

FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=150)


def _feed(fuzz, corpus, target, rng, scratch) -> str:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        fuzz.run_one(target, corpus, rng, scratch)
    except InputError as exc:
        assert str(exc).strip() and "\n" not in str(exc), repr(str(exc))
        return "rejected"
    return "accepted"


@pytest.mark.parametrize("target", ["spec", "profile", "plan"])
def test_text_readers_never_crash(target, fuzz, corpus, tmp_path):
    outcomes = []

    @FAST
    @given(rng=st.randoms(use_true_random=False))
    def run(rng):
        outcomes.append(_feed(fuzz, corpus, target, rng, tmp_path / "scratch"))

    run()
    assert "rejected" in outcomes  # the campaign reached the error paths


@pytest.mark.parametrize("target", ["artifact", "checkpoint"])
def test_artifact_loader_and_compiler_never_crash(target, fuzz, corpus, tmp_path):
    """Damaged artifacts are loaded and what loads runs a forward; damaged source checkpoints (shards,
    headers, NaN/inf or reshaped tensors, configs) are compiled through the native RTN kernel."""
    outcomes = []

    @SLOW
    @given(rng=st.randoms(use_true_random=False))
    def run(rng):
        outcomes.append(_feed(fuzz, corpus, target, rng, tmp_path / "scratch"))

    run()
    assert {"accepted", "rejected"} <= set(outcomes)


def test_campaign_runner_counts_hangs_and_tracebacks(fuzz, corpus, tmp_path):
    """The bench harness itself: a clean target gives zero tracebacks and hangs within the input budget."""
    report = fuzz.campaign("plan", corpus, tmp_path / "scratch", inputs=50, seconds=60, limit_s=10)
    assert report["inputs"] == 50 and report["tracebacks"] == 0 and report["hangs"] == 0
    assert report["accepted"] + report["rejected"] == 50
