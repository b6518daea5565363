"""DeepSeek-VL2 (tiny / small / base): a DeepSeek-V2 MoE language model behind a SigLIP encoder.

What the public checkpoints hold (from the public ``modeling_deepseek_vl_v2.py``/``config.json`` as
best known here, without network access; verify against a real download):

* ``config.json``: ``model_type: deepseek_vl_v2`` with ``language_config`` (a DeepSeek-V2 config:
  ``hidden_size``, ``moe_intermediate_size``, ``n_routed_experts``, ``num_experts_per_tok``,
  ``n_shared_experts``, ``first_k_dense_replace``, ``kv_lora_rank``, ``use_mla``, ``topk_method``, ...),
  ``vision_config`` (SigLIP ViT built through timm) and ``projector_config`` (``downsample_mlp_gelu``).
* safetensors, one tensor per expert: ``language.model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``,
  shared experts ``language.model.layers.{i}.mlp.shared_experts.*``, router ``...mlp.gate.weight``;
  ``vision.*``, ``projector.*``, ``image_newline``, ``view_seperator`` at the top level.

mopeq rebuilds the **language model** from transformers' ``DeepseekV2ForCausalLM`` (``DeepseekV3`` when
``topk_method == "noaux_tc"``) under ``language.``, so profile/compile/run need no remote code. The
vision encoder and projector are **not rebuilt** (timm is not a dependency): their tensors are kept
as frozen parameters under their checkpoint names, never quantized, and copied through the compiler
byte for byte. Running and calibration are text-only (``input_ids`` through the language model).
``use_mla: false`` (the tiny model) replaces DeepSeek-V2's compressed-KV attention with plain
multi-head attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, rotate-half RoPE over the head).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..schemas import InputError
from .base import MoEAdapter
from .checkpoint import attach_frozen, fuse_experts, header, load_into, read_state

LANGUAGE = "language."
# DeepSeek-VL2 config keys that transformers' DeepseekV2Config does not take (or that we set ourselves).
DROP_KEYS = {"architectures", "model_type", "auto_map", "torch_dtype", "transformers_version", "_name_or_path",
             "use_mla", "lm_head", "rm_head", "ep_size", "aux_loss_alpha", "seq_aux", "moe_layer_freq"}


def language_config(config: dict, where: Path):
    """A transformers DeepseekV2/V3 config from ``config["language_config"]``."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    lang = config.get("language_config")
    if not isinstance(lang, dict):
        raise InputError(f"{where / 'config.json'}: deepseek_vl_v2 without a 'language_config' object")
    clean = {k: v for k, v in lang.items() if k not in DROP_KEYS}
    if not lang.get("use_mla", True):  # plain MHA: one rope dim per head, MLA parts unused (kept tiny)
        head_dim = lang["hidden_size"] // lang["num_attention_heads"]
        clean.update(kv_lora_rank=1, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=head_dim, v_head_dim=head_dim)
    cls = DeepseekV3Config if lang.get("topk_method") == "noaux_tc" else DeepseekV2Config
    return cls(**clean)


class MultiHeadAttention(nn.Module):
    """DeepSeek-VL2-tiny attention (``use_mla: false``): q/k/v/o projections, RoPE over the full head."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        kv = config.num_key_value_heads * self.head_dim
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import eager_attention_forward

        b, t = hidden_states.shape[:-1]
        q, k, v = (proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate_half_rope(q, k, position_embeddings)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        kwargs.pop("past_key_values", None)
        out, weights = eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(b, t, -1)), weights


def rotate_half_rope(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor):
    """Llama-style RoPE from DeepSeek-V2's complex ``freqs_cis`` ``[B, T, D/2]``: ``x*cos + rotate_half(x)*sin``."""
    cos = torch.cat([freqs_cis.real, freqs_cis.real], -1).unsqueeze(1).to(q.dtype)
    sin = torch.cat([freqs_cis.imag, freqs_cis.imag], -1).unsqueeze(1).to(q.dtype)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], -1)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


class DeepseekVL2Text(nn.Module):
    """``language`` (a runnable DeepSeek-V2 LM) plus frozen ``vision``/``projector`` tensors."""

    def __init__(self, lang_config, frozen: dict, use_mla: bool = True):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.language = AutoModelForCausalLM.from_config(lang_config, attn_implementation="eager")
        if not use_mla:
            for i, layer in enumerate(self.language.model.layers):
                layer.self_attn = MultiHeadAttention(lang_config, i)
        attach_frozen(self, frozen)
        self.config = lang_config

    def forward(self, input_ids=None, **kwargs):
        return self.language(input_ids=input_ids, **kwargs)

    def generate(self, *args, **kwargs):
        return self.language.generate(*args, **kwargs)


class DeepseekVL2Adapter(MoEAdapter):
    """DeepSeek-VL2: DeepSeek-V2 MoE blocks under ``language.model.layers``; text-only forward."""

    family = "deepseek_vl_v2"
    disk_prefix = "language.model.layers"

    def decoder_layers(self):
        return self.model.language.model.layers

    def language_config(self):
        return self.model.language.config

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], use_cache=False).logits

    @classmethod
    def build_model(cls, config: dict, where) -> nn.Module:
        where = Path(where)
        frozen = {k: v for k, v in header(where).items() if not k.startswith(LANGUAGE)} if where.is_dir() else {}
        use_mla = bool(config.get("language_config", {}).get("use_mla", True))
        return DeepseekVL2Text(language_config(config, where), frozen, use_mla)

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype) -> nn.Module:
        model = cls.build_model(config, directory)
        state = fuse_experts(read_state(Path(directory)))
        return load_into(model, state, Path(directory)).to(dtype)
