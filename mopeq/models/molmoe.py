"""MolmoE-1B (allenai/MolmoE-1B-0924): an OLMoE-1B-7B language model behind a CLIP ViT and a connector.

What the public source says (read through the code index; no download of the real checkpoint here):

* ``config.json`` is the flattened OLMo ``ModelConfig`` (``model_type: molmo``; ``MolmoConfig`` in the
  remote-code ``config_molmoe.py``, as mirrored in ChulanZhang/molmo_hf ``molmo/models/config_molmoe.py``):
  ``d_model``, ``n_heads``, ``n_kv_heads`` (null = ``n_heads``), ``n_layers``, ``mlp_ratio`` /
  ``mlp_hidden_size``, ``moe_num_experts``, ``moe_top_k``, ``vocab_size``, ``embedding_size``,
  ``additional_vocab_size``, ``weight_tying``, ``rope_theta``, ``layer_norm_eps``, ``clip_qkv``,
  ``include_bias``, ``attention_layer_norm``, ``rope_impl``. ``hidden_size``/``num_hidden_layers``/
  ``num_attention_heads`` are *properties* of ``MolmoConfig``, not stored fields.
* The LM preset that MolmoE uses (allenai/molmo ``olmo/config.py`` ``OLMOE``, mirrored in
  BennoKrojer/molmo and other forks): ``d_model=2048, n_heads=16, n_layers=16, mlp_ratio=1,
  block_type=moe, layer_norm_type=rms, layer_norm_eps=1e-5, attention_layer_norm=True,
  include_bias=False, vocab_size=50280, embedding_size=50304, additional_vocab_size=128,
  weight_tying=False, moe_num_experts=64, moe_top_k=8, moe_shared_expert=False, moe_dropless=True``.
* Expert width: ``(mlp_hidden_size or mlp_ratio * d_model) // 2`` = 1024 (``MolmoeMLP`` in
  ``modeling_molmoe.py``; megablocks' ``ffn_hidden_size = 0.5 * hidden`` for SwiGLU in OLMo).
* Router: softmax over all experts, then top-k, **no renormalisation** (``MolmoeSparseMoeBlock.forward``)
  = transformers' OLMoE with ``norm_topk_prob=False``.
* Attention: one fused ``att_proj`` ``[d + 2*kv, d]`` split q|k|v (``fused_dims``), RMS ``q_norm``/``k_norm``
  over the whole projection before the head split, ``attn_out``; pre-norm ``attn_norm``/``ff_norm``;
  embeddings ``wte.embedding`` ``[embedding_size, d]`` + ``wte.new_embedding`` ``[additional, d]``
  concatenated; final ``ln_f``; logits from an untied head over ``embedding_size`` rows only.
* RoPE: ``rope_impl == "cockatoo"`` (the remote code's default) rotates interleaved pairs; otherwise
  rotate-half (OLMo's ``olmo/model.py``). Interleaved RoPE equals rotate-half RoPE after the same
  per-head permutation of q and k rows, so we permute ``att_proj``/``q_norm``/``k_norm`` at load.

Two config.json dialects are read (``normalise`` maps the second onto the first):

* **OLMo-style** (``model_type: molmo``, the flattened ``ModelConfig`` above).
* **HF-style** (``model_type: molmoe``, ``architectures: [MOLMoEForCausalLM]``, ``auto_map.AutoConfig:
  config_molmoe.MolmoeConfig``), the form of the published allenai/MolmoE-1B-0924 ``config.json``
  (huggingface.co/allenai/MolmoE-1B-0924, commit ad41925d): ``hidden_size``, ``intermediate_size``
  (the width of *one* expert: 1024 = OLMoE-1B-7B's expert width; 16 layers x 64 experts x 3 x 2048 x 1024
  = 6.4B of the published 7.2B total, so it is not halved like OLMo's ``mlp_hidden_size``),
  ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``, ``embedding_size``,
  ``additional_vocab_size``, ``layer_norm_eps``, ``rope_theta``, ``qkv_bias``, ``weight_tying``,
  ``tie_word_embeddings``, ``clip_qkv``, ``max_position_embeddings``. It carries **no expert-count keys**:
  the remote-code ``MolmoeConfig.__init__`` defaults are ``num_experts=64``, ``num_experts_per_tok=8``,
  ``norm_topk_prob=False``, ``rms_norm_eps=1e-5``, ``num_key_value_heads=None`` (= heads) (read in a
  derivative copy of ``config_molmoe.py`` in the public code index, ``class MolmoeConfig(PretrainedConfig)``,
  ``model_type = "molmoe"``; allenai's own copy was not reachable here). Those keys are honoured when present,
  as are OLMo's ``moe_num_experts``/``moe_top_k``. ``additional_vocab_size`` falls back to the rows of
  ``model.transformer.wte.new_embedding`` in the checkpoint, then 0.

Two on-disk layouts are public, both under ``model.transformer.`` and both read here:

* **megablocks / OLMo** (``olmo/model.py`` ``OLMoEBlock``; transformers'
  ``convert_olmoe_weights_to_hf.py``): ``blocks.{i}.att_proj|attn_out|attn_norm|ff_norm|q_norm|k_norm.weight``,
  router ``blocks.{i}.ffn.router.layer.weight`` ``[E, d]``, experts stacked
  ``blocks.{i}.ffn.experts.mlp.w1|v1|w2`` each ``[E*I, d]``: expert ``j`` owns rows ``j*I:(j+1)*I``;
  gate = w1 rows, up = v1 rows, down = (w2 rows)ᵀ. LM head ``model.transformer.ff_out.weight``.
* **HF remote code** (``modeling_molmoe.py``: ``MolmoDecoderLayer`` with ``attn`` = ``MolmoAttention`` and
  ``mlp`` = ``MolmoeSparseMoeBlock``; ChulanZhang/molmo_hf ``molmo/models/modeling_molmoe.py``):
  ``blocks.{i}.attn.att_proj|attn_out|attn_norm|q_norm|k_norm.weight``, ``blocks.{i}.mlp.gate.weight``,
  ``blocks.{i}.mlp.ff_norm.weight``, ``blocks.{i}.mlp.experts.{j}.gate_proj|up_proj|down_proj.weight``;
  head ``lm_head.weight``.

mopeq runs the **language model** as transformers' ``OlmoeForCausalLM`` under ``language.`` (vocab =
``embedding_size + additional_vocab_size`` so every id embeds; the logits of the ``additional`` ids are
pinned to the dtype minimum because MolmoE's head never produces them). When the checkpoint holds the
whole ``model.vision_backbone.*`` (ViT + pooling + projector + ``pad_embed``), it is rebuilt as
:class:`~mopeq.models.molmo_vision.MolmoVisionBackbone` under ``model.vision_backbone`` and
``MolmoeText.forward(input_ids, images, image_masks, image_input_idx)`` adds the image features to the
``<im_patch>`` token embeddings as ``MolmoModel.forward`` does (``molmo_vision.molmo_image_inputs`` makes
those inputs); without those tensors the model is text-only, and a partial set is refused. Vision tensors
are never quantized and are copied byte for byte. ``input_ids`` of -1 are padding, as in the remote code:
embedded as id 0, masked out of attention, positions counted over the real tokens only. ``clip_qkv`` (null
in MolmoE) is refused: OLMo clips before the QK norm, transformers' OLMoE after it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..schemas import InputError
from .base import DiskTensor, ExpertRef, LanguageAdapter
from .checkpoint import TextOnlyWrapper, attach_frozen, header, load_into, read_state
from .layouts import megablocks
from .molmo_vision import VISION, MolmoVisionBackbone, VisionGeometry, add_image_features, vision_geometry
from .molmo_vision import memory_key as vision_memory_key

ROOT = "model.transformer."
BLOCKS = ROOT + "blocks"
LM_KEYS = (ROOT, "lm_head.")


def _get(config: dict, key: str, default=None):
    value = config.get(key)
    return default if value is None else value


# HF-style (model_type "molmoe") defaults of the remote-code MolmoeConfig.__init__ (see the module docstring).
HF_DEFAULT_EXPERTS, HF_DEFAULT_TOP_K = 64, 8


def is_hf_style(config: dict) -> bool:
    """The published checkpoint's dialect: no OLMo ``d_model``, and HF ``hidden_size`` or ``model_type: molmoe``.

    ``normalise``'s output carries ``d_model``, so normalising twice is a no-op."""
    return "d_model" not in config and ("hidden_size" in config or config.get("model_type") == "molmoe")


