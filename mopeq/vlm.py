"""Image + prompt inputs for the real VLM families (DeepSeek-VL2, MolmoE), built by each model's processor.

``image_inputs`` gives what ``model(**inputs)`` / ``model.generate(**inputs)`` take; ``append`` extends it with
answer tokens (for scoring a continuation). Prompts: DeepSeek-VL2 ``<image>\\n{prompt}``; MolmoE BOS, the
image tokens, `` User: {prompt} Assistant:``. Neither model's chat template is reproduced.
"""

from __future__ import annotations

import torch


def image_inputs(loaded, tokenizer, prompt: str, image) -> dict:
    """Inputs for one PIL ``image`` and ``prompt`` on ``loaded`` (an opened model or a loaded artifact), built
    by its adapter (``MoEAdapter.image_inputs``)."""
    return loaded.adapter.image_inputs(loaded.config, tokenizer, prompt, image)


def molmo_inputs(config: dict, geometry, tokenizer, image, text: str) -> dict:
    """MolmoE: BOS (or EOS), the image tokens of ``molmo_image_inputs`` (global view + overlapping crops, up
    to ``max_crops`` from config.json, default 12, margins ``overlap_margins``, default [4, 4]), then ``text``."""
    import numpy as np

    from .models.molmo_vision import image_token_ids, molmo_image_inputs

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return molmo_image_inputs(np.asarray(image), image_token_ids(config, tokenizer),
                              base=geometry.grid * geometry.patch, patch=geometry.patch,
                              max_crops=int(config.get("max_crops", 12)),
                              margins=tuple(int(m) for m in config.get("overlap_margins", (4, 4))),
                              prefix=[] if bos is None else [bos],
                              suffix=tokenizer.encode(text, add_special_tokens=False))


def append(inputs: dict, ids: list[int]) -> dict:
    """``inputs`` with text tokens ``ids`` appended (a batch of one)."""
    extra = torch.tensor([ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1))
    if inputs.get("images_seq_mask") is not None:
        out["images_seq_mask"] = torch.cat([inputs["images_seq_mask"], torch.zeros_like(extra, dtype=torch.bool)], 1)
    return out


@torch.no_grad()
def _logits_for(loaded, inputs: dict, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]``: the model's logits at each position that predicts one of ``ids`` (teacher-forced)."""
    start = inputs["input_ids"].shape[1]
    return loaded.model(**append(inputs, ids), use_cache=False).logits[0, start - 1 : -1]


def continuation_logprob(loaded, inputs: dict, ids: list[int]) -> float:
    """Total log-probability of the text tokens ``ids`` right after ``inputs``."""
    logits = _logits_for(loaded, inputs, ids).float()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).sum())


def greedy_matches(loaded, inputs: dict, ids: list[int]) -> bool:
    """Whether greedy decoding after ``inputs`` produces exactly the tokens ``ids`` (teacher-forced argmax,
    so what the model says after a correct answer does not matter)."""
    return _logits_for(loaded, inputs, ids).argmax(-1).tolist() == list(ids)
