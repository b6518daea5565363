"""Generic adapter for transformers MoE families mopeq has no adapter for.

Detection, on the built module tree: the decoder layers are the longest ``nn.ModuleList`` of the
model; a layer is MoE when one of its children (the MoE block) holds an experts module with fused
parameters ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (``H`` = hidden size), an
``act_fn`` and no biases, next to a router child (``gate`` or ``router``). A shared expert is a child
MLP with ``gate_proj``/``up_proj``/``down_proj`` named ``shared_expert(s)``. Anything else (transposed
or interleaved fused tensors, biases, a list of per-expert MLPs) is refused with an ``InputError`` that
says what was found and what was expected, instead of quantizing the wrong rows.
"""

from __future__ import annotations

from torch import nn

from ..schemas import InputError
from .hf import TransformersAdapter

ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_experts", "shared_expert")


def decoder_layer_path(model: nn.Module) -> str:
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise InputError(f"{type(model).__name__}: no decoder layers found (no nn.ModuleList of layers)")
    return max(lists, key=lambda t: (t[0], -len(t[1])))[1]


def find_moe_block(layer: nn.Module, hidden: int) -> tuple[str, str, str] | None:
    """``(mlp_attr, experts_attr, router_attr)`` of a layer's MoE block, or None for a dense layer."""
    for mlp_name, block in layer.named_children():
        router = next((r for r in ROUTER_NAMES if isinstance(getattr(block, r, None), nn.Module)), None)
        for experts_name, experts in block.named_children():
            if _is_fused_experts(experts, hidden, f"{mlp_name}.{experts_name}"):
                if router is None:
                    raise InputError(f"{mlp_name}: experts found at {mlp_name}.{experts_name} but no router "
                                     f"(expected a child named one of {ROUTER_NAMES})")
                return mlp_name, experts_name, router
            _refuse_expert_list(experts, f"{mlp_name}.{experts_name}")
    return None


def _is_fused_experts(module: nn.Module, hidden: int, where: str) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter) or gate_up.dim() != 3:
        return False
    e, two_i, h = gate_up.shape
    if h != hidden or tuple(down.shape) != (e, hidden, two_i // 2):
        raise InputError(f"{where}: fused experts gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)}, "
                         f"expected [E, 2I, {hidden}] / [E, {hidden}, I] (transposed layouts need an adapter)")
    if any(n.endswith("bias") for n, _ in module.named_parameters()) or not hasattr(module, "act_fn"):
        raise InputError(f"{where}: fused experts with biases or without act_fn (interleaved gate/up "
                         f"layouts such as gpt-oss need an adapter)")
    return True


def _refuse_expert_list(module: nn.Module, where: str) -> None:
    if isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "down_proj"):
        raise InputError(f"{where}: a list of {len(module)} per-expert MLPs; mopeq's runtime needs fused "
                         f"[E, 2I, H] expert parameters (write an adapter for this family)")


class GenericAdapter(TransformersAdapter):
    """Detects the MoE layout of an unregistered transformers family (see the module docstring)."""

    family = "generic"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers_path = decoder_layer_path(model)
        hidden = int(getattr(self.language_config(), "hidden_size", 0))
        found = {i: find_moe_block(layer, hidden) for i, layer in enumerate(self.decoder_layers())}
        blocks = {b for b in found.values() if b is not None}
        if not blocks:
            raise InputError(f"{type(model).__name__}: no MoE layers found in {self.layers_path}[*] (looked for a "
                             f"child holding fused gate_up_proj [E, 2I, {hidden}] / down_proj [E, {hidden}, I] "
                             f"expert parameters next to a router named {' or '.join(ROUTER_NAMES)})")
        if len(blocks) > 1:
            raise InputError(f"{type(model).__name__}: MoE blocks under different names {sorted(blocks)}")
        self.mlp_attr, self.experts_attr, self.router_attr = blocks.pop()
        self._moe = [i for i, b in found.items() if b is not None]
        block = self.moe_block(self._moe[0])
        self.shared_attr = next((s for s in SHARED_NAMES if hasattr(getattr(block, s, None), "down_proj")), None)
        self.family = getattr(model.config, "model_type", "generic")
        self.disk_prefix = self.layers_path

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    def moe_layers(self) -> list[int]:
        return list(self._moe)

    def language_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg
