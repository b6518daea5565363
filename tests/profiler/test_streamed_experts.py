"""StreamedExperts against transformers' own fused experts module: same outputs, same input gradients, and
per-expert squared gradient norms equal to autograd's full gradient of the fused tensors."""

from __future__ import annotations

import pytest
import torch

from mopeq.models.base import MATRICES, ExpertRef
from mopeq.profiler.curvature import expert_blocks
from mopeq.profiler.streamed_experts import GradNormSink, StreamedExperts

from .conftest import tiny_model


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_streamed_experts_equal_the_family_module(stored):
    loaded = tiny_model(dtype=torch.float32, experts_implementation="grouped_mm")
    adapter, layer = loaded.adapter, 1
    original = adapter.experts_module(layer)
    with torch.no_grad():  # the stored weights, and the float32 model the in-memory profile holds
        for p in original.parameters():
            p.copy_(p.to(stored).float())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, original.hidden_dim, generator=gen, requires_grad=True)
    index = torch.stack([torch.randperm(original.num_experts, generator=gen)[:2] for _ in range(40)])
    index[:5, 1] = 0  # expert 0 busy, expert 3 idle in part of the rows
    weights = torch.rand(40, 2, generator=gen, requires_grad=True)
    cotangent = torch.randn(40, original.hidden_dim, generator=gen)

    refs = [ExpertRef(layer, j) for j in range(original.num_experts)]
    blocks = expert_blocks(adapter, refs)
    out = original(hidden, index, weights)
    full = torch.autograd.grad(out, [hidden, weights, *blocks.params], cotangent)
    expected = blocks.restrict(lambda g: g.double().pow(2).sum(), list(full[2:]))

    stored_params = {n: torch.nn.Parameter(p.detach().to(stored), requires_grad=False)
                     for n, p in original.named_parameters()}
    for name, p in stored_params.items():
        setattr(original, name, p)
    streamed = StreamedExperts(adapter, layer, original)
    setattr(adapter.moe_block(layer), adapter.experts_attr, streamed)
    assert all(p.dtype == stored and not p.requires_grad for p in streamed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(streamed(hidden, index, weights), out.detach(), rtol=1e-5, atol=1e-6)
    streamed.sink = GradNormSink(original.num_experts)
    out2 = streamed(hidden, index, weights)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    dx, dw = torch.autograd.grad(out2, [hidden, weights], cotangent)
    torch.testing.assert_close(dx, full[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, full[1], rtol=1e-4, atol=1e-6)
    got = streamed.sink.take()
    assert got.shape == (original.num_experts, len(MATRICES)) and (expected > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert streamed.sink.take().abs().sum() == 0  # taken: the next stream starts from zero
