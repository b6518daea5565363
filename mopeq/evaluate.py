"""Evaluation tasks that run on an unquantized model or a compiled artifact alike."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def window_nll(adapter, windows: torch.Tensor, batch: int = 32, progress: bool = False) -> torch.Tensor:
    """Mean next-token NLL (nats) of each window ``[N, T]`` -> ``[N]``."""
    out = []
    for chunk in tqdm(windows.split(batch), desc="perplexity", unit="batch", disable=not progress):
        logits = adapter.forward({"input_ids": chunk}).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(len(chunk), -1).mean(1))
    return torch.cat(out)


def perplexity(adapter, windows: torch.Tensor, progress: bool = False) -> float:
    return math.exp(float(window_nll(adapter, windows, progress=progress).mean()))


@torch.no_grad()
def demo_answers(model, vqa, batch: int = 256, progress: bool = False) -> list[bool]:
    """Exact-match correctness of the demo VLM's answer to every question of ``vqa``."""
    from .demo.model import greedy_matches

    correct = []
    for s in tqdm(range(0, len(vqa.questions), batch), desc="questions", unit="batch", disable=not progress):
        correct += greedy_matches(model, vqa.images[s:s + batch], vqa.questions[s:s + batch], vqa.answers[s:s + batch])
    return correct


def demo_quality(loaded, progress: bool = False, text_windows: int | None = None) -> dict:
    """Held-out perplexity (per byte) and question accuracy of the demo model or its artifact."""
    from .demo.data import text_windows as windows, vqa_set

    ppl = perplexity(loaded.adapter, windows("test", limit=text_windows), progress)
    correct = demo_answers(loaded.model, vqa_set("test"), progress=progress)
    return {"perplexity": ppl, "accuracy": sum(correct) / len(correct), "questions": len(correct)}
