"""transformers' own checkpoint key conversion, both ways, for models it builds.

transformers 5 loads a checkpoint through a list of ``WeightRenaming`` (key renames) and
``WeightConverter`` (renames plus tensor operations: stacking per-expert tensors, concatenating gate
and up, transposing) steps, from ``get_model_conversion_mapping(model)``. mopeq follows the same list:

* ``KeyMap.convert(tensors)``: on-disk tensors -> in-memory ``state_dict`` tensors (any subset, e.g.
  one decoder layer, or an artifact's dense tensors), running transformers' own operations;
* ``KeyMap.memory_key(disk_key)``: which in-memory tensor a disk tensor feeds;
* ``KeyMap.expert_sources(...)``: where one expert's ``[out, in]`` matrices lie on disk (a slice of a
  fused tensor, possibly transposed, or one tensor per expert), for the compiler's zero-copy reads.

Example::

    keymap = KeyMap(model)                          # a built (meta) transformers model
    keymap.memory_key("model.layers.1.block_sparse_moe.input_linear.weight")
    # -> "model.layers.1.block_sparse_moe.experts.gate_up_proj"   (GraniteMoe)
"""

from __future__ import annotations

import re
from collections import defaultdict
from copy import deepcopy

import torch
from torch import nn

from ..schemas import InputError
from .base import DiskTensor


class KeyMap:
    """The conversion transformers applies when loading checkpoints into ``model`` (identity for others)."""

    def __init__(self, model: nn.Module):
        from transformers import PreTrainedModel
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        conversions = []
        if isinstance(model, PreTrainedModel):
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = get_model_conversion_mapping(model, add_legacy=False)
        self.model = model
        self.renamings = [t for t in conversions if isinstance(t, WeightRenaming)]
        self.converters = [t for t in conversions if isinstance(t, WeightConverter)]
        self.prefix = getattr(model, "base_model_prefix", None) or None
        self.expected = {k: None for k in model.state_dict()} if self.prefix else None
        self._cache: dict[str, tuple[str, str | None]] = {}
        self._sources: tuple[frozenset, dict[str, list[str]]] | None = None

    def _rename(self, key: str) -> tuple[str, str | None]:
        """``(memory key, matched converter source pattern or None)``."""
        if key not in self._cache:
            from transformers.core_model_loading import rename_source_key

            self._cache[key] = rename_source_key(key, self.renamings, self.converters, self.prefix,
                                                 self.expected or None)
        return self._cache[key]

    def memory_key(self, key: str) -> str:
        return self._rename(key)[0]

    def sources(self, disk_keys) -> dict[str, list[str]]:
        """memory key -> the disk keys it is made of (sorted the way transformers stacks them)."""
        from transformers.core_model_loading import dot_natural_key

        keys = frozenset(disk_keys)
        if self._sources is None or self._sources[0] != keys:
            out: dict[str, list[str]] = defaultdict(list)
            for key in sorted(keys, key=dot_natural_key):
                out[self.memory_key(key)].append(key)
            self._sources = (keys, dict(out))
        return self._sources[1]

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Disk-named tensors -> memory-named tensors with transformers' operations (one group at a time)."""
        from transformers.core_model_loading import dot_natural_key

        out, groups = {}, {}
        for key in sorted(tensors, key=dot_natural_key):
            memory, pattern = self._rename(key)
            if pattern is None:
                out[memory] = tensors[key]
                continue
            if memory not in groups:
                groups[memory] = deepcopy(self._converter(pattern))
            groups[memory].add_tensor(memory, key, pattern, (lambda t: lambda: t)(tensors[key]))
        for memory, converter in groups.items():
            try:
                converted = converter.convert(memory, model=self.model, config=getattr(self.model, "config", None))
            except Exception as exc:  # transformers' ops raise plain errors on shapes that do not fit
                raise InputError(f"checkpoint: tensors for {memory} cannot be converted the way transformers "
                                 f"loads them ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
            out.update({k: v[0] if isinstance(v, list) else v for k, v in converted.items()})
        return out

    def _converter(self, pattern: str):
        return next(c for c in self.converters if pattern in c.source_patterns)

    def expert_sources(self, fused_key: str, expert: int, live_shape: tuple[int, ...], disk_keys,
                       disk_shape) -> list[DiskTensor]:
        """Where expert ``expert``'s slice of the in-memory fused tensor ``fused_key`` (``[E, R, C]``) lies on disk.

        Returns one ``DiskTensor`` per concatenated part, in order (gate then up for ``gate_up_proj``).
        ``disk_shape(key)`` gives a disk tensor's shape (from the headers).
        """
        keys = self.sources(disk_keys).get(fused_key)
        if not keys:
            raise InputError(f"checkpoint: no tensor that transformers loads into {fused_key}")
        per_expert = tuple(live_shape[1:])
        pattern = self._rename(keys[0])[1]
        if len(keys) == 1:  # fused on disk (renamed, or transposed by a converter when its shape says so)
            stored = tuple(disk_shape(keys[0]))
            return [DiskTensor(keys[0], expert, None, _transposed(stored[1:], per_expert, keys[0]))]
        converter = self._converter(pattern)
        ops = {type(op).__name__ for op in converter.operations}
        if not ops <= {"MergeModulelist", "Concatenate", "Transpose"}:
            raise InputError(f"checkpoint: transformers builds {fused_key} with {sorted(ops)}; mopeq reads expert "
                             f"tensors that are stacked, concatenated or transposed only")
        parts = []
        for source_pattern in converter.source_patterns:
            regex = re.compile(re.escape(source_pattern).replace(r"\*", r"(\d+)") + r"$")
            found = [k for k in keys if _expert_index(regex, self, k) == expert]
            if len(found) != 1:
                raise InputError(f"checkpoint: expected one tensor matching {source_pattern} for expert {expert} "
                                 f"of {fused_key}, found {len(found)}")
            parts.append(found[0])
        rows = per_expert[0] // len(parts)
        part_shape = (rows,) + per_expert[1:]
        return [DiskTensor(k, None, None, _transposed(tuple(disk_shape(k)), part_shape, k)) for k in parts]


def _expert_index(regex: re.Pattern, keymap: KeyMap, key: str) -> int | None:
    """The ``*`` index of ``key`` in a converter pattern, matched after transformers' renamings."""
    from transformers.core_model_loading import apply_renamings

    match = regex.search(apply_renamings(key, keymap.renamings))
    return int(match.group(1)) if match else None


def _transposed(stored: tuple[int, ...], live: tuple[int, ...], key: str) -> bool:
    """Stored as in memory (False) or transposed (True); like ``Transpose(check_dims=True)``, equal shapes
    are read as they are."""
    if tuple(stored) == tuple(live):
        return False
    if len(stored) == 2 and tuple(stored) == tuple(live)[::-1]:
        return True
    raise InputError(f"checkpoint: tensor {key} has shape {list(stored)}, expected {list(live)} "
                     f"(or its transpose) from config.json")
