"""The whole chain through the real CLI on the demo model, and bad input on every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mopeq.cli import main
from mopeq.schemas import read_plan, read_profile

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "demo.yaml"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    assert main(["profile", "demo", "-o", str(out / "profile.json")]) == 0
    assert main(["plan", str(SPEC), "--profile", str(out / "profile.json"), "-o", str(out / "plan.json")]) == 0
    assert main(["compile", "demo", "--plan", str(out / "plan.json"), "-o", str(out / "artifact")]) == 0
    return out


def test_profile_covers_every_expert(chain):
    profile = read_profile(chain / "profile.json")
    cfg = json.loads((REPO / "mopeq" / "demo" / "weights" / "config.json").read_text())
    routed = [n for n in profile.experts if not n.shared]
    assert len(routed) == cfg["num_hidden_layers"] * cfg["n_routed_experts"]
    per_layer_slots = profile.meta.calibration["tokens"] * cfg["num_experts_per_tok"]
    assert sum(n.tokens for n in routed) == cfg["num_hidden_layers"] * per_layer_slots
    for node in profile.experts:
        assert node.perturbation["2"] > node.perturbation["3"] > node.perturbation["4"] > 0
        assert all(v == v for s in node.sensitivity.values() for v in s.values())  # no NaN


def test_artifact_size_is_the_plans_prediction(chain):
    """Packed expert tensors take exactly the bytes the plan predicted, other tensors exactly the plan's
    non-expert bytes; the rest of the files is safetensors headers."""
    from mopeq.cli import artifact_sizes

    plan, sizes = read_plan(chain / "plan.json"), artifact_sizes(chain / "artifact")
    assert sizes["experts"] == plan.totals["bytes"]
    assert sizes["dense"] == plan.totals["non_expert_bytes"]
    assert sizes["files"] == sizes["experts"] + sizes["dense"] + sizes["headers"]
    assert 0 < sizes["headers"] < 0.1 * sizes["files"]


def test_plan_meets_budget(chain):
    plan = read_plan(chain / "plan.json")
    assert plan.totals["bytes"] <= plan.totals["budget_bytes"]
    assert plan.solver.gap <= 1e-6
    assert all(e.bits == 4 for k, e in plan.experts.items() if ".S" in k)  # the spec pins shared experts


def test_artifact_matches_simulated_quantization(chain):
    from mopeq.compiler.quantize import fake_quantize
    from mopeq.models import open_model
    from mopeq.runtime.load import load

    plan = read_plan(chain / "plan.json")
    quantized = load(chain / "artifact")
    reference = open_model("demo")
    for ref in reference.adapter.experts():
        bits = plan.experts[ref.id].bits
        weights = reference.adapter.expert_weights(ref)
        reference.adapter.set_expert_weights(ref, {m: fake_quantize(w.detach().clone(), bits, plan.group_size)
                                                   for m, w in weights.items()})
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    a = reference.adapter.forward({"input_ids": ids})
    b = quantized.adapter.forward({"input_ids": ids})
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # packed experts stay packed: no dense expert parameters remain
    names = [n for n, _ in quantized.model.named_parameters()]
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n in names)


def test_run_and_eval(chain, capsys):
    assert main(["run", str(chain / "artifact"), "--image", "0", "--prompt", "which digit?"]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[0]
    assert answer.isdigit()
    assert main(["eval", str(chain / "artifact"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] > 0.8 and result["perplexity"] < 20


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs(chain, tmp_path, capsys):
    assert "not found" in _error(capsys, ["profile", str(tmp_path / "nope")])
    assert "--bits" in _error(capsys, ["profile", "demo", "--bits", "5"])
    assert "not found" in _error(capsys, ["plan", str(tmp_path / "x.yaml"), "--profile", str(chain / "profile.json")])
    bad = tmp_path / "bad.yaml"
    bad.write_text((SPEC.read_text()).replace("avg_bits: 2.5", "avg_bits: lots"))
    assert "avg_bits" in _error(capsys, ["plan", str(bad), "--profile", str(chain / "profile.json")])
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(SPEC.read_text().replace("avg_bits: 2.5", "avg_bits: 1.0"))
    out = tmp_path / "plan.json"
    out.write_text("earlier")
    assert "below" in _error(capsys, ["plan", str(tiny), "--profile", str(chain / "profile.json"), "-o", str(out)])
    assert out.read_text() == "earlier"  # nothing written over an earlier output
    assert "not a mopeq profile" in _error(capsys, ["plan", str(SPEC), "--profile", str(chain / "plan.json")])
    assert "already exists" in _error(capsys, ["compile", "demo", "--plan", str(chain / "plan.json"),
                                               "-o", str(chain / "artifact")])


def test_plan_for_another_model_is_refused(chain, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(REPO / "mopeq" / "demo" / "weights", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["extra"] = {"note": "a different model"}
    (other / "config.json").write_text(json.dumps(cfg))
    err = _error(capsys, ["compile", str(other), "--plan", str(chain / "plan.json"), "-o", str(tmp_path / "a")])
    assert "another model" in err
    assert not (tmp_path / "a").exists()
