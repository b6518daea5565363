"""The real CLI on a tiny Mixtral, an unsupported directory, and `mopeq estimate` on the seed configs."""

from __future__ import annotations

import json

import pytest

from mopeq.cli import main

TEXT = "the quick brown fox jumps over the lazy dog. " * 40

SPEC = "version: 1\nbits: [8]\ngroup_size: 32\nbudget: {fraction: 1.0}\nscope: global\nsensitivity: hessian-local\n"


@pytest.mark.parametrize("family", ["mixtral", "granite-3.0-1b-a400m", "ernie-4.5-21b-a3b"])
def test_cli_chain(family, tiny_models, tmp_path, capsys):
    """Also the families whose keys transformers renames or fuses (GraniteMoe, Ernie 4.5), as a user runs them,
    layer-streamed (--resume) as well."""
    from .published import build

    model = str(tiny_models[family] if family in tiny_models else build(family, tmp_path / "model"))
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "spec.yaml").write_text(SPEC)
    assert main(["profile", model, "--calib", str(tmp_path / "calib.txt"), "--bits", "8", "--group-size", "32",
                 "-o", str(tmp_path / "profile.json")]) == 0
    assert main(["plan", str(tmp_path / "spec.yaml"), "--profile", str(tmp_path / "profile.json"),
                 "-o", str(tmp_path / "plan.json")]) == 0
    assert main(["profile", model, "--calib", str(tmp_path / "calib.txt"), "--bits", "8", "--group-size", "32",
                 "--resume", str(tmp_path / "layers"), "-o", str(tmp_path / "streamed.json")]) == 0
    assert main(["compile", model, "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "art")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "art"), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_cli_unsupported_architecture_exits_2(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(dense)
    (tmp_path / "calib.txt").write_text(TEXT)
    assert main(["profile", str(dense), "--calib", str(tmp_path / "calib.txt")]) == 2
    err = capsys.readouterr().err
    assert "no MoE layers found" in err and "gate_up_proj" in err and "Traceback" not in err


@pytest.mark.parametrize("name,published_total", [("deepseek-vl2-small", 16.1e9), ("deepseek-vl2-base", 27.5e9)])
def test_estimate_seed_configs(name, published_total, capsys):
    """Sizes from the shipped configs land within 3 % of the published totals; 2.5-bit plan is smaller."""
    assert main(["estimate", name, "--spec", "specs/demo.yaml", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert abs(r["total_bf16_gb"] * 1e9 / 2 - published_total) / published_total < 0.03
    assert r["experts_planned_gb"] < r["experts_bf16_gb"] / 5
    assert 2.5 <= r["avg_bits"] < 2.75


def test_estimate_unknown_model_exits_2(capsys):
    assert main(["estimate", "no-such-model", "--spec", "specs/demo.yaml"]) == 2
    assert "deepseek-vl2-small" in capsys.readouterr().err
