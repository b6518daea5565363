"""Untrusted artifacts and checkpoints: nothing read is executed, escaping shard names are refused, and
every damaged artifact is refused through the CLI with one line naming the file and tensor (exit 2)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mopeq.cli import main
from mopeq.schemas import sha256_file

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("mopeq", "profiler", "planner", "compiler", "runtime", "bench")
FORBIDDEN = {
    r"\btorch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"trust_remote_code\s*=\s*True": "trust_remote_code=True",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
    r"^\s*(import|from)\s+(c?pickle|dill|joblib|marshal)\b": "a pickle-family import",
    r"\byaml\.(load|unsafe_load|full_load)\(": "yaml.load (use yaml.safe_load)",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
}


def test_no_code_execution_paths_in_the_source():
    found = []
    for path in (p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(REPO)}:{lineno}: {why}" for pat, why in FORBIDDEN.items() if re.search(pat, line)]
    assert found == []


class Evil:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    marker: Path = Path("/nonexistent")

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_pickle_checkpoint_and_remote_code_are_never_executed(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "pwned"
    Evil.marker = marker
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (model / "config.json").write_text(json.dumps({"model_type": "deepseek_v2", "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (model / "calib.txt").write_text("alpha beta " * 300)
    assert main(["eval", str(model), "--task", "perplexity", "--text", str(model / "calib.txt")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    (model / "config.json").write_text(json.dumps({"model_type": "evil_remote", "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    assert main(["eval", str(model), "--task", "perplexity", "--text", str(model / "calib.txt")]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not marker.exists()


# --- damaged artifacts through `mopeq run` ----------------------------------------------------------------

def _copy(corpus, tmp_path) -> Path:
    dst = tmp_path / "artifact"
    shutil.copytree(corpus["artifact"], dst)
    return dst


def _shard(artifact: Path) -> Path:
    return artifact / "model-00001-of-00001.safetensors"


def _resign(artifact: Path) -> None:
    """Recompute the manifest's checksums (a forger would): the damage must still be caught."""
    manifest = json.loads((artifact / "mopeq.json").read_text())
    manifest["shards"] = {n: sha256_file(artifact / n) for n in manifest["shards"] if (artifact / n).is_file()}
    (artifact / "mopeq.json").write_text(json.dumps(manifest))


def _edit_tensor(artifact: Path, suffix: str, edit) -> str:
    shard = _shard(artifact)
    state = load_file(str(shard))
    key = sorted(k for k in state if k.endswith(suffix))[0]
    state[key] = edit(state[key].clone())
    save_file(state, str(shard), metadata={"format": "pt"})
    _resign(artifact)
    return key.removesuffix(suffix)


def _edit_manifest(artifact: Path, edit) -> None:
    manifest = json.loads((artifact / "mopeq.json").read_text())
    edit(manifest)
    (artifact / "mopeq.json").write_text(json.dumps(manifest))


def _rename_shard(artifact: Path, name: str) -> None:
    def edit(m):
        m["shards"][name] = m["shards"].pop(next(iter(m["shards"])))
    _edit_manifest(artifact, edit)


def _header(artifact: Path, edit) -> None:
    shard = _shard(artifact)
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    raw = json.dumps(edit(header)).encode().ljust(n)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    _resign(artifact)


def _first_tensor(header):
    return sorted(k for k in header if k != "__metadata__")[0]


def _offsets_past_end(header):
    header[_first_tensor(header)]["data_offsets"][1] += 10**9
    return header


def _claim_huge_header(artifact: Path) -> None:
    shard = _shard(artifact)
    shard.write_bytes(struct.pack("<Q", 2**40) + shard.read_bytes()[8:])
    _resign(artifact)


def _symlink_out(artifact: Path) -> None:
    outside = artifact.parent / "elsewhere.safetensors"
    shutil.copy(_shard(artifact), outside)
    (artifact / "link.safetensors").symlink_to(outside)
    _rename_shard(artifact, "link.safetensors")


def _flip_byte(artifact: Path) -> None:
    shard = _shard(artifact)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))


def _bits(value: int):
    def edit(m):
        m["plan"]["experts"]["L0.E0"]["bits"] = value
    return edit


def _top_k_over_experts(artifact: Path) -> None:
    """A config (re-signed in the manifest) whose tokens would pick more experts than exist: found by the fuzzer,
    it loaded and then failed inside the router's topk."""
    from mopeq.schemas import config_hash

    config = json.loads((artifact / "config.json").read_text())
    moe = next(d for d in (config, *[v for v in config.values() if isinstance(v, dict)]) if "num_experts_per_tok" in d)
    moe["num_experts_per_tok"] = moe["n_routed_experts"] + 1
    (artifact / "config.json").write_text(json.dumps(config))
    _edit_manifest(artifact, lambda m: m.update(config_hash=config_hash(config)))


