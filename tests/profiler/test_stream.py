"""Layer-streamed profiling: equal to the in-memory profile, never fully resident, resumable."""

from __future__ import annotations

import pytest

from mopeq.models import open_model
from mopeq.profiler.calibration import summary, text_file_batches
from mopeq.profiler.profile import profile_model
from mopeq.profiler.stream import profile_streamed
from mopeq.schemas import InputError, write_profile


@pytest.fixture(scope="module")
def calib(tiny_dir):
    from transformers import AutoTokenizer

    batches = text_file_batches(tiny_dir / "calib.txt", AutoTokenizer.from_pretrained(tiny_dir), seq_len=32, batch=4,
                                max_windows=8)
    return batches, summary(batches, "calib.txt")


def test_streamed_matches_in_memory_and_stays_partial(tiny_dir, calib):
    batches, info = calib
    full = profile_model(open_model(tiny_dir), batches, info, bits=(2, 4), group_size=8, progress=False)
    streamed, stats = profile_streamed(tiny_dir, batches, info, bits=(2, 4), group_size=8)
    total = sum(p.numel() for p in open_model(tiny_dir).model.parameters())
    assert stats.peak_resident_params < 0.75 * total  # never the whole model at once
    assert stats.layers_loaded == [0, 1]
    assert streamed.meta.settings["streamed"] is True
    assert streamed.meta.calibration["loss"] == pytest.approx(full.meta.calibration["loss"], rel=1e-5)
    for a, b in zip(full.experts, streamed.experts):
        assert (a.id, a.tokens, a.perturbation) == (b.id, b.tokens, b.perturbation)
        assert b.trace["hessian-local"].mean == pytest.approx(a.trace["hessian-local"].mean, rel=1e-5)
    assert [e[:2] for e in full.edges] == [e[:2] for e in streamed.edges]


class Interrupt(Exception):
    pass


