"""The model adapter interface: every stage sees experts as ``(layer, expert) -> {gate, up, down}``.

An adapter knows, for one architecture family, where the MoE layers are, how expert weights are
stored in memory (fused ``[E, 2I, H]`` / ``[E, H, I]`` parameters or one module per expert) and on
disk (key names), where the router and shared experts are, and how to run a calibration batch.

Matrices are always ``[out, in]`` (``gate``/``up``: ``[I, H]``, ``down``: ``[H, I]``), whatever the
storage orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..schemas import InputError

MATRICES = ("gate", "up", "down")

# Size fields that build tensors: a stranger's config.json must give sane integers before any module is built.
SIZE_FIELDS = {"hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "n_routed_experts", "num_experts", "num_local_experts", "num_experts_per_tok",
               "vocab_size", "max_position_embeddings", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim", "head_dim", "image_size", "patch_size", "vision_dim", "q_lora_rank",
               "shared_expert_intermediate_size", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq"}
ZERO_OK = {"n_shared_experts", "first_k_dense_replace", "shared_expert_intermediate_size"}
NULL_OK = {"q_lora_rank", "head_dim", "num_key_value_heads", "n_shared_experts", "shared_expert_intermediate_size",
           "moe_layer_freq", "max_position_embeddings"}
MAX_SIZE = 1 << 24


def check_sizes(config: dict, where, prefix: str = "", null_ok: frozenset = frozenset(),
                zero_ok: frozenset = frozenset(), notes: dict[str, str] | None = None) -> None:
    """Every size field of ``config`` (nested too) an integer in range. ``null_ok``/``zero_ok``: the family's own
    legal nulls and zeros beside the common ones; ``notes``: what the family allows, appended per field."""
    notes = notes or {}
    for key, value in config.items():
        if key in SIZE_FIELDS and not (value is None and key in NULL_OK | null_ok):
            low = 0 if key in ZERO_OK | zero_ok else 1
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_SIZE:
                raise InputError(f"{where}: {prefix}{key} is {value!r}, expected an integer in [{low}, {MAX_SIZE}]"
                                 f"{notes.get(key, '')}")
        elif isinstance(value, dict):
            check_sizes(value, where, f"{prefix}{key}.", null_ok, zero_ok, notes)
    top_k = config.get("num_experts_per_tok")
    for count in ("n_routed_experts", "num_experts", "num_local_experts"):
        if isinstance(top_k, int) and isinstance(config.get(count), int) and top_k > config[count]:
            raise InputError(f"{where}: {prefix}num_experts_per_tok is {top_k}, expected at most "
                             f"{prefix}{count} ({config[count]}): a token cannot pick more experts than exist")




@dataclass(frozen=True, order=True)
class ExpertRef:
    layer: int
    expert: int  # routed expert index; shared experts count from 0 with shared=True
    shared: bool = False

    @property
    def id(self) -> str:
        return f"L{self.layer}.{'S' if self.shared else 'E'}{self.expert}"

    @classmethod
    def parse(cls, text: str) -> "ExpertRef":
        layer, rest = text.split(".")
        if not (layer.startswith("L") and rest[:1] in ("E", "S")):
            raise ValueError(f"expert id: got {text!r}, expected 'L<layer>.E<expert>' or 'L<layer>.S<index>'")
        return cls(int(layer[1:]), int(rest[1:]), rest[0] == "S")


@dataclass(frozen=True)
class DiskTensor:
    """Where one expert matrix lives in a checkpoint: ``tensor[index][rows]``, transposed if asked."""

    key: str
    index: int | None = None  # expert index into a fused [E, ...] tensor
    rows: tuple[int, int] | None = None  # row range after indexing (gate/up halves of gate_up_proj)
    transpose: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            tensor = tensor[self.index]
        if self.transpose:
            tensor = tensor.t()
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        return tensor

    def read(self, handle) -> torch.Tensor:
        """This matrix from an open ``safe_open`` file, reading only its expert's part of a fused tensor."""
        if self.index is None:
            return self.take(handle.get_tensor(self.key))
        return type(self)(self.key, None, self.rows, self.transpose).take(handle.get_slice(self.key)[self.index])