CASES = {
    "top_k_over_experts": (_top_k_over_experts, r"num_experts_per_tok is \d+, expected at most \S*n_routed_experts"),
    "escape_dotdot": (lambda a: _rename_shard(a, "../elsewhere.safetensors"), r"points outside"),
    "escape_absolute": (lambda a: _rename_shard(a, "/etc/passwd"), r"points outside"),
    "escape_symlink": (_symlink_out, r"points outside .*symlink"),
    "checksum": (_flip_byte, r"model-00001-of-00001\.safetensors: checksum mismatch"),
    "huge_header": (_claim_huge_header, r"safetensors: safetensors header claims 1099511627776 bytes"),
    "offsets_past_end": (lambda a: _header(a, _offsets_past_end), r"safetensors: tensor \S+: data_offsets"),
    "shape_vs_config": (lambda a: _edit_tensor(a, ".weight_shape", lambda t: t + 8),
                        r"weight_shape \(\d+, \d+\) disagrees with config.json"),
    "bits_5": (lambda a: _edit_manifest(a, _bits(5)), r"experts\.0\.gate_proj has bits 5, expected one of"),
    "nan_scale": (lambda a: _edit_tensor(a, ".weight_scale", lambda t: t.fill_(float("nan"))),
                  r"\.weight_scale has NaN or inf"),
    "inf_scale": (lambda a: _edit_tensor(a, ".weight_scale", lambda t: t.fill_(float("inf"))),
                  r"\.weight_scale has NaN or inf"),
    "packed_dtype": (lambda a: _edit_tensor(a, ".weight_packed", lambda t: t.to(torch.int64)),
                     r"\.weight_packed is torch.int64, expected torch.int32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_is_refused_in_one_line(case, corpus, tmp_path, capsys):
    damage, message = CASES[case]
    artifact = _copy(corpus, tmp_path)
    damage(artifact)
    command = ["run", str(artifact), "--prompt", "which digit?", "--image", "0"] if case < "n" else \
        ["eval", str(artifact)]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_compiler_refuses_escaping_source_shards(corpus, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(corpus["artifact"].parent / "model", model)
    outside = tmp_path / "outside.safetensors"
    (model / "model.safetensors").rename(outside)
    keys = list(load_file(str(outside)))
    for name in ("../outside.safetensors", str(outside)):
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
        assert main(["compile", str(model), "--plan", str(corpus["plan"]), "-o", str(tmp_path / "out")]) == 2
        assert "points outside" in capsys.readouterr().err
    (model / "inside.safetensors").symlink_to(outside)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "inside.safetensors" for k in keys}}))
    assert main(["compile", str(model), "--plan", str(corpus["plan"]), "-o", str(tmp_path / "out")]) == 2
    assert "symlink" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compiler_refuses_checkpoint_that_disagrees_with_config(corpus, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(corpus["artifact"].parent / "model", model)
    state = load_file(str(model / "model.safetensors"))
    key = next(k for k in sorted(state) if "experts.down_proj" in k)
    state[key] = state[key][:, :, :-1].contiguous()
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(["compile", str(model), "--plan", str(corpus["plan"]), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"tensor {key} has shape" in err and "config.json implies" in err


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compiler_refuses_non_finite_weights(corpus, tmp_path, capsys, monkeypatch, native, bad):
    """A NaN or infinite expert weight would poison its group's scale: refused in one line, with either RTN path."""
    monkeypatch.setenv("MOPEQ_NATIVE", native)
    model = tmp_path / "model"
    shutil.copytree(corpus["artifact"].parent / "model", model)
    state = load_file(str(model / "model.safetensors"))
    key = next(k for k in sorted(state) if "experts.down_proj" in k)
    state[key][1, 3, 5] = bad
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(["compile", str(model), "--plan", str(corpus["plan"]), "-o", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mopeq")]
    assert len(errors) == 1 and f"tensor {key} (expert " in errors[0] and "NaN or infinite" in errors[0], errors
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("field,nested", [("num_hidden_layers", None), ("num_hidden_layers", "text_config")])
def test_more_layers_than_the_tensors_hold_is_refused_before_building(tiny_dir, tmp_path, capsys, field, nested):
    """``num_hidden_layers: 1000000`` (top level or in a nested config) would build layers until memory runs out:
    profile and run refuse it in one line, from the tensor names alone."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (config.setdefault(nested, {}) if nested else config)[field] = 1_000_000
    (model / "config.json").write_text(json.dumps(config))
    name = f"{nested}.{field}" if nested else field
    for args in (["profile", model, "--calib", model / "calib.txt", "-o", tmp_path / "p.json"],
                 ["run", model, "--prompt", "the", "--max-new-tokens", "1"]):
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{name} is 1000000, but the tensors number at most" in err, err


@pytest.mark.parametrize("change", ["hidden_size=1e7", "no hidden_size", "no n_routed_experts"])
def test_config_that_does_not_describe_the_checkpoint_is_refused_in_one_line(tiny_dir, tmp_path, capsys, change):
    """A config whose model is far larger than the checkpoint (built on meta first, nothing allocated) is refused
    in one line by profile and run: no allocation until killed, no transformers load report on stderr."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    if change == "hidden_size=1e7":
        config["hidden_size"] = 10**7
    else:
        config.pop(change.split()[1])
    (model / "config.json").write_text(json.dumps(config))
    for args in (["profile", model, "--calib", model / "calib.txt", "-o", tmp_path / "p.json"],
                 ["run", model, "--prompt", "the", "--max-new-tokens", "1"]):
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "the config does not describe this checkpoint" in err, err
