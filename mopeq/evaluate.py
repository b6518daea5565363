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


@torch.no_grad()
def fidelity(candidate, reference, windows: torch.Tensor, batch: int = 16, progress: bool = False) -> dict:
    """Logit fidelity of ``candidate`` to ``reference`` on token windows ``[N, T]``:
    mean KL(reference || candidate) per token (nats) and top-1 agreement."""
    kl_sum, agree, tokens = 0.0, 0, 0
    for chunk in tqdm(windows.split(batch), desc="fidelity", unit="batch", disable=not progress):
        ref = F.log_softmax(reference.adapter.forward({"input_ids": chunk}).float(), -1)
        cand = F.log_softmax(candidate.adapter.forward({"input_ids": chunk}).float(), -1)
        kl_sum += float((ref.exp() * (ref - cand)).sum(-1).sum())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        tokens += chunk.numel()
    return {"kl": kl_sum / tokens, "top1_agreement": agree / tokens, "tokens": tokens}


@torch.no_grad()
def vqa_file(loaded, path, progress: bool = False, tokenizer=None) -> dict:
    """Accuracy on a VQA JSONL file: greedy exact match, or the most likely of ``choices``.

    The demo VLM uses its own prompt and 8x8 images; DeepSeek-VL2 and MolmoE (need ``tokenizer``) their
    processors (``mopeq.vlm``), scoring `` {choice}`` after the prompt, or checking that greedy decoding
    produces `` {answer}`` token for token (teacher-forced, as the demo's ``greedy_matches``).
    """
    from pathlib import Path

    from .demo.model import greedy_matches
    from .profiler.calibration import load_image, read_qa_jsonl

    records = read_qa_jsonl(path)
    folder = Path(path).parent
    if not loaded.adapter.is_demo:
        return _vqa_vlm(loaded, records, folder, tokenizer, progress)
    correct = []
    for where, rec in tqdm(records, desc="vqa", unit="question", disable=not progress):
        image = load_image(folder / rec["image"], where)[None]
        if rec.get("choices"):
            scores = [choice_logprob(loaded.model, image, rec["question"], c) for c in rec["choices"]]
            correct.append(rec["choices"][max(range(len(scores)), key=scores.__getitem__)] == rec["answer"])
        else:
            correct.append(greedy_matches(loaded.model, image, [rec["question"]], [rec["answer"]])[0])
    return {"accuracy": sum(correct) / len(correct), "questions": len(correct)}


def _vqa_vlm(loaded, records, folder, tokenizer, progress: bool) -> dict:
    from .profiler.calibration import load_rgb
    from .vlm import continuation_logprob, greedy_matches, image_inputs

    correct = []
    for where, rec in tqdm(records, desc="vqa", unit="question", disable=not progress):
        inputs = image_inputs(loaded, tokenizer, rec["question"], load_rgb(folder / rec["image"], where))
        if rec.get("choices"):
            scores = [continuation_logprob(loaded, inputs, tokenizer.encode(" " + c, add_special_tokens=False))
                      for c in rec["choices"]]
            correct.append(rec["choices"][max(range(len(scores)), key=scores.__getitem__)] == rec["answer"])
        else:
            correct.append(greedy_matches(loaded, inputs, tokenizer.encode(" " + rec["answer"], add_special_tokens=False)))
    return {"accuracy": sum(correct) / len(correct), "questions": len(correct)}


def choice_logprob(model, image: torch.Tensor, question: str, choice: str) -> float:
    """Total log-probability of ``choice`` followed by a newline as the answer."""
    from .demo.model import encode, vqa_prompt

    prompt, answer = vqa_prompt(model.config, question), encode(choice + "\n")
    ids = torch.tensor([prompt + answer])
    logp = F.log_softmax(model(ids, image).logits[0, len(prompt) - 1 : -1].float(), -1)
    return float(logp.gather(-1, torch.tensor(answer)[:, None]).sum())