def test_resume_skips_finished_layers(tiny_dir, calib, tmp_path):
    batches, info = calib
    ckpt = tmp_path / "ckpt"

    def stop_after_first(layer):
        raise Interrupt(layer)

    with pytest.raises(Interrupt):
        profile_streamed(tiny_dir, batches, info, bits=(2, 4), group_size=8, checkpoint_dir=ckpt,
                         on_layer_done=stop_after_first)
    assert sorted(p.name for p in ckpt.iterdir()) == ["hidden-00000.safetensors", "layer-00000.json"]
    resumed, stats = profile_streamed(tiny_dir, batches, info, bits=(2, 4), group_size=8, checkpoint_dir=ckpt)
    assert stats.layers_loaded == [1]  # layer 0 was not redone
    fresh, _ = profile_streamed(tiny_dir, batches, info, bits=(2, 4), group_size=8)
    write_profile(resumed, tmp_path / "a.json")
    write_profile(fresh, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    with pytest.raises(InputError, match="different model, calibration or settings"):
        profile_streamed(tiny_dir, batches, info, bits=(2, 3), group_size=8, checkpoint_dir=ckpt)


@pytest.mark.parametrize("sources", [("fisher",), ("gauss-newton",), ("hessian",)])
def test_streamed_curvature_equals_in_memory(tiny_dir, calib, sources, tmp_path):
    """The backward sweep (one layer resident) gives the in-memory traces with the same seed, boundary
    activations kept in RAM or in a scratch folder."""
    batches, info = calib
    batches = batches[:2]
    kw = dict(bits=(2, 4), group_size=8, seed=3)
    probes = 4 if sources == ("hessian",) else 8
    full = profile_model(open_model(tiny_dir), batches, info, progress=False, curvature=sources, probes=probes,
                         tolerance=0.0, **kw)
    for boundaries in (None, tmp_path / "scratch"):
        streamed, _ = profile_streamed(tiny_dir, batches, info, curvature=sources, probes=probes, tolerance=0.0,
                                       boundaries=boundaries, **kw)
        assert streamed.meta.settings["curvature"] == list(sources)
        for a, b in zip(full.experts, streamed.experts):
            ta, tb = a.trace[sources[0]], b.trace[sources[0]]
            assert (ta.probes, a.id) == (tb.probes, b.id)
            assert tb.mean == pytest.approx(ta.mean, rel=1e-4, abs=1e-10)
            assert tb.stderr == pytest.approx(ta.stderr, rel=1e-3, abs=1e-10)
            assert b.sensitivity[sources[0]]["2"] == pytest.approx(a.sensitivity[sources[0]]["2"], rel=1e-4, abs=1e-12)


def test_curvature_sweep_resumes_below_the_last_finished_layer(tiny_dir, calib, tmp_path, monkeypatch):
    """Killed inside the backward sweep, a rerun with the same --resume folder redoes no finished layer and
    writes the same profile as an uninterrupted run."""
    from mopeq.profiler import stream_curvature

    batches, info = calib
    batches = batches[:2]
    kw = dict(bits=(2,), group_size=8, curvature=("gauss-newton",), probes=4, tolerance=0.0)
    real, calls = stream_curvature._layer_sums, []

    def interrupted(*args, **kwargs):
        calls.append(args[4])  # the layer
        if len(calls) == 2:
            raise Interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_curvature, "_layer_sums", interrupted)
    with pytest.raises(Interrupt):
        profile_streamed(tiny_dir, batches, info, checkpoint_dir=tmp_path / "ck", **kw)
    assert calls == [1, 0]
    kept = sorted(p.name for p in (tmp_path / "ck" / "boundaries" / "cotangents").rglob("*.safetensors"))
    assert kept and all(name.startswith("L00001-") for name in kept)  # on disk, at the committed layer only
    calls.clear()
    resumed, _ = profile_streamed(tiny_dir, batches, info, checkpoint_dir=tmp_path / "ck", **kw)
    assert calls == [0]  # layer 1 of the sweep was finished before the interruption
    assert not list((tmp_path / "ck" / "boundaries" / "cotangents").rglob("*.safetensors"))
    monkeypatch.setattr(stream_curvature, "_layer_sums", real)
    fresh, _ = profile_streamed(tiny_dir, batches, info, **kw)
    write_profile(resumed, tmp_path / "a.json")
    write_profile(fresh, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_scratch_folder_without_room_is_refused_before_any_layer(tiny_dir, calib, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    batches, info = calib
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(InputError, match=r"scratch|GiB free, the layer inputs kept for the curvature sweeps need"):
        profile_streamed(tiny_dir, batches, info, curvature=("fisher",), boundaries=tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("stop,reloaded", [(3, [1, 1, 0]), (4, [0])], ids=["forward-tangents", "backward"])
def test_hessian_sweep_resumes_per_layer(tiny_dir, calib, tmp_path, monkeypatch, stop, reloaded):
    """Killed in the Hessian's forward-tangent pass (at layer 1) or after its backward pass finished layer 1, a
    rerun redoes only what was not committed and writes the uninterrupted profile."""
    from mopeq.profiler.stream import LayerStreamer

    batches, info = calib
    batches = batches[:2]
    kw = dict(bits=(2,), group_size=8, curvature=("hessian",), probes=2, tolerance=0.0)
    fresh, _ = profile_streamed(tiny_dir, batches, info, **kw)
    real_unload, real_load, unloads, loads = LayerStreamer.unload_layer, LayerStreamer.load_layer, [], []

    def unload(self, layer):  # calls 0-1: the profile's forward pass; 2-3: tangents; 4-5: backward
        unloads.append(layer)
        if len(unloads) - 1 == stop:
            raise Interrupt()
        return real_unload(self, layer)

    monkeypatch.setattr(LayerStreamer, "unload_layer", unload)
    with pytest.raises(Interrupt):
        profile_streamed(tiny_dir, batches, info, checkpoint_dir=tmp_path / "ck", **kw)
    monkeypatch.setattr(LayerStreamer, "unload_layer", real_unload)
    monkeypatch.setattr(LayerStreamer, "load_layer",
                        lambda self, layer, *a, **k: loads.append(layer) or real_load(self, layer, *a, **k))
    resumed, _ = profile_streamed(tiny_dir, batches, info, checkpoint_dir=tmp_path / "ck", **kw)
    assert loads == reloaded
    write_profile(resumed, tmp_path / "a.json")
    write_profile(fresh, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "list", "missing-batch"])
def test_damaged_resume_folder_is_refused_in_one_line(tiny_dir, calib, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    batches, info = calib
    ckpt = tmp_path / "ckpt"

    def stop(layer):
        raise Interrupt(layer)

    with pytest.raises(Interrupt):
        profile_streamed(tiny_dir, batches, info, bits=(2,), group_size=8, checkpoint_dir=ckpt, on_layer_done=stop)
    record, hidden = ckpt / "layer-00000.json", ckpt / "hidden-00000.safetensors"
    if damage == "truncated":
        record.write_text(record.read_text()[:40])
    elif damage == "list":
        record.write_text("[1, 2]")
    else:
        state = load_file(str(hidden))
        state.pop(f"batch{len(state) - 1}")
        save_file(state, str(hidden))
    with pytest.raises(InputError, match="damaged resume checkpoint") as err:
        profile_streamed(tiny_dir, batches, info, bits=(2,), group_size=8, checkpoint_dir=ckpt)
    assert "\n" not in str(err.value)
