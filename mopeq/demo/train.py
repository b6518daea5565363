"""Train the demo model reproducibly on CPU: ``python -m mopeq.demo.train --steps 1500 -o mopeq/demo/weights``.

Two tasks at once: byte-level language modelling of CPython's documentation and short text answers to
questions about digit images, plus a Switch-style load-balancing loss over every router (transformers'
DeepseekV2 computes none), so that all routed experts carry real work.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import QUESTIONS, digit_images, random_text_batch, text_corpus, vqa_batch
from .model import DemoConfig, DemoVLM, save_demo


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class RouterLogits:
    """Collects router logits of every MoE layer during a forward pass."""

    def __init__(self, model: DemoVLM):
        self.logits: list[torch.Tensor] = []
        self.handles = [
            layer.mlp.gate.register_forward_hook(lambda m, i, o: self.logits.append(o[0]))
            for layer in model.language.model.layers
            if hasattr(layer.mlp, "gate")
        ]

    def balance_loss(self, top_k: int) -> torch.Tensor:
        """Switch-style ``E * sum_i f_i P_i`` summed over every router call since the last reset, divided
        by the number of MoE layers: a step runs two forwards (text, questions), so balanced routing
        reads 2.0. The shipped weights were trained with exactly this normalisation."""
        total = 0.0
        for logits in self.logits:
            probs = logits.softmax(-1)  # [T, E]
            chosen = F.one_hot(probs.topk(top_k, -1).indices, probs.shape[-1]).sum(1).float()
            total = total + probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum()
        self.logits.clear()
        return total / max(len(self.handles), 1)


def train(cfg: DemoConfig, steps: int, batch: int, lr: float, seed: int, log_every: int = 50) -> DemoVLM:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DemoVLM(cfg).train()
    text = torch.tensor(list(text_corpus("train")), dtype=torch.long)
    images, labels = digit_images("train")
    questions = list(QUESTIONS.items())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    routers = RouterLogits(model)
    start = time.time()
    for step in range(steps):
        ids = random_text_batch(text, batch, gen)
        lm = next_token_loss(model(ids).logits, ids)
        pick = torch.randint(0, len(labels), (batch,), generator=gen)
        qsel = torch.randint(0, len(questions), (batch,), generator=gen).tolist()
        noisy = (images[pick] + 0.05 * torch.randn(images[pick].shape, generator=gen)).clamp(0, 1)
        qs = [questions[q][0] for q in qsel]
        ans = [questions[q][1](d) for q, d in zip(qsel, labels[pick].tolist())]
        vids, vlabels, vimgs = vqa_batch(cfg, noisy, qs, ans)
        vqa = answer_loss(model(vids, vimgs).logits, vlabels)
        balance = routers.balance_loss(cfg.num_experts_per_tok)
        loss = lm + vqa + 0.05 * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  lm {lm.item():.3f}  vqa {vqa.item():.3f}  balance {balance.item():.3f}"
                  f"  {time.time() - start:.0f}s", flush=True)
    return model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it only through float rounding)")
    p.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = train(DemoConfig(), args.steps, args.batch, args.lr, args.seed, args.log_every)
    save_demo(model, args.output)
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
