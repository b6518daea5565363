"""Zero-token experts, determinism, the CLI end to end, image calibration folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mopeq.cli import main
from mopeq.profiler.calibration import image_folder_batches
from mopeq.profiler.curvature import SOURCES
from mopeq.profiler.profile import profile_model
from mopeq.schemas import InputError


def test_zero_token_experts_get_finite_zero_curvature(make_tiny):
    tiny_model, tiny_batches = make_tiny
    loaded = tiny_model()
    with torch.no_grad():
        for layer in loaded.adapter.moe_layers():
            loaded.adapter.router(layer).weight.zero_()  # uniform scores: top-k ties pick the same two experts
    batches = tiny_batches(1)
    info = {"tokens": sum(b["input_ids"].numel() for b in batches)}
    prof = profile_model(loaded, batches, info, bits=(2, 4), group_size=8, progress=False,
                         curvature=SOURCES, probes=8, ablation=True)
    idle = [n for n in prof.experts if n.tokens == 0]
    assert len(idle) == 4 and all(not n.shared for n in idle)  # two idle routed experts per layer
    for node in idle:
        assert all(t.mean == 0.0 and t.stderr == 0.0 for t in node.trace.values())
        assert set(node.trace) == {"hessian-local", *SOURCES}
        assert all(v == 0.0 for s in node.sensitivity.values() for v in s.values())
        assert all(v == 0.0 for v in node.ablation.values())
    busy = [n for n in prof.experts if n.tokens > 0]
    assert all(n.trace["fisher"].mean > 0 and math.isfinite(n.trace["hessian"].mean) for n in busy)


def test_cli_profile_tiny_checkpoint_is_deterministic(tiny_dir, tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        assert main(["profile", str(tiny_dir), "--calib", str(tiny_dir / "calib.txt"), "-o", str(out), "--bits",
                     "2,4", "--group-size", "8", "--curvature", "hessian,fisher,gauss-newton", "--probes", "8"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    nodes = json.loads(outs[0].read_text())["nodes"]
    assert all(set(n["trace"]) == {"hessian-local", *SOURCES} for n in nodes)
    assert all(n["trace"]["hessian"]["probes"] == 8 for n in nodes)


def test_cli_resume_and_bad_curvature(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    assert main(["profile", str(tiny_dir), "--calib", str(tiny_dir / "calib.txt"), "-o", str(out), "--bits", "2,4",
                 "--group-size", "8", "--resume", str(tmp_path / "ck")]) == 0
    assert len(list((tmp_path / "ck").glob("layer-*.json"))) == 2
    assert json.loads(out.read_text())["graph"]["settings"]["streamed"] is True
    assert main(["profile", str(tiny_dir), "--calib", str(tiny_dir / "calib.txt"), "--curvature", "hessain"]) == 2


def test_image_folder(tmp_path):
    from PIL import Image

    from mopeq.demo.model import DemoConfig

    np.save(tmp_path / "a.npy", np.full((8, 8), 0.5))
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / "b.png")
    lines = [{"image": "a.npy", "question": "which digit?", "answer": "3"},
             {"image": "b.png", "question": "is it odd?", "answer": "yes"}]
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    [batch] = image_folder_batches(tmp_path, DemoConfig().to_dict())
    assert batch["images"].shape == (2, 8, 8) and float(batch["images"][0, 0, 0]) == 0.5
    assert (batch["labels"] != -100).any()
    (tmp_path / "index.jsonl").write_text(json.dumps({"image": "c.npy", "question": "q", "answer": "a"}))
    with pytest.raises(InputError, match="index.jsonl:1: image .*c.npy not found"):
        image_folder_batches(tmp_path, DemoConfig().to_dict())
    np.save(tmp_path / "c.npy", np.zeros((3, 8)))
    with pytest.raises(InputError, match=r"shape \(3, 8\)"):
        image_folder_batches(tmp_path, DemoConfig().to_dict())
