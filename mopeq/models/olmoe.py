"""OLMoE: fused experts in memory (``[E, 2I, H]`` / ``[E, H, I]``), router ``mlp.gate``, expert count
``num_experts``, no shared expert; on disk one tensor per expert
(``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``), which the base adapter reads."""

from __future__ import annotations

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    shared_attr = None
