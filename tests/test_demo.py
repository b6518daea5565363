"""The shipped demo model: data splits, quality, and the one-pass answer check."""

from __future__ import annotations

import torch

from mopeq.compiler.quantize import fake_quantize
from mopeq.demo.data import digit_images, text_corpus, vqa_set
from mopeq.demo.model import greedy_matches
from mopeq.models import open_model


def test_splits_are_disjoint():
    train, test = text_corpus("train"), text_corpus("test")
    assert len(test) > 30_000 and len(train) > 8 * len(test)
    assert test[:2000] not in train
    tr, _ = digit_images("train")
    te, _ = digit_images("test")
    assert not any(torch.equal(a, b) for a in te[:50] for b in tr)


def test_greedy_matches_equals_generation():
    loaded = open_model("demo")
    for ref in loaded.adapter.experts():  # 2-bit experts so that some answers are wrong
        if not ref.shared:
            w = loaded.adapter.expert_weights(ref)
            loaded.adapter.set_expert_weights(ref, {m: fake_quantize(v.detach().clone(), 2, 32) for m, v in w.items()})
    vqa = vqa_set("test")
    idx = list(range(0, len(vqa.questions), 5))
    images, questions = vqa.images[idx], [vqa.questions[i] for i in idx]
    answers = [vqa.answers[i] for i in idx]
    generated = loaded.model.answer(images, questions)
    by_generation = [g.strip() == a for g, a in zip(generated, answers)]
    assert greedy_matches(loaded.model, images, questions, answers) == by_generation
    # Asking for what the model generated (when it ended its answer) must also match.
    own = greedy_matches(loaded.model, images, questions, generated)
    assert all(ok for ok, g in zip(own, generated) if g in answers)
