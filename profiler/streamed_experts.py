"""A streamed decoder layer's routed experts: kept as stored (bf16/fp16), multiplied in float32 one expert at a time.

The routed experts are most of a MoE layer's bytes; converted to float32 (the dtype mopeq profiles in) they
would double it. While the layer streamer holds a layer, ``StreamedExperts`` replaces its experts module
(same ``forward(hidden, top_k_index, top_k_weights)`` as transformers' fused experts and the runtime's
``QuantizedExperts``), takes over its parameters as they were read, and upcasts each expert's three matrices
only while that expert runs. bf16/fp16 -> float32 is exact, so the products are the in-memory float32
model's, up to summation order.

With a ``GradNormSink`` attached (the fisher and gauss-newton backward sweeps), the backward pass gives the
gradient of the layer's input and adds each expert's squared gradient norms per matrix, ``||dL/dW||^2``, to
the sink: the gradient of the fused ``[E, 2I, H]`` tensors is never materialised, one expert's at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.base import MATRICES, ExpertRef
from ..runtime.qlayer import group_by_expert


class GradNormSink:
    """``[experts, 3]`` float64 sums of squared gradient norms (gate, up, down) since the last ``take``."""

    def __init__(self, num_experts: int):
        self.sums = torch.zeros(num_experts, len(MATRICES), dtype=torch.float64)

    def add(self, expert: int, grads) -> None:
        self.sums[expert] += torch.stack([g.double().pow(2).sum() for g in grads])

    def take(self) -> torch.Tensor:
        out, self.sums = self.sums, torch.zeros_like(self.sums)
        return out


class _RoutedExperts(torch.autograd.Function):
    """``out[t] = sum_j w_tj * (act(x_t Wg_j^T) * (x_t Wu_j^T)) Wd_j^T`` over the experts ``j`` token ``t`` is routed
    to. Saves only the gate and up products of each (token, expert) pair (the input is saved by the layer
    anyway); the backward returns the gradients of the input and of the routing weights, and hands each
    expert's weight gradients, one expert at a time, to the sink instead of returning them."""

    @staticmethod
    def forward(ctx, hidden, weight_of, module: "StreamedExperts", token_of, starts):
        out = torch.zeros_like(hidden)
        saved = []
        for j, w in module.hit(starts):
            rows = slice(starts[j], starts[j + 1])
            x = hidden[token_of[rows]]
            g, u = x @ w["gate"].to(x.dtype).t(), x @ w["up"].to(x.dtype).t()
            y = (module.act_fn(g) * u) @ w["down"].to(x.dtype).t()
            out.index_add_(0, token_of[rows], y * weight_of[rows, None].to(y.dtype))
            if any(ctx.needs_input_grad):
                saved.append((j, g, u))
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(hidden, weight_of, token_of)
            ctx.module, ctx.starts, ctx.products = module, starts, saved
        return out

    @staticmethod
    def backward(ctx, d_out):
        hidden, weight_of, token_of = ctx.saved_tensors
        module, starts = ctx.module, ctx.starts
        d_hidden, d_weight = torch.zeros_like(hidden), torch.zeros_like(weight_of)
        for j, g, u in ctx.products:
            rows = slice(starts[j], starts[j + 1])
            w = module.adapter.expert_weights(ExpertRef(module.layer, j))
            x, dz, r = hidden[token_of[rows]], d_out[token_of[rows]], weight_of[rows, None].to(hidden.dtype)
            with torch.enable_grad():
                g, u = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
                h = module.act_fn(g) * u
                dh = dz @ w["down"].to(dz.dtype)  # d(output of the expert, unweighted) -> h
                dg, du = torch.autograd.grad(h, (g, u), dh * r)
            h = h.detach()
            d_weight[rows] = (dh * h).sum(-1).to(d_weight.dtype)
            if module.sink is not None:
                module.sink.add(j, (dg.t() @ x, du.t() @ x, (dz * r).t() @ h))
            d_hidden.index_add_(0, token_of[rows], dg @ w["gate"].to(x.dtype) + du @ w["up"].to(x.dtype))
        return d_hidden, d_weight, None, None, None


class StreamedExperts(nn.Module):
    """Drop-in for layer ``layer``'s experts module ``original`` (see the module docstring); ``sink``: set it to
    collect squared gradient norms in a backward pass."""

    def __init__(self, adapter, layer: int, original: nn.Module):
        super().__init__()
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)  # what the adapter's expert views read
        self.original = [original]  # not a submodule: its parameters are these
        self.adapter, self.layer = adapter, layer
        self.act_fn = original.act_fn
        self.num_experts = adapter.num_experts(layer)
        self.sink: GradNormSink | None = None

    def __getattr__(self, name):
        if name == "original":
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original[0], name)  # e.g. a family's own attributes the adapter reads

    def hit(self, starts: list[int]):
        """``(j, {gate, up, down})`` of every expert with tokens: views of the stored weights."""
        for j in range(self.num_experts):
            if starts[j + 1] > starts[j]:
                yield j, self.adapter.expert_weights(ExpertRef(self.layer, j))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        token_of, weight_of, starts = group_by_expert(top_k_index, top_k_weights, self.num_experts)
        return _RoutedExperts.apply(hidden, weight_of, self, token_of, starts)


def covers_parameters(adapter, layer: int, module: nn.Module) -> bool:
    """Whether the routed experts' ``gate``/``up``/``down`` views are everything ``module`` holds (no biases or
    family extras the per-expert product would leave out)."""
    own = {id(p) for p in module.parameters()}
    used = {id(p) for j in range(adapter.num_experts(layer)) for p in adapter.expert_parameters(ExpertRef(layer, j))}
    return bool(own) and own == used and hasattr(module, "act_fn")