def _first(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def normalise(config: dict, tensors: dict | None = None) -> dict:
    """An HF-style MolmoE config.json -> the OLMo-style keys ``geometry`` reads; OLMo-style passes through.

    ``tensors`` (name -> (shape, dtype), the checkpoint header) only fills ``additional_vocab_size`` when the
    config leaves it out. Expert counts default to the remote ``MolmoeConfig`` defaults, 64 experts / top-8.
    """
    if not is_hf_style(config):
        return config
    out = {k: v for k, v in config.items() if k not in ("model_type",)}
    out["model_type"] = "molmoe"
    out["d_model"] = config.get("hidden_size")
    out["n_heads"] = config.get("num_attention_heads")
    out["n_kv_heads"] = config.get("num_key_value_heads")
    out["n_layers"] = config.get("num_hidden_layers")
    inter = config.get("intermediate_size")  # one expert's width; geometry halves mlp_hidden_size, so double it
    if not isinstance(inter, int) or isinstance(inter, bool):
        raise InputError(f"config.json: molmoe config needs intermediate_size (one expert's width), got {inter!r}")
    out["mlp_hidden_size"] = 2 * inter
    out["moe_num_experts"] = _first(config, "num_experts", "moe_num_experts", default=HF_DEFAULT_EXPERTS)
    out["moe_top_k"] = _first(config, "num_experts_per_tok", "moe_top_k", default=HF_DEFAULT_TOP_K)
    out["layer_norm_eps"] = _first(config, "layer_norm_eps", "rms_norm_eps", default=1e-5)
    out["include_bias"] = bool(_first(config, "include_bias", default=False))
    out["qkv_bias"] = bool(_first(config, "qkv_bias", "attention_bias", default=False))
    out["weight_tying"] = bool(_first(config, "weight_tying", "tie_word_embeddings", default=False))
    if config.get("norm_topk_prob"):
        raise InputError("config.json: molmoe norm_topk_prob true is not supported (MolmoE-1B renormalises nothing)")
    if config.get("additional_vocab_size") is None:
        new = (tensors or {}).get(ROOT + "wte.new_embedding")
        out["additional_vocab_size"] = int(new[0][0]) if new is not None else 0
    return out


def geometry(config: dict, where: Path | str = "config.json") -> dict:
    """MolmoE's LM sizes from its config.json, either dialect (see the module docstring for sources)."""
    config = normalise(config)
    try:
        d, heads, layers = int(config["d_model"]), int(config["n_heads"]), int(config["n_layers"])
        experts, top_k = int(config["moe_num_experts"]), int(config["moe_top_k"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: molmo config without a valid {exc.args[0] if exc.args else 'size'} field") from None
    hidden = _get(config, "mlp_hidden_size") or int(_get(config, "mlp_ratio", 4)) * d
    kv_heads = int(_get(config, "n_kv_heads", heads))
    if experts < 1 or heads < 1 or d % heads or heads % kv_heads or int(hidden) % 2:
        raise InputError(f"{where}: molmo sizes inconsistent (d_model {d}, n_heads {heads}, n_kv_heads {kv_heads}, "
                         f"expert hidden {hidden}, moe_num_experts {experts})")
    if _get(config, "clip_qkv") is not None:
        raise InputError(f"{where}: molmo clip_qkv is not supported (MolmoE-1B has none)")
    if _get(config, "block_type", "moe") != "moe" or _get(config, "moe_shared_expert", False):
        raise InputError(f"{where}: only MoE blocks without a shared expert are supported (MolmoE-1B)")
    embed = int(_get(config, "embedding_size", config.get("vocab_size")))
    extra = int(_get(config, "additional_vocab_size", 0))
    return dict(d=d, heads=heads, kv_heads=kv_heads, layers=layers, experts=experts, top_k=top_k,
                inter=int(hidden) // 2, embed=embed, extra=extra, tied=bool(_get(config, "weight_tying", False)),
                interleaved=_get(config, "rope_impl", None))


def olmoe_config(config: dict, where: Path | str = "config.json"):
    from transformers import OlmoeConfig

    config = normalise(config)
    g = geometry(config, where)
    return OlmoeConfig(vocab_size=g["embed"] + g["extra"], hidden_size=g["d"], intermediate_size=g["inter"],
                       num_hidden_layers=g["layers"], num_attention_heads=g["heads"], num_key_value_heads=g["kv_heads"],
                       num_experts=g["experts"], num_experts_per_tok=g["top_k"], norm_topk_prob=False,
                       rms_norm_eps=float(_get(config, "layer_norm_eps", 1e-5)),
                       rope_theta=float(_get(config, "rope_theta", 10000.0)),
                       max_position_embeddings=int(_get(config, "max_position_embeddings",
                                                        _get(config, "max_sequence_length", 4096))),
                       attention_bias=bool(_get(config, "include_bias", False) or _get(config, "qkv_bias", False)),
                       tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
                       eos_token_id=_eos(config, g["embed"] + g["extra"]), clip_qkv=None)


def _eos(config: dict, vocab: int):
    eos = config.get("eos_token_id")
    return eos if isinstance(eos, int) and 0 <= eos < vocab else None


class MaskedHead(nn.Linear):
    """MolmoE's head: ``embedding_size`` real rows; the ``additional`` ids get the dtype minimum."""

    def __init__(self, d: int, real: int, extra: int):
        super().__init__(d, real, bias=False)
        self.extra = extra

    def forward(self, x):
        logits = super().forward(x)
        if not self.extra:
            return logits
        fill = logits.new_full((*logits.shape[:-1], self.extra), torch.finfo(logits.dtype).min)
        return torch.cat([logits, fill], -1)


class MolmoeText(TextOnlyWrapper):
    """``language`` (transformers' OLMoE LM), ``model.vision_backbone`` when the checkpoint has one."""

    def __init__(self, lang_config, embed: int, extra: int, frozen: dict, vision: VisionGeometry | None = None):
        super().__init__()
        from transformers import OlmoeForCausalLM

        lang_config._attn_implementation = "eager"  # double backward (Hessian-vector products) fails through CPU SDPA
        self.language = OlmoeForCausalLM(lang_config)
        self.language.lm_head = MaskedHead(lang_config.hidden_size, embed, extra)
        if vision is not None:
            self.model = nn.Module()
            self.model.vision_backbone = MolmoVisionBackbone(vision)
        attach_frozen(self, frozen)
        self.config = lang_config

    def forward(self, input_ids=None, images=None, image_masks=None, image_input_idx=None, **kwargs):
        """Logits; with ``images`` ``[B, T, G*G, P*P*3]`` the image features are added at ``image_input_idx``."""
        if input_ids is None:
            return self.language(**kwargs)
        input_ids = _padding(input_ids, kwargs)
        if images is None:
            return self.language(input_ids=input_ids, **kwargs)
        return self.language(inputs_embeds=self.image_embeddings(input_ids, images, image_masks, image_input_idx),
                             **kwargs)

    def generate(self, input_ids=None, images=None, image_masks=None, image_input_idx=None, **kwargs):
        if images is None:
            return self.language.generate(input_ids, **kwargs)
        embeds = self.image_embeddings(input_ids, images, image_masks, image_input_idx)
        return self.language.generate(input_ids=input_ids, inputs_embeds=embeds, **kwargs)

    def image_embeddings(self, input_ids, images, image_masks, image_input_idx) -> torch.Tensor:
        """``wte(input_ids)`` ``[B, L, d]`` plus the vision backbone's features at ``image_input_idx``."""
        vision = getattr(getattr(self, "model", None), "vision_backbone", None)
        if not isinstance(vision, MolmoVisionBackbone):
            raise InputError("images: this MolmoE checkpoint has no model.vision_backbone.* tensors; run it text-only")
        if image_masks is None or image_input_idx is None:
            raise InputError("images: image_masks and image_input_idx are required with images (molmo_image_inputs)")
        features = vision(images, image_masks)  # [B, T, (G/2)^2, d]
        if tuple(image_input_idx.shape) != tuple(features.shape[:3]):
            raise InputError(f"image_input_idx: shape {tuple(image_input_idx.shape)}, expected "
                             f"{tuple(features.shape[:3])} (batch, crops, pooled features per crop)")
        embeds = self.language.get_input_embeddings()(input_ids.clamp(min=0))
        return add_image_features(embeds, features, image_input_idx)


def _padding(input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Id -1 is padding (``MolmoModel.forward``): embed id 0, mask it, count positions over real tokens."""
    pad = input_ids == -1
    if not bool(pad.any()):
        return input_ids
    keep = (~pad).long()
    kwargs.setdefault("attention_mask", keep)
    kwargs.setdefault("position_ids", (keep.cumsum(-1) - 1).clamp(min=0))
    return input_ids.masked_fill(pad, 0)


def layout(keys) -> str:
    """``megablocks`` (stacked ``ffn.experts.mlp.w1``) or ``hf`` (``mlp.experts.{j}.gate_proj.weight``)."""
    if any(k.startswith(BLOCKS) and ".ffn." in k for k in keys):  # stacks, or the router left in an artifact
        return "megablocks"
    return "hf"


def interleave_perm(head_dim: int) -> torch.Tensor:
    """Row order that turns interleaved-pair RoPE (``cockatoo``) into rotate-half RoPE within one head."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


EMBED = "language.model.embed_tokens.weight"
BLOCK_KEY = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(.+)$")
ATTN = {"att_proj.weight", "att_proj.bias", "attn_out.weight", "attn_out.bias", "attn_norm.weight",
        "q_norm.weight", "k_norm.weight"}


class MolmoeAdapter(LanguageAdapter):
    """MolmoE: OLMoE blocks under ``language.model.layers``; text or image+text forward; no shared experts."""

    family = "molmo"
    image_keys = ("images", "image_masks", "image_input_idx")
    shared_attr = None
    takes_images = True

    # --- inputs ----------------------------------------------------------------------------------
    @classmethod
    def image_batches(cls, folder, config: dict, tokenizer, directory, batch: int) -> list[dict]:
        from ..profiler.calibration import molmo_batches

        if directory is None:
            raise InputError(f"{folder}: MolmoE image calibration needs the model directory (its vision geometry)")
        return molmo_batches(folder, config, tokenizer, Path(directory))

    def image_inputs(self, config: dict, tokenizer, prompt: str, image) -> dict:
        """BOS, the image tokens, `` User: {prompt} Assistant:`` (``mopeq.vlm.molmo_inputs``)."""
        from ..vlm import molmo_inputs

        vision = getattr(getattr(self.model, "model", None), "vision_backbone", None)
        if vision is None:
            raise InputError(f"images: {self.source_dir} has no model.vision_backbone.* tensors (runs text only)")
        # the normalised config of the build (e.g. additional_vocab_size from the tensors)
        return molmo_inputs(self.model.source_config, vision.geometry, tokenizer, image, f" User: {prompt} Assistant:")

    def unbuilt_params(self) -> int:
        """Without checkpoint tensors (a config alone) the vision backbone is not built: the remote code's default."""
        if hasattr(self.model, "model"):
            return 0
        from .molmo_vision import default_geometry, param_count

        return param_count(default_geometry(self.language_config().hidden_size))

    # --- disk ------------------------------------------------------------------------------------
    def layer_disk_prefix(self, layer: int) -> str:
        return f"{BLOCKS}.{layer}.mlp"

    def disk_tensors(self, ref: ExpertRef, keys: set[str]) -> dict[str, DiskTensor]:
        if layout(keys) == "megablocks":
            stack = f"{BLOCKS}.{ref.layer}.ffn.experts.mlp"
            inter = self.experts_module(ref.layer).down_proj.shape[-1]
            return megablocks(f"{stack}.w1", f"{stack}.v1", f"{stack}.w2", ref.expert, inter)
        prefix = f"{self.layer_disk_prefix(ref.layer)}.experts.{ref.expert}"
        return {m: DiskTensor(f"{prefix}.{m}_proj.weight") for m in ("gate", "up", "down")}

    # packed_name: the base's ``model.transformer.blocks.{i}.mlp.experts.{j}.{m}_proj`` (HF remote-code names).

    def memory_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_memory(tensors, self.model.language.config, self._rope_interleaved(tensors))

    def memory_key(self, key: str) -> str:
        """Under which module a disk tensor lands (``to_memory`` splits and stacks them: the module, not the exact
        tensor, for a block's tensors)."""
        match = BLOCK_KEY.match(key)
        if match is not None:
            return f"language.model.layers.{match[1]}.{match[2]}"
        return {ROOT + "ff_out.weight": "language.lm_head.weight", "lm_head.weight": "language.lm_head.weight",
                ROOT + "ln_f.weight": "language.model.norm.weight", ROOT + "wte.embedding": EMBED,
                ROOT + "wte.new_embedding": EMBED}.get(key) or vision_memory_key(key)

    def _rope_interleaved(self, tensors) -> bool:
        impl = getattr(self.model, "rope_impl", None)
        if impl is None:  # remote code defaults to cockatoo; OLMo's own model.py is rotate-half
            impl = "llama" if layout(tensors) == "megablocks" else "cockatoo"
        return impl == "cockatoo"

    # --- building --------------------------------------------------------------------------------
    @classmethod
    def build_model(cls, config: dict, where, dtype: torch.dtype | None = None) -> nn.Module:
        where = Path(where)
        tensors = header(where) if where.is_dir() else {}
        config = normalise(config, tensors)
        g = geometry(config, where / "config.json")
        _check_experts(g, tensors, where / "config.json")
        vision = vision_geometry(config, tensors, g["d"], where)
        frozen = {k: v for k, v in tensors.items() if not k.startswith(LM_KEYS) and not k.startswith(VISION)}
        model = MolmoeText(olmoe_config(config, where / "config.json"), g["embed"], g["extra"], frozen, vision)
        model.rope_impl = g["interleaved"]
        model.tied = g["tied"]
        model.source_config = config  # normalised: e.g. additional_vocab_size filled from the checkpoint
        return model

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype) -> nn.Module:
        directory = Path(directory)
        model = cls.build_model(config, directory)
        adapter = cls(model)
        state = adapter.memory_tensors(read_state(directory))
        return load_into(model, state, directory).to(dtype)


def _check_experts(g: dict, tensors: dict, where: Path) -> None:
    """The router rows on disk must equal the configured expert count (HF-style configs default it to 64)."""
    for name in (f"{BLOCKS}.0.mlp.gate.weight", f"{BLOCKS}.0.ffn.router.layer.weight"):
        if name in tensors and tensors[name][0][0] != g["experts"]:
            raise InputError(f"{where}: {g['experts']} experts configured (HF-style MolmoE defaults to "
                             f"{HF_DEFAULT_EXPERTS} when num_experts is absent) but {name} has "
                             f"{tensors[name][0][0]} rows")


def to_memory(tensors: dict[str, torch.Tensor], cfg, interleaved: bool) -> dict[str, torch.Tensor]:
    """MolmoE disk tensors (either layout) -> ``MolmoeText`` state dict names and shapes."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim, kv = d // heads, cfg.num_key_value_heads * (d // heads)
    perm_q = perm_k = None
    if interleaved:
        one = interleave_perm(head_dim)
        perm_q = torch.cat([one + h * head_dim for h in range(heads)])
        perm_k = torch.cat([one + h * head_dim for h in range(cfg.num_key_value_heads)])
    stacks: dict[int, dict[str, torch.Tensor]] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    out, lm = {}, "language.model"
    for key, value in tensors.items():
        if key == ROOT + "wte.embedding" or key == ROOT + "wte.new_embedding":
            continue
        if key in (ROOT + "ff_out.weight", "lm_head.weight"):
            out["language.lm_head.weight"] = value
            continue
        if key == ROOT + "ln_f.weight":
            out[f"{lm}.norm.weight"] = value
            continue
        match = BLOCK_KEY.match(key)
        if match is None:
            out[vision_memory_key(key)] = value  # vision backbone: its module's name (ViT resblocks renamed)
            continue
        i, rest = int(match[1]), match[2]
        rest = rest.removeprefix("attn.") if rest.removeprefix("attn.") in ATTN else rest
        p = f"{lm}.layers.{i}"
        if rest in ("att_proj.weight", "att_proj.bias"):
            q, k, v = value.split([d, kv, kv], 0)
            if perm_q is not None:
                q, k = q[perm_q], k[perm_k]
            kind = rest.split(".")[1]
            out[f"{p}.self_attn.q_proj.{kind}"], out[f"{p}.self_attn.k_proj.{kind}"] = q, k
            out[f"{p}.self_attn.v_proj.{kind}"] = v
        elif rest in ("attn_out.weight", "attn_out.bias"):
            out[f"{p}.self_attn.o_proj.{rest.split('.')[1]}"] = value
        elif rest in ("q_norm.weight", "k_norm.weight"):
            perm = perm_q if rest[0] == "q" else perm_k
            out[f"{p}.self_attn.{rest}"] = value if perm is None else value[perm]
        elif rest == "attn_norm.weight":
            out[f"{p}.input_layernorm.weight"] = value
        elif rest in ("ff_norm.weight", "mlp.ff_norm.weight"):
            out[f"{p}.post_attention_layernorm.weight"] = value
        elif rest in ("ffn.router.layer.weight", "mlp.gate.weight"):
            out[f"{p}.mlp.gate.weight"] = value
        elif rest.startswith("ffn.experts.mlp."):
            stacks.setdefault(i, {})[rest.rsplit(".", 1)[1]] = value
        elif (m := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest)):
            experts.setdefault(i, {}).setdefault(int(m[1]), {})[m[2]] = value
        else:
            raise InputError(f"checkpoint: tensor {key} is not part of a MolmoE block")
    _embeddings(tensors, out, lm)
    for i, s in stacks.items():
        if set(s) != {"w1", "v1", "w2"}:
            raise InputError(f"checkpoint: layer {i} stacked experts need w1, v1 and w2 (found {sorted(s)})")
        e = cfg.num_experts
        gate, up = s["w1"].reshape(e, -1, d), s["v1"].reshape(e, -1, d)  # [E, I, d]: rows j*I:(j+1)*I
        out[f"{lm}.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], 1)
        out[f"{lm}.layers.{i}.mlp.experts.down_proj"] = s["w2"].reshape(e, -1, d).transpose(1, 2).contiguous()
    for i, per in experts.items():
        order = [per[j] for j in range(len(per))]
        out[f"{lm}.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in order])
        out[f"{lm}.layers.{i}.mlp.experts.down_proj"] = torch.stack([x["down"] for x in order])
    return out


def _embeddings(tensors: dict, out: dict, lm: str) -> None:
    base, new = tensors.get(ROOT + "wte.embedding"), tensors.get(ROOT + "wte.new_embedding")
    if base is None:
        return
    out[f"{lm}.embed_tokens.weight"] = base if new is None else torch.cat([base, new])
    out.setdefault("language.lm_head.weight", base)  # weight_tying: the head is wte.embedding
