"""Each eval task on tiny inputs, through the CLI, on the demo model and a fake-quantized copy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mopeq.cli import main
from mopeq.compiler.quantize import fake_quantize
from mopeq.demo.data import digit_images, text_windows
from mopeq.evaluate import fidelity
from mopeq.models import open_model


def _result(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def vqa_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    images, labels = digit_images("test")
    lines = []
    for i in range(4):
        np.save(folder / f"img{i}.npy", images[i].numpy())
        d = int(labels[i])
        lines.append({"image": f"img{i}.npy", "question": "which digit?", "answer": str(d)})
        lines.append({"image": f"img{i}.npy", "question": "is it odd?", "answer": "yes" if d % 2 else "no",
                      "choices": ["yes", "no"]})
        wrong = str((d + 1) % 10)  # a record whose stated answer is wrong must count as incorrect
        lines.append({"image": f"img{i}.npy", "question": "which digit?", "answer": wrong,
                      "choices": [wrong, str(d)]})
    path = folder / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_vqa_exact_match_and_choices(vqa_file, capsys):
    assert main(["eval", "demo", "--task", "vqa", "--data", str(vqa_file), "--json"]) == 0
    result = _result(capsys)
    assert result["questions"] == 12
    assert result["accuracy"] == pytest.approx(8 / 12)  # the 4 wrong-answer records fail, the rest pass


def test_vqa_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.npy", "question": "q", "answer": "a", "choices": ["b"]}\n')
    assert main(["eval", "demo", "--task", "vqa", "--data", str(bad)]) == 2
    assert "choices" in capsys.readouterr().err


def test_perplexity_on_a_text_file(tmp_path, capsys):
    from pydoc_data.topics import topics

    text = tmp_path / "t.txt"
    text.write_text(topics[sorted(topics)[0]])
    assert main(["eval", "demo", "--task", "perplexity", "--text", str(text), "--json"]) == 0
    assert 1.5 < _result(capsys)["perplexity"] < 20


def test_fidelity_against_itself_and_a_quantized_copy(capsys):
    assert main(["eval", "demo", "--task", "fidelity", "--reference", "demo", "--json"]) == 0
    same = _result(capsys)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    reference, quantized = open_model("demo"), open_model("demo")
    for ref in quantized.adapter.experts():
        w = quantized.adapter.expert_weights(ref)
        quantized.adapter.set_expert_weights(ref, {m: fake_quantize(v.detach().clone(), 2, 128) for m, v in w.items()})
    result = fidelity(quantized, reference, text_windows("test", limit=8))
    assert result["kl"] > 0.01 and 0.5 < result["top1_agreement"] < 1.0