class MoEAdapter:
    """Base adapter for transformers-style MoE blocks: ``layers[i].<mlp>.<experts>`` and a router.

    Subclasses set the attribute names and override what their family stores differently.
    """

    family = "generic"
    mlp_attr = "mlp"
    experts_attr = "experts"
    router_attr = "gate"
    shared_attr: str | None = "shared_experts"
    disk_prefix = "model.layers"  # on-disk prefix of decoder layers
    null_ok: frozenset = frozenset()  # size fields this family's published configs may leave null / 0
    zero_ok: frozenset = frozenset()
    is_demo = False  # the built-in demo VLM: its own calibration set and digit task, byte tokens (no tokenizer)
    takes_images = False  # image inputs: calibration folders, `run --image`, `eval --task vqa`
    runtime_dtype: torch.dtype | None = None  # what its artifacts run in (None: their dense tensors' stored dtype)
    source_dir: Path | None = None  # the model/artifact directory (set by ``open_model`` / ``skeleton``)

    @classmethod
    def check_config(cls, config: dict, where) -> None:
        """Refuse, in one line, a config.json this family cannot build (before anything is allocated)."""
        check_sizes(config, where, null_ok=cls.null_ok, zero_ok=cls.zero_ok)

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure -------------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.decoder_layers())
                if hasattr(getattr(layer, self.mlp_attr), self.experts_attr)]

    def moe_block(self, layer: int) -> nn.Module:
        return getattr(self.decoder_layers()[layer], self.mlp_attr)

    def experts_module(self, layer: int) -> nn.Module:
        return getattr(self.moe_block(layer), self.experts_attr)

    def router(self, layer: int) -> nn.Module:
        return getattr(self.moe_block(layer), self.router_attr)

    def num_experts(self, layer: int) -> int:
        return self.experts_module(layer).gate_up_proj.shape[0]

    def unbuilt_params(self) -> int:
        """Parameters the real model has that this module tree does not build (0: it builds them all)."""
        return 0

    def top_k(self) -> int:
        cfg = self.language_config()
        return int(getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", 1))

    def language_config(self):
        return self.model.config

    def shared_module(self, layer: int, index: int = 0) -> nn.Module | None:
        if self.shared_attr is None:
            return None
        return getattr(self.moe_block(layer), self.shared_attr, None)

    def experts(self) -> list[ExpertRef]:
        refs = []
        for layer in self.moe_layers():
            refs += [ExpertRef(layer, j) for j in range(self.num_experts(layer))]
            if self.shared_module(layer) is not None:
                refs.append(ExpertRef(layer, 0, shared=True))
        return refs

    # --- weights in memory -------------------------------------------------------------------------
    def expert_weights(self, ref: ExpertRef) -> dict[str, torch.Tensor]:
        """Views ``{gate, up, down}`` (``[out, in]``) into the live parameters."""
        if ref.shared:
            mlp = self.shared_module(ref.layer, ref.expert)
            return {m: getattr(mlp, f"{m}_proj").weight for m in MATRICES}
        experts = self.experts_module(ref.layer)
        gate_up = experts.gate_up_proj[ref.expert]  # [2I, H]
        inter = gate_up.shape[0] // 2
        return {"gate": gate_up[:inter], "up": gate_up[inter:], "down": experts.down_proj[ref.expert]}

    def expert_parameters(self, ref: ExpertRef) -> list[nn.Parameter]:
        if ref.shared:
            mlp = self.shared_module(ref.layer, ref.expert)
            return [getattr(mlp, f"{m}_proj").weight for m in MATRICES]
        experts = self.experts_module(ref.layer)
        return [experts.gate_up_proj, experts.down_proj]

    @torch.no_grad()
    def set_expert_weights(self, ref: ExpertRef, weights: dict[str, torch.Tensor]) -> None:
        for name, live in self.expert_weights(ref).items():
            if name in weights:
                live.copy_(weights[name].to(live.dtype))

    # --- weights on disk ---------------------------------------------------------------------------
    def layer_disk_prefix(self, layer: int) -> str:
        return f"{self.disk_prefix}.{layer}.{self.mlp_attr}"

    def disk_tensors(self, ref: ExpertRef, keys: set[str]) -> dict[str, DiskTensor]:
        """Checkpoint location of each matrix; ``keys`` (the checkpoint's tensor names) picks fused or per-expert."""
        prefix = self.layer_disk_prefix(ref.layer)
        if ref.shared:
            return {m: DiskTensor(f"{prefix}.{self.shared_attr}.{m}_proj.weight") for m in MATRICES}
        if f"{prefix}.{self.experts_attr}.gate_up_proj" not in keys:
            return {m: DiskTensor(f"{prefix}.{self.experts_attr}.{ref.expert}.{m}_proj.weight") for m in MATRICES}
        inter = self.experts_module(ref.layer).down_proj.shape[-1]
        fused = f"{prefix}.{self.experts_attr}"
        return {
            "gate": DiskTensor(f"{fused}.gate_up_proj", ref.expert, (0, inter)),
            "up": DiskTensor(f"{fused}.gate_up_proj", ref.expert, (inter, 2 * inter)),
            "down": DiskTensor(f"{fused}.down_proj", ref.expert),
        }

    def packed_name(self, ref: ExpertRef, matrix: str) -> str:
        """Artifact tensor prefix, compressed-tensors style: ``...experts.{j}.gate_proj``."""
        prefix = self.layer_disk_prefix(ref.layer)
        if ref.shared:
            return f"{prefix}.{self.shared_attr}.{matrix}_proj"
        return f"{prefix}.{self.experts_attr}.{ref.expert}.{matrix}_proj"

    def memory_key(self, key: str) -> str:
        """The in-memory tensor a checkpoint tensor feeds (its own name for families saved under module names)."""
        return key

    def memory_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint (on-disk) non-expert tensors renamed/converted to the in-memory ``state_dict``.

        Identity for families saved under their module names; the runtime loader applies it to an
        artifact's dense tensors before loading them.
        """
        return tensors

    # --- building ----------------------------------------------------------------------------------
    @classmethod
    def build_model(cls, config: dict, where, dtype: torch.dtype | None = None) -> nn.Module:
        """The module tree for ``config`` (called under a ``torch.device`` context, ``meta`` for a skeleton);
        ``where`` is the model/artifact directory; ``dtype``: the parameters' (None: the family's default)."""
        raise NotImplementedError

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype) -> nn.Module:
        """The model with the checkpoint's weights, every tensor accounted for."""
        raise NotImplementedError

    # --- inputs ------------------------------------------------------------------------------------
    @classmethod
    def image_batches(cls, folder, config: dict, tokenizer, directory, batch: int) -> list[dict]:
        """Calibration batches from an image folder (``profiler.calibration.image_folder_batches``); ``directory``:
        the model directory, ``tokenizer`` its tokenizer (None for the demo)."""
        raise InputError(f"{folder}: image calibration folders are supported for the demo VLM, DeepSeek-VL2 and "
                         f"MolmoE, not model_type {config.get('model_type')!r}")

    def image_inputs(self, config: dict, tokenizer, prompt: str, image) -> dict:
        """What ``model(**inputs)`` / ``model.generate(**inputs)`` take for one PIL ``image`` and ``prompt``."""
        raise InputError(f"images: model_type {config['model_type']!r} runs text only "
                         "(images: demo VLM, DeepSeek-VL2, MolmoE)")

    # --- running -----------------------------------------------------------------------------------
    # Layer by layer (the layer-streamed profiler): embed, one decoder layer at a time, loss from the last hidden.
    def decoder_stack(self) -> nn.Module:
        """The module holding the decoder layers, embeddings, rotary embedding and final norm."""
        layers = self.decoder_layers()
        return next(m for m in self.model.modules() if any(c is layers for c in m.children()))

    def embed_batch(self, batch: dict) -> torch.Tensor:
        """What the first decoder layer receives for ``batch`` (text only unless the family overrides it)."""
        if batch.get("images") is not None:
            raise InputError("layer-streamed profiling runs this model on text only; profile image calibration in "
                             "memory (drop --resume / raise --max-memory)")
        core = self.decoder_stack()
        return core.embed_tokens(batch["input_ids"]) * float(getattr(self.language_config(), "embedding_multiplier", 1.0))

    def layer_kwargs(self, hidden: torch.Tensor) -> dict:
        """What a decoder layer takes beside ``hidden`` ``[B, T, H]``: causal mask, positions, rotary embeddings."""
        from transformers.masking_utils import create_causal_mask

        core = self.decoder_stack()
        pos = torch.arange(hidden.shape[1])[None]
        mask = create_causal_mask(config=core.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=pos)
        return dict(attention_mask=mask, position_ids=pos, position_embeddings=core.rotary_emb(hidden, pos),
                    use_cache=False)

    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer`` on ``hidden`` ``[B, T, H]``."""
        out = self.decoder_layers()[layer](hidden, **self.layer_kwargs(hidden))
        return out[0] if isinstance(out, tuple) else out

    def output_head(self) -> nn.Module:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return head if head is not None else self.model.language.lm_head  # mopeq's VLM wrappers

    def last_hidden_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output (final norm, head; GraniteMoe divides by ``logits_scaling``)."""
        logits = self.output_head()(self.decoder_stack().norm(hidden))
        return logits / float(getattr(self.language_config(), "logits_scaling", 1.0))

    def last_hidden_loss(self, batch: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from the last layer's output (the same rule as ``loss``)."""
        return self._cross_entropy(batch, self.last_hidden_logits(hidden))

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits for one calibration batch ``{"input_ids": [B, T], ...}``."""
        return self.model(input_ids=batch["input_ids"], use_cache=False).logits

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch (labels -100 are ignored)."""
        return self._cross_entropy(batch, self.forward(batch))

    @staticmethod
    def _cross_entropy(batch: dict, logits: torch.Tensor) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"][:, 1:]
            logits = logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class LanguageAdapter(MoEAdapter):
    """Families whose runnable LM sits under ``model.language`` (VLM wrappers). ``forward`` passes the
    batch's ``image_keys`` (the family's image inputs) to the model when present; none: text only."""

    disk_prefix = "language.model.layers"
    image_keys: tuple[str, ...] = ()

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language.model.layers

    def language_config(self):
        return self.model.language.config

    def embed_batch(self, batch: dict) -> torch.Tensor:
        """Text embeddings, with the vision tower's features in their slots when the batch has images."""
        if batch.get("images") is None:
            return super().embed_batch(batch)
        return self.model.image_embeddings(batch["input_ids"], *(batch.get(k) for k in self.image_keys))

    def forward(self, batch: dict) -> torch.Tensor:
        images = {k: batch[k] for k in self.image_keys if batch.get(k) is not None}
        return self.model(input_ids=batch["input_ids"], use_cache=False, **images).logits
