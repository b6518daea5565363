"""OLMoE: fused experts in memory (``[E, 2I, H]`` / ``[E, H, I]``), router ``mlp.gate``, expert count
``num_experts``, no shared expert; on disk one tensor per expert
(``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``), which the base adapter reads."""

from __future__ import annotations

from .hf import TransformersAdapter


class OlmoeAdapter(TransformersAdapter):
    family = "olmoe"
    shared_attr = None
