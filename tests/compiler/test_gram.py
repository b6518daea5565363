"""Per-expert Gram collection (profiler/gram.py) and the compiler's reader (GramFile)."""

import pytest
import torch
from safetensors import safe_open

from mopeq.compiler.gptq import GramFile
from mopeq.models import open_model
from mopeq.models.base import ExpertRef
from mopeq.profiler.gram import collect_grams, save_grams
from mopeq.schemas import InputError


def batches(n=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, t), generator=g), "modality": "text"} for _ in range(n)]


def capture_layer0(loaded, data):
    """Independently record what layer 0's experts module receives."""
    seen = []
    handle = loaded.adapter.experts_module(0).register_forward_pre_hook(
        lambda m, a: seen.append(tuple(t.detach().clone() for t in a)))
    with torch.no_grad():
        for b in data:
            loaded.adapter.forward(b)
    handle.remove()
    return seen


@pytest.mark.parametrize("weighting", ["routing", "none"])
def test_grams_match_direct_sum(demo_dir, weighting):
    loaded = open_model(demo_dir)
    data = batches()
    rec = collect_grams(loaded, data, weighting, progress=False)
    seen = capture_layer0(loaded, data)
    w = loaded.adapter.expert_weights(ExpertRef(0, 1))
    act = loaded.adapter.experts_module(0).act_fn
    want_in, want_mid, count = 0, 0, 0
    for hidden, index, weights in seen:
        for t in range(len(hidden)):
            for slot in range(index.shape[1]):
                if int(index[t, slot]) == 1:
                    x = hidden[t].double()
                    h = (act(hidden[t] @ w["gate"].t()) * (hidden[t] @ w["up"].t())).double()
                    g2 = float(weights[t, slot]) ** 2 if weighting == "routing" else 1.0
                    want_in, want_mid, count = want_in + g2 * torch.outer(x, x), want_mid + g2 * torch.outer(h, h), count + 1
    assert count > 0 and rec.tokens["L0.E1"] == count
    torch.testing.assert_close(rec.grams["L0.E1.in"], want_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.grams["L0.E1.mid"], want_mid, rtol=1e-5, atol=1e-6)
    total = sum(len(h) for h, _, _ in seen)
    assert sum(rec.tokens[f"L0.E{j}"] for j in range(4)) == 2 * total and rec.tokens["L0.S0"] == total


def test_gram_file_names_shapes_and_model_check(demo_dir, tmp_path):
    loaded = open_model(demo_dir)
    path = save_grams(collect_grams(loaded, batches(1), progress=False), loaded.config_hash, tmp_path / "grams.safetensors")
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("L1.E0.in").shape == (64, 64) and f.get_tensor("L1.S0.mid").shape == (48, 48)
    assert {"L0.S0.in", "L0.S0.mid", "L1.S0.in"} <= names
    grams = GramFile(path)
    grams.check_model(loaded.config_hash)
    assert grams.gram("L0.S0", "down").shape == (48, 48) and grams.gram("L9.E0", "gate") is None
    assert grams.meta["weighting"] == "routing" and grams.tokens["L0.S0"] == 48
    with pytest.raises(InputError, match="another model"):
        grams.check_model("0123")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="bad.safetensors"):
        GramFile(tmp_path / "bad.safetensors")
