"""Layer-streamed Gram collection (``collect_grams_streamed``) against the in-memory ``collect_grams``."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mopeq.models import open_model
from mopeq.profiler.gram import collect_grams, collect_grams_streamed, merge_parts, save_grams
from tests.models.conftest import build_transformers

from .conftest import tiny_batches


def read_all(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def header_and_data(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def assert_same_grams(model_dir, batches, tmp_path, weighting):
    loaded = open_model(model_dir)
    want = save_grams(collect_grams(loaded, batches, weighting, progress=False), loaded.config_hash,
                      tmp_path / "memory.safetensors", calibration="calib.txt")
    got = tmp_path / "streamed" / "grams.safetensors"
    recorder = collect_grams_streamed(model_dir, batches, got, weighting, calibration="calib.txt", progress=False)
    (want_meta, want_t), (got_meta, got_t) = read_all(want), read_all(got)
    assert got_meta == want_meta and list(got_t) == list(want_t)
    for name, tensor in want_t.items():
        assert got_t[name].dtype == torch.float32 and got_t[name].shape == tensor.shape
        # The streamed forward runs the same float32 ops layer by layer, but nothing promises bit-equal
        # reductions (e.g. batched vs. per-layer matmul paths): allow float32 rounding of O(1e3)-term sums.
        torch.testing.assert_close(got_t[name], tensor, rtol=1e-5, atol=1e-5 * float(tensor.abs().max()))
    assert header_and_data(got)[0]["__metadata__"] == want_meta
    assert sorted(p.name for p in got.parent.iterdir()) == ["grams.safetensors"]  # parts and temporaries removed
    per_layer = {}
    for name in want_t:
        per_layer[name.split(".")[0]] = per_layer.get(name.split(".")[0], 0) + 1
    assert recorder.peak_grams == max(per_layer.values()) and len(per_layer) > 1  # one layer's Grams at a time


@pytest.mark.parametrize("weighting", ["routing", "none"])
def test_streamed_equals_in_memory_deepseek(tiny_dir, tmp_path, weighting):
    assert_same_grams(tiny_dir, tiny_batches(), tmp_path, weighting)


def test_streamed_equals_in_memory_mixtral(tmp_path):
    directory = build_transformers("mixtral", tmp_path / "mixtral")
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 64, (2, 12), generator=gen), "modality": "text"} for _ in range(2)]
    assert_same_grams(directory, batches, tmp_path, "routing")


def test_merge_parts_matches_save_file(tmp_path):
    """Odd shapes, names split over parts out of order: same header entries and data bytes as one save_file."""
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in
               [("L10.E0.in", (7, 7)), ("L2.E1.mid", (13, 5)), ("L1.S0.in", (3,)), ("L2.E0.in", (11, 11))]}
    meta = {"format": "pt", "weighting": "routing"}
    save_file(tensors, str(tmp_path / "whole.safetensors"), metadata=meta)
    parts = []
    for i, names in enumerate([["L2.E1.mid", "L10.E0.in"], ["L1.S0.in"], ["L2.E0.in"]]):
        parts.append(tmp_path / f"part{i}.safetensors")
        save_file({n: tensors[n] for n in names}, str(parts[-1]))
    merged = merge_parts(parts, tmp_path / "merged.safetensors", meta, chunk_bytes=24)  # several chunks a tensor
    assert header_and_data(merged) == header_and_data(tmp_path / "whole.safetensors")
    assert (tmp_path / "merged.safetensors").stat().st_size % 8 == 0
