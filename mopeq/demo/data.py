"""Data for the demo model, from software that is already installed.

Text: CPython's bundled documentation (``pydoc_data.topics``), split by topic into train and held-out.
Images: scikit-learn's 8x8 digits, split into train and held-out images, with questions whose answers
are short texts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .model import BOS_ID, PAD_ID, DemoConfig, encode, vqa_prompt

WINDOW = 128


def _held_out(name: str, fraction: float) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return digest[0] / 256 < fraction


def text_corpus(split: str) -> bytes:
    """Concatenated topics of one split ("train" or "test"); ~10 % of topics are held out."""
    from pydoc_data.topics import topics

    keep = [k for k in sorted(topics) if _held_out(k, 0.12) == (split == "test")]
    return b"\n\n".join(topics[k].encode("utf-8") for k in keep)


def text_windows(split: str, window: int = WINDOW, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping [N, window+1] token windows (BOS + bytes), for evaluation and calibration."""
    data = text_corpus(split)
    n = len(data) // window
    arr = torch.tensor(list(data[: n * window]), dtype=torch.long).view(n, window)
    arr = torch.cat([torch.full((n, 1), BOS_ID), arr], 1)
    return arr if limit is None else arr[:limit]


def random_text_batch(data: torch.Tensor, batch: int, gen: torch.Generator, window: int = WINDOW) -> torch.Tensor:
    starts = torch.randint(0, len(data) - window - 1, (batch,), generator=gen)
    rows = torch.stack([data[s : s + window] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), BOS_ID), rows], 1)


QUESTIONS = {
    "which digit?": lambda d: str(d),
    "is it odd?": lambda d: "yes" if d % 2 else "no",
    "what is the digit plus 3?": lambda d: str(d + 3),
    "what is the digit times 2?": lambda d: str(d * 2),
    "is it greater than 4?": lambda d: "yes" if d > 4 else "no",
}


def digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images scaled to [0, 1] ([N, 8, 8] float32) and labels; 20 % held out with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.target))
    cut = int(0.8 * len(perm))
    idx = perm[:cut] if split == "train" else perm[cut:]
    images = torch.tensor(digits.images[idx] / 16.0, dtype=torch.float32)
    return images, torch.tensor(digits.target[idx], dtype=torch.long)


@dataclass
class VQASet:
    images: torch.Tensor  # [N, 8, 8]
    questions: list[str]
    answers: list[str]


def vqa_set(split: str) -> VQASet:
    """Every held-out image with every question (deterministic order)."""
    images, labels = digit_images(split)
    qs, ans, imgs = [], [], []
    for q, fn in QUESTIONS.items():
        for i, d in enumerate(labels.tolist()):
            qs.append(q)
            ans.append(fn(d))
            imgs.append(i)
    return VQASet(images[imgs], qs, ans)


def vqa_batch(cfg: DemoConfig, images: torch.Tensor, questions: list[str], answers: list[str], length: int = 48):
    """Input ids and labels ([B, length]); the loss covers the answer and its closing newline only."""
    ids = torch.full((len(questions), length), PAD_ID, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (q, a) in enumerate(zip(questions, answers)):
        prompt, answer = vqa_prompt(cfg, q), encode(a + "\n")
        seq = prompt + answer
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(answer)
    return ids, labels, images
