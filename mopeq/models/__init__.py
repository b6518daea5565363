"""Model registry: open a model directory (or the built-in demo) and pick its adapter.

``open_model(path)`` loads weights for profiling/eval; ``skeleton(config)`` builds the module tree
without real weights, which is all the compiler needs to know where experts live.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..safety import checkpoint_shards, read_json
from ..schemas import InputError, config_hash
from .base import ExpertRef, MoEAdapter
from .deepseek import DeepseekAdapter, DemoAdapter
from .deepseek_vl2 import DeepseekVL2Adapter
from .mixtral import MixtralAdapter
from .molmoe import MolmoeAdapter
from .olmoe import OlmoeAdapter
from .qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter, Qwen3VLMoeAdapter

DEMO = "demo"

# model_type -> adapter class; families register themselves here.
ADAPTERS: dict[str, type[MoEAdapter]] = {
    "mopeq_demo_vlm": DemoAdapter,
    "deepseek_v2": DeepseekAdapter,
    "deepseek_v3": DeepseekAdapter,
    "deepseek_vl_v2": DeepseekVL2Adapter,
    "mixtral": MixtralAdapter,
    "minimax": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
    "qwen3_moe": Qwen3MoeAdapter,
    "qwen3_vl_moe": Qwen3VLMoeAdapter,
    "olmoe": OlmoeAdapter,
    "molmo": MolmoeAdapter,  # MolmoE-1B (OLMoE LM); dense Molmo checkpoints are refused by its config check
    "molmoe": MolmoeAdapter,  # the published allenai/MolmoE-1B-0924 config.json (HF keys, MOLMoEForCausalLM)
}


@dataclass
class LoadedModel:
    model: nn.Module
    adapter: MoEAdapter
    config: dict
    model_id: str
    directory: Path

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def resolve_dir(path: str | Path) -> Path:
    if str(path) == DEMO:
        from ..demo.model import WEIGHTS_DIR

        return WEIGHTS_DIR
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json (expected a Hugging Face model directory or 'demo')")
    return path


def read_config(directory: Path) -> dict:
    config = read_json(directory / "config.json", "config")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{directory / 'config.json'}: no 'model_type' field")
    adapter_class(config, directory).check_config(config, directory / "config.json")
    _bound_layers(config, directory)
    return config


def check_model_size(adapter: MoEAdapter, directory: Path) -> None:
    """Refuse a module tree (built on meta) that holds far more parameters than the checkpoint holds values: a
    config that does not describe its checkpoint (``hidden_size: 1e7``) would otherwise allocate until killed."""
    from ..safety import check_safetensors

    values = sum(math.prod(e["shape"]) for shard in sorted(set(checkpoint_shards(directory).values()))
                 for e in check_safetensors(shard).values())
    params = sum(p.numel() for p in adapter.model.parameters())
    if params > 2 * values + 4096:
        raise InputError(f"{directory / 'config.json'}: describes a model of {params:,} parameters, but the checkpoint "
                         f"holds {values:,} values; the config does not describe this checkpoint")


LAYER_FIELDS = ("num_hidden_layers", "n_layers", "num_layers")


def _bound_layers(config: dict, directory: Path) -> None:
    """Refuse, before anything is built, a config with more layers than its tensors could hold: every layer (of the
    language model or a vision tower) is numbered in the tensor names, so no layer count may exceed the largest
    number found in them (``num_hidden_layers: 1000000`` would otherwise build layers until memory runs out)."""
    import re

    if not any(directory.glob("*.safetensors")):
        return  # a config alone (``mopeq estimate``)
    numbers = [int(n) for key in checkpoint_shards(directory) for n in re.findall(r"\.(\d+)(?=\.)", key)]
    most = max(numbers, default=-1) + 1
    counts = [(f"{prefix}{k}", v) for prefix, d in [("", config)] + [(f"{k}.", v) for k, v in config.items()
                                                                    if isinstance(v, dict)]
              for k, v in d.items() if k in LAYER_FIELDS and isinstance(v, int)]
    for field, count in counts:
        if count > most:
            raise InputError(f"{directory / 'config.json'}: {field} is {count}, but the tensors number at most {most} "
                             f"layers; the config does not describe this checkpoint")


def adapter_class(config: dict, where: Path) -> type[MoEAdapter]:
    model_type = config.get("model_type")
    if model_type not in ADAPTERS and _known_to_transformers(model_type):
        from .generic import GenericAdapter

        return GenericAdapter  # detects the MoE layout when built, or names what it could not find
    if model_type not in ADAPTERS:
        raise InputError(f"{where}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[model_type]


def _known_to_transformers(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def skeleton(config: dict, where: Path, device: str = "meta", dtype: torch.dtype | None = None,
             init=None) -> MoEAdapter:
    """An adapter over a weightless module tree (``device="meta"``) built from ``config``; ``dtype``: the
    parameters' dtype (None: what the config says, else float32); ``init``: a context to build under instead
    of ``torch.device(device)`` (the runtime's ``empty_weights()``: parameters on meta, buffers real)."""
    cls = adapter_class(config, where)
    try:
        with init if init is not None else torch.device(device), _default_dtype(dtype):
            model = cls.build_model(config, where) if dtype is None else cls.build_model(config, where, dtype)
    except StrictDataclassError as exc:  # transformers' typed config refused a field of config.json
        raise InputError(f"{Path(where) / 'config.json'}: {' '.join(str(exc).split())[:300]}") from None
    adapter = cls(model)
    adapter.source_dir = Path(where)
    return adapter


@contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """Families built outside transformers' ``from_config`` take their dtype from torch's default, as it does."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def open_model(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model directory (or ``"demo"``) with real weights, eager attention, in eval mode."""
    directory = resolve_dir(path)
    config = read_config(directory)
    cls = adapter_class(config, directory)
    checkpoint_shards(directory)  # safetensors only (never pickle), names and headers checked before loading
    check_model_size(skeleton(config, directory), directory)  # on meta: nothing allocated yet
    model = cls.load_model(directory, config, dtype)
    model.eval()
    model_id = DEMO if str(path) == DEMO else str(config.get("_name_or_path") or directory.name)
    adapter = cls(model)
    adapter.source_dir = directory
    return LoadedModel(model, adapter, config, model_id, directory)


__all__ = ["ADAPTERS", "DEMO", "ExpertRef", "LoadedModel", "MoEAdapter", "open_model", "read_config",
           "resolve_dir", "skeleton"]
