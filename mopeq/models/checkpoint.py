"""Checkpoint helpers for families built outside transformers' auto classes (DeepSeek-VL2, MolmoE).

* ``checkpoint_files`` / ``header`` / ``read_state``: safetensors checkpoints (one file or an index),
  headers read without loading data.
* ``fuse_experts``: one-tensor-per-expert ``P.experts.{j}.{gate,up,down}_proj.weight`` ->
  transformers' fused ``P.experts.gate_up_proj`` ``[E, 2I, H]`` and ``P.experts.down_proj`` ``[E, H, I]``.
* ``attach_frozen``: registers tensors the model keeps but never runs or quantizes (a vision encoder
  we do not rebuild) under their checkpoint names, so they load and pass through the compiler untouched.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..safety import check_safetensors, index_shards
from ..schemas import InputError

PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<j>\d+)\.(?P<m>gate|up|down)_proj\.weight$")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (``[]`` when it has none, e.g. config only)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(index_shards(directory, index).values()))  # names checked to stay inside
    return sorted(directory.glob("*.safetensors"))


def header(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """tensor name -> (shape, dtype), read from the safetensors headers only."""
    out = {}
    for path in checkpoint_files(directory):
        check_safetensors(path)
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                out[key] = (tuple(part.get_shape()), DTYPES.get(part.get_dtype(), torch.float32))
    return out


def read_state(directory: Path) -> dict[str, torch.Tensor]:
    files = checkpoint_files(directory)
    if not files:
        raise InputError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for path in files:
        check_safetensors(path)
        with safe_open(str(path), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack per-expert matrices into ``gate_up_proj = [gate_j; up_j]`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for key, tensor in state.items():
        match = PER_EXPERT.match(key)
        if match is None:
            out[key] = tensor
        else:
            groups[match["prefix"]][int(match["j"])][match["m"]] = tensor
    for prefix, experts in groups.items():
        order = [experts[j] for j in range(len(experts))]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([e["down"] for e in order])
    return out


class TextOnlyWrapper(nn.Module):
    """A VLM rebuilt for text: ``self.language`` runs, the vision tensors ride along frozen."""

    def forward(self, input_ids=None, **kwargs):
        return self.language(input_ids=input_ids, **kwargs)

    def generate(self, *args, **kwargs):
        return self.language.generate(*args, **kwargs)


def attach_frozen(root: nn.Module, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Register ``name -> (shape, dtype)`` as frozen parameters under plain container modules."""
    for name, (shape, dtype) in sorted(tensors.items()):
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str, source: str) -> None:
    """Refuse ``state`` unless it has exactly ``expected``'s names and shapes (one line naming the tensor)."""
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if missing or unknown:
        what = f"tensor {missing[0]} missing from the {source}" if missing else \
            f"tensor {unknown[0]} does not belong to this model"
        raise InputError(f"{where}: {what} ({source} does not match its config.json)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InputError(f"{where}: tensor {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(expected[key].shape)} from config.json")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
    """Materialise ``model`` (possibly on meta) with ``state``; every parameter must be provided."""
    expected = model.state_dict()
    check_state(expected, state, str(directory), "checkpoint")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    return model
