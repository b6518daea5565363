"""``mopeq profile --max-memory``: refused before loading (one line, exit 2) when the estimated need does
not fit; layer-streamed when only that fits; in memory when everything fits."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from .conftest import main, tiny_profile_args
from mopeq.models import open_model
from mopeq.profiler.calibration import text_file_batches
from mopeq.safety import profile_memory, streamed_curvature_needs


def need(tiny_dir, whole_model: bool) -> dict:
    batches = text_file_batches(tiny_dir / "calib.txt", AutoTokenizer.from_pretrained(tiny_dir))
    return profile_memory(tiny_dir, batches, whole_model)


def test_estimate_covers_the_float32_weights(tiny_dir):
    est = need(tiny_dir, whole_model=True)
    params = sum(p.numel() for p in open_model(tiny_dir).model.parameters())
    assert est["weights"] == 4 * params
    assert est["largest_layer"] < est["weights"] and est["streamed"] < est["in_memory"]
    assert est["curvature"] >= 3 * est["weights"] and est["activations"] > 0


def test_too_small_for_anything_is_refused_before_loading(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(tiny_profile_args(tiny_dir, out) + ["--max-memory", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "even layer-streamed profiling" in err and "raise --max-memory" in err
    assert not out.exists()


def test_curvature_that_does_not_fit_streams_with_a_backward_sweep(tiny_dir, tmp_path, capsys):
    """Curvature under a limit below the in-memory need: layer-streamed, boundaries in RAM when they fit, else
    in a scratch folder; ablation (whole model only) is refused in one line."""
    plain, full = need(tiny_dir, whole_model=False), need(tiny_dir, whole_model=True)
    limit = streamed_curvature_needs(plain, ["fisher"], 8)[0]  # boundaries and cotangents in RAM
    assert limit < full["in_memory"]
    out = tmp_path / "p.json"
    assert main(tiny_profile_args(tiny_dir, out) + ["--curvature", "fisher", "--max-memory", limit]) == 0
    settings = json.loads(out.read_text())["graph"]["settings"]
    assert settings["streamed"] is True and settings["curvature"] == ["fisher"]
    in_ram, on_disk = streamed_curvature_needs(plain, ["gauss-newton"], 4)
    capsys.readouterr()
    assert main(tiny_profile_args(tiny_dir, tmp_path / "d.json") + ["--curvature", "gauss-newton", "--probes", "4",
                                                                     "--max-memory", in_ram - 1]) == 0
    assert "layer inputs do not fit --max-memory; kept in" in capsys.readouterr().out
    assert main(tiny_profile_args(tiny_dir, tmp_path / "e.json") + ["--curvature", "gauss-newton", "--probes", "4",
                                                                     "--max-memory", on_disk - 1]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "even layer-streamed with the layer inputs on disk" in err
    assert not (tmp_path / "e.json").exists()
    assert main(tiny_profile_args(tiny_dir, tmp_path / "h.json") + ["--ablation", "--max-memory", limit]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "with --ablation needs the whole model" in err
    assert not (tmp_path / "h.json").exists()
    assert main(tiny_profile_args(tiny_dir, out) + ["--max-memory", limit]) == 0  # without curvature: in memory
    assert "streamed" not in json.loads(out.read_text())["graph"]["settings"]


def test_streamed_profile_is_checked_against_the_limit(tiny_dir, tmp_path, capsys):
    streamed = need(tiny_dir, whole_model=False)["streamed"]
    args = tiny_profile_args(tiny_dir, tmp_path / "p.json") + ["--resume", tmp_path / "ck"]
    assert main(args + ["--max-memory", streamed - 1]) == 2
    assert "even layer-streamed profiling" in capsys.readouterr().err
    assert main(args + ["--max-memory", streamed]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["graph"]["settings"]["streamed"] is True
