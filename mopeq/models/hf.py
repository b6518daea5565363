"""The adapter base for families transformers builds and loads itself (every LLM family, Qwen3-VL-MoE).

Everything on-disk follows transformers' own conversion (``KeyMap``): where an expert's matrices lie
in the checkpoint, how the runtime renames an artifact's dense tensors, and how the model is loaded.
Loading goes through ``from_pretrained`` with the checkpoint's tensors given as lazy (mmapped) slices
of the shards mopeq already checked (so a sharded index without ``"metadata"`` loads too), and any
missing, unexpected or mismatched tensor is refused in one line instead of left randomly initialised.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..schemas import InputError
from .base import MATRICES, DiskTensor, ExpertRef, MoEAdapter
from .keymap import KeyMap

SHOWN_KEYS = 3


class TransformersAdapter(MoEAdapter):
    """A transformers ``*ForCausalLM`` (``auto_class``) with fused experts; subclasses name the attributes."""

    auto_class = "AutoModelForCausalLM"

    # --- on disk -------------------------------------------------------------------------------------
    @property
    def keymap(self) -> KeyMap:
        if getattr(self, "_keymap", None) is None:
            self._keymap = KeyMap(self.model)
        return self._keymap

    def module_name(self, module: nn.Module) -> str:
        if getattr(self, "_names", None) is None:
            self._names = {id(m): n for n, m in self.model.named_modules()}
        return self._names[id(module)]

    def disk_shape(self, key: str) -> tuple[int, ...]:
        if getattr(self, "_shapes", None) is None:
            from .checkpoint import header

            self._shapes = header(self.source_dir) if self.source_dir is not None else {}
        if key not in self._shapes:
            raise InputError(f"checkpoint: tensor {key} not found in {self.source_dir}")
        return self._shapes[key][0]

    def disk_tensors(self, ref: ExpertRef, keys: set[str]) -> dict[str, DiskTensor]:
        """Where transformers would read each matrix from, by its own conversion rules (see ``KeyMap``)."""
        if ref.shared:
            prefix = self.module_name(self.shared_module(ref.layer, ref.expert))
            return {m: self._single_source(f"{prefix}.{m}_proj.weight", keys) for m in MATRICES}
        experts = self.experts_module(ref.layer)
        prefix = self.module_name(experts)
        gate_up = self.keymap.expert_sources(f"{prefix}.gate_up_proj", ref.expert, tuple(experts.gate_up_proj.shape),
                                             keys, self.disk_shape)
        (down,) = self.keymap.expert_sources(f"{prefix}.down_proj", ref.expert, tuple(experts.down_proj.shape),
                                             keys, self.disk_shape)
        if len(gate_up) == 2:
            return {"gate": gate_up[0], "up": gate_up[1], "down": down}
        inter = experts.gate_up_proj.shape[1] // 2
        return {"gate": replace(gate_up[0], rows=(0, inter)), "up": replace(gate_up[0], rows=(inter, 2 * inter)),
                "down": down}

    def _single_source(self, memory_key: str, keys: set[str]) -> DiskTensor:
        found = self.keymap.sources(keys).get(memory_key, [])
        if len(found) != 1:
            raise InputError(f"checkpoint: expected one tensor that transformers loads into {memory_key}, "
                             f"found {len(found)}")
        return DiskTensor(found[0])

    def memory_key(self, key: str) -> str:
        return self.keymap.memory_key(key)

    def memory_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.keymap.convert(tensors)

    # --- building --------------------------------------------------------------------------------------
    @classmethod
    def hf_config(cls, config: dict):
        from transformers import AutoConfig

        clean = {k: v for k, v in config.items() if k != "quantization_config"}
        return AutoConfig.for_model(**clean)

    @classmethod
    def model_class(cls, config: dict) -> type:
        """The concrete class ``auto_class`` picks for ``config`` (``from_pretrained`` on a state dict needs it)."""
        import transformers

        return getattr(transformers, cls.auto_class)._model_mapping[type(cls.hf_config(config))]

    @classmethod
    def build_model(cls, config: dict, where, dtype: torch.dtype | None = None) -> nn.Module:
        import transformers

        auto = getattr(transformers, cls.auto_class)
        extra = {} if dtype is None else {"dtype": dtype}
        return _auto(lambda: auto.from_config(cls.hf_config(config), attn_implementation="eager", **extra), config,
                     where)

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype) -> nn.Module:
        """``from_pretrained`` over the checked shards (mmapped slices); refuses any key mismatch."""
        from safetensors import safe_open
        from transformers.utils import logging

        from ..safety import checkpoint_shards

        quantized = config.get("quantization_config")
        if quantized:  # e.g. DeepSeek-V3's published fp8 weights with block scales
            method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized
            raise InputError(f"{Path(directory) / 'config.json'}: quantization_config.quant_method {method!r}: mopeq "
                             f"quantizes unquantized checkpoints (bf16/fp16/fp32); dequantize this one first")
        shards = checkpoint_shards(Path(directory))
        handles = {path: safe_open(str(path), "pt") for path in set(shards.values())}
        state = {key: handles[path].get_slice(key) for key, path in shards.items()}
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # its per-tensor "Loading weights" bar; mopeq reports its own progress
        try:
            model, info = _auto(lambda: cls.model_class(config).from_pretrained(
                None, config=cls.hf_config(config), state_dict=state, dtype=dtype, attn_implementation="eager",
                output_loading_info=True), config, directory)
        finally:
            if bar:
                logging.enable_progress_bar()
        check_loading_info(info, model, Path(directory))
        return model


def check_loading_info(info: dict, model: nn.Module, directory: Path) -> None:
    """One line for the first problem transformers found: a weight it would initialise at random, a
    checkpoint tensor it would drop, or a shape that does not fit."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    problems = [("missing from the checkpoint (it would be initialised at random)", missing),
                ("in the checkpoint but not in the model config.json describes", sorted(info.get("unexpected_keys", ()))),
                ("of a shape config.json does not give", sorted(k[0] if isinstance(k, tuple) else str(k)
                                                        for k in info.get("mismatched_keys", ()))),
                ("not convertible the way transformers loads it", sorted(str(k) for k in info.get("conversion_errors", ())))]
    for what, keys in problems:
        if keys:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            raise InputError(f"{directory}: {len(keys)} tensor(s) {what}: {', '.join(keys[:SHOWN_KEYS])}{more} "
                             f"(does config.json match the checkpoint?)")


def _auto(build, config: dict, where):
    try:
        return build()
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:  # transformers' refusals
        raise InputError(f"{where}: transformers cannot build model_type {config.get('model_type')!r} from this "
                         f"config ({' '.join(str(exc).split())[:200]})") from None
