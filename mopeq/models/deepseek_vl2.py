"""DeepSeek-VL2 (tiny / small / base): a DeepSeek-V2-style MoE language model behind a SigLIP encoder.

Checked against the public source (code-search index; no checkpoint download). "VL2" below is
deepseek-ai/DeepSeek-VL2; ``modeling_deepseek_vl_v2.py`` is not in its indexed files and was read from
the copy in FyrbyAdditive/DeepSeek-VL2 (same path; other forks hold it too).

1. config.json (FyrbyAdditive/DeepSeek-VL2, deepseek_vl2/models/modeling_deepseek_vl_v2.py:
   ``DeepseekVLV2Config``): ``model_type: deepseek_vl_v2``; ``vision_config`` (``VisionEncoderConfig``:
   model_name, image_size, patch_size, width, layers, heads, mlp_ratio, global_pool, ...),
   ``projector_config`` (``MlpProjectorConfig``: projector_type, input_dim, n_embed, depth, mlp_ratio,
   downsample_ratio, token_pooling), ``language_config`` (VL2's own ``DeepseekV2Config``), plus
   ``tile_tag`` ("2D" gives ``image_newline``/``view_seperator``), ``global_view_pos``,
   ``candidate_resolutions``. CONFIRMED.
2. Tensor names (same file, ``DeepseekVLV2ForCausalLM.__init__``): modules ``vision``
   (VisionTransformer), ``projector`` (``MlpProjector``, an ``nn.Sequential`` under ``layers``: Linear,
   GELU, Linear for downsample_mlp_gelu depth 2 -> ``projector.layers.0/2.*``), parameters
   ``image_newline``/``view_seperator`` (sic), ``language`` (VL2's ``DeepseekV2ForCausalLM``, so
   ``language.model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`` (one ``nn.Linear`` per expert,
   bias-free), ``...mlp.shared_experts.{gate,up,down}_proj.weight`` (one MLP of width
   ``moe_intermediate_size * n_shared_experts``), ``...mlp.gate.weight`` ``[E, H]``,
   ``...mlp.gate.e_score_correction_bias`` ``[E]`` only when ``topk_method == "noaux_tc"``, and
   ``language.lm_head.weight``). CONFIRMED from the module tree (deepseek-ai/DeepSeek-VL2,
   deepseek_vl2/models/modeling_deepseek.py: ``MoEGate``, ``DeepseekV2MoE``); not checked against a
   real safetensors index.
3. Language config and routing (deepseek-ai/DeepSeek-VL2, deepseek_vl2/models/configuration_deepseek.py and
   modeling_deepseek.py ``MoEGate``): fields n_routed_experts, num_experts_per_tok, moe_intermediate_size,
   n_shared_experts, first_k_dense_replace, moe_layer_freq, topk_method (greedy | group_limited_greedy |
   noaux_tc), scoring_func (softmax | sigmoid), norm_topk_prob, routed_scaling_factor, n_group,
   topk_group, use_mla, kv_lora_rank, q_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim.
   Defaults differ from transformers' (q_lora_rank 1536, num_hidden_layers 30, n_group/topk_group None,
   bos/eos 100000/100001): missing keys take VL2's defaults (``SOURCE_DEFAULTS``).
   CONTRADICTED (old mapping): transformers' ``DeepseekV2TopkRouter`` always uses softmax and ignores
   ``norm_topk_prob``/``scoring_func``; ``DeepseekV3TopkRouter`` always uses sigmoid + noaux_tc, fills
   masked groups with -inf (VL2: 0.0) and normalises even for top_k == 1. So mopeq now builds the
   language model as transformers' ``DeepseekV2ForCausalLM`` for every topk_method and replaces each
   MoE block's ``mlp.gate`` with :class:`SourceMoEGate`, a re-derivation of VL2's ``MoEGate`` (see its
   docstring); ``tests/models/test_deepseek_vl2.py`` checks it against a per-token reference.
   Attention: ``use_mla: false`` uses transformers' ``LlamaAttention`` in VL2 (q/k/v/o_proj, bias =
   ``attention_bias``, rotate-half RoPE over ``hidden_size // num_attention_heads``) = our
   :class:`MultiHeadAttention`. MLA: VL2 de-interleaves the rope dims then applies rotate-half;
   transformers' DeepseekV2 rotates interleaved pairs as complex numbers; q.k is identical.
   Not mapped (InputError): ``moe_layer_freq != 1``, ``n_shared_experts: null``, no routed experts.
   Not reproduced: VL2's training-time aux loss and expert parallelism (``ep_size``), irrelevant to
   inference; VL2 runs the router in float32 like we do.
4. Sizes: README (deepseek-ai/DeepSeek-VL2, README.md) gives 1.0B / 2.8B / 4.5B activated and
   3.37B / 16.1B / 27.5B total for tiny / small / base. The per-field values of the shipped configs
   (configs/deepseek-vl2*.json) were NOT found in any indexed source: unverified (see their notes).

mopeq rebuilds the whole model without remote code: the **language model** under ``language.`` (above)
and the **image path** (``deepseek_vl2_vision.py``: transformers' SigLIP encoder under ``vision.`` with a
key mapping from VL2's timm names, the downsampling MLP ``projector``, ``image_newline``/``view_seperator``
and VL2's tile layout). Only experts are planned; the encoder and projector stay unquantized and the
compiler copies their tensors byte for byte. A checkpoint without any ``vision.*`` tensor (a language-only
extract) runs text-only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..schemas import InputError
from .base import LanguageAdapter, check_sizes
from .checkpoint import TextOnlyWrapper, attach_frozen, fuse_experts, header, load_into, read_state
from .deepseek_vl2_vision import (build_vision, check_checkpoint, encode, image_embeds, vision_settings,
                                  vision_to_memory)

LANGUAGE = "language."
# DeepSeek-VL2 config keys that transformers' DeepseekV2Config does not take (or that we set ourselves).
DROP_KEYS = {"architectures", "model_type", "auto_map", "torch_dtype", "transformers_version", "_name_or_path",
             "use_mla", "lm_head", "rm_head", "ep_size", "aux_loss_alpha", "seq_aux", "moe_layer_freq"}
# Defaults of the public ``DeepseekV2Config.__init__`` (deepseek-ai/DeepSeek-VL2,
# deepseek_vl2/models/configuration_deepseek.py) where transformers' own defaults differ or matter for routing:
# a key missing from ``language_config`` must mean what it means to the public code.
SOURCE_DEFAULTS = {"num_hidden_layers": 30, "num_attention_heads": 32, "kv_lora_rank": 512, "q_lora_rank": 1536,
                   "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
                   "n_group": None, "topk_group": None, "first_k_dense_replace": 0, "norm_topk_prob": False,
                   "scoring_func": "softmax", "routed_scaling_factor": 1.0, "moe_layer_freq": 1,
                   "bos_token_id": 100000, "eos_token_id": 100001}
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# Compressed-KV sizes a plain-attention checkpoint leaves null / 0 (deepseek-vl2-tiny: use_mla false,
# kv_lora_rank null, qk/v head dims 0): legal there, and only there.
MLA_SIZES = frozenset({"kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"})
MLA_NOTE = " (null or 0 is allowed only with language_config.use_mla false, as in deepseek-vl2-tiny)"


def language_config(config: dict, where: Path):
    """transformers' ``DeepseekV2Config`` from ``config["language_config"]`` (routing settings kept on it for
    :class:`SourceMoEGate`, which replaces transformers' router; see the module docstring)."""
    from transformers import DeepseekV2Config

    lang = config.get("language_config")
    if not isinstance(lang, dict):
        raise InputError(f"{where / 'config.json'}: deepseek_vl_v2 without a 'language_config' object")
    where, lang = Path(where), {**SOURCE_DEFAULTS, **lang}
    bad = _unsupported(lang)
    if bad:
        raise InputError(f"{where / 'config.json'}: language_config {bad}")
    clean = {k: v for k, v in lang.items() if k not in DROP_KEYS}
    if not lang.get("use_mla", True):  # plain MHA: one rope dim per head, MLA parts unused (kept tiny)
        head_dim = lang["hidden_size"] // lang["num_attention_heads"]
        clean.update(kv_lora_rank=1, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=head_dim, v_head_dim=head_dim)
    return DeepseekV2Config(**clean)


def _unsupported(lang: dict) -> str | None:
    """Why the public model cannot be rebuilt from transformers' DeepseekV2 parts (None when it can)."""
    if not lang.get("n_routed_experts") or not lang.get("num_experts_per_tok"):
        return "has no routed experts (n_routed_experts/num_experts_per_tok unset): a dense model, not an MoE"
    if lang.get("n_shared_experts") is None:
        return "n_shared_experts is null (no shared experts); transformers' DeepseekV2 always builds them"
    if lang["moe_layer_freq"] != 1:
        return f"moe_layer_freq={lang['moe_layer_freq']}; only 1 (every layer after first_k_dense_replace) is supported"
    if lang["topk_method"] not in TOPK_METHODS:
        return f"topk_method={lang['topk_method']!r}; expected one of {TOPK_METHODS}"
    if lang["scoring_func"] not in ("softmax", "sigmoid"):
        return f"scoring_func={lang['scoring_func']!r}; expected softmax or sigmoid"
    if lang["topk_method"] != "greedy":
        n_group, topk_group = lang.get("n_group"), lang.get("topk_group")
        if not n_group or not topk_group or lang["n_routed_experts"] % n_group:
            return (f"topk_method={lang['topk_method']!r} needs n_group dividing n_routed_experts and topk_group "
                    f"(got n_group={n_group}, topk_group={topk_group})")
        if lang["topk_method"] == "noaux_tc" and lang["n_routed_experts"] // n_group < 2:
            return "noaux_tc scores each group by its top-2 experts: needs >= 2 experts per group"
    return None


class SourceMoEGate(nn.Module):
    """The router of the public ``MoEGate`` (deepseek-ai/DeepSeek-VL2, deepseek_vl2/models/modeling_deepseek.py),
    with transformers' router interface: ``forward(h) -> (router_logits, topk_weights, topk_indices)``.

    * scores: ``softmax`` or ``sigmoid`` of float32 logits (``scoring_func``);
    * ``greedy``: top-k of the scores; ``group_limited_greedy``: keep the ``topk_group`` groups with the highest
      per-group max score (others filled with 0.0), then top-k; ``noaux_tc``: choose on ``scores +
      e_score_correction_bias``, groups ranked by the sum of their top-2 biased scores (others filled with
      0.0), weights gathered from the *unbiased* scores;
    * ``norm_topk_prob`` (only when top_k > 1): weights / (sum + 1e-20); then ``* routed_scaling_factor``
      in every case.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.scoring_func = getattr(config, "scoring_func", "softmax")
        self.topk_method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":  # a checkpoint tensor of its own (``mlp.gate.e_score_correction_bias``)
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = nn.functional.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        if self.topk_method == "greedy":
            weights, indices = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        else:
            choice = scores + self.e_score_correction_bias.float() if self.topk_method == "noaux_tc" else scores
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.topk_method == "noaux_tc" \
                else grouped.max(dim=-1).values
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, 1.0)
            keep = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
            weights, indices = torch.topk(choice.masked_fill(~keep, 0.0), self.top_k, dim=-1, sorted=False)
            if self.topk_method == "noaux_tc":
                weights = scores.gather(1, indices)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * self.routed_scaling_factor, indices


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


class DeepseekVL2Text(TextOnlyWrapper):
    """``language`` (a runnable DeepSeek-V2 LM), and when ``vision`` settings are given the image path
    (``vision``, ``projector``, ``image_newline``, ``view_seperator``); ``frozen`` tensors ride along unused."""

    def __init__(self, lang_config, frozen: dict, use_mla: bool = True, vision: tuple[dict, dict] | None = None,
                 global_view_pos: str = "head"):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.language = AutoModelForCausalLM.from_config(lang_config, attn_implementation="eager")
        for i, layer in enumerate(self.language.model.layers):
            if not use_mla:
                layer.self_attn = MultiHeadAttention(lang_config, i)
            if hasattr(layer.mlp, "gate"):  # transformers' router -> the public MoEGate's routing
                layer.mlp.gate = SourceMoEGate(lang_config)
        self.has_vision = vision is not None
        if vision is not None:
            build_vision(self, *vision)
        self.global_view_pos = global_view_pos
        attach_frozen(self, frozen)
        self.config = lang_config

    def forward(self, input_ids=None, images=None, images_seq_mask=None, images_spatial_crop=None, **kwargs):
        if images is None or images_spatial_crop is None:
            return self.language(input_ids=input_ids, **kwargs)
        return self.language(inputs_embeds=self.image_embeddings(input_ids, images, images_seq_mask,
                                                                 images_spatial_crop), **kwargs)

    def generate(self, input_ids=None, images=None, images_seq_mask=None, images_spatial_crop=None, **kwargs):
        if images is None or images_spatial_crop is None:
            return self.language.generate(input_ids, **kwargs)
        embeds = self.image_embeddings(input_ids, images, images_seq_mask, images_spatial_crop)
        return self.language.generate(input_ids=input_ids, inputs_embeds=embeds, **kwargs)

    def image_embeddings(self, input_ids, images, images_seq_mask, images_spatial_crop) -> torch.Tensor:
        """Text embeddings with the image features in their ``<image>`` slots (VL2's ``prepare_inputs_embeds``)."""
        if not self.has_vision:
            raise InputError("images: this checkpoint has no vision.* tensors (a language-only DeepSeek-VL2)")
        return image_embeds(self, input_ids, images, images_seq_mask, images_spatial_crop, self.global_view_pos)


class DeepseekVL2Adapter(LanguageAdapter):
    """DeepSeek-VL2: DeepSeek-V2 MoE blocks under ``language.model.layers``; text-only forward."""

    family = "deepseek_vl_v2"
    image_keys = ("images", "images_seq_mask", "images_spatial_crop")
    takes_images = True

    @classmethod
    def image_batches(cls, folder, config: dict, tokenizer, directory, batch: int) -> list[dict]:
        from ..profiler.calibration import vl2_batches

        return vl2_batches(folder, config, tokenizer)

    def image_inputs(self, config: dict, tokenizer, prompt: str, image) -> dict:
        return encode(f"<image>\n{prompt}", [image], tokenizer, config)

    @classmethod
    def check_config(cls, config: dict, where) -> None:
        lang = config.get("language_config")
        mha = isinstance(lang, dict) and lang.get("use_mla") is False
        legal = MLA_SIZES if mha else frozenset()
        check_sizes(config, where, null_ok=legal, zero_ok=legal, notes={} if mha else dict.fromkeys(MLA_SIZES, MLA_NOTE))

    @classmethod
    def build_model(cls, config: dict, where, dtype: torch.dtype | None = None) -> nn.Module:
        where = Path(where)
        tensors = header(where) if where.is_dir() else {}
        use_mla = bool(config.get("language_config", {}).get("use_mla", True))
        # the image path when the checkpoint has one (with no checkpoint, e.g. estimates: when the config has one)
        with_vision = any(k.startswith("vision.") for k in tensors) if tensors else "vision_config" in config
        vision = vision_settings(config, where) if with_vision else None
        if vision is not None and tensors:
            check_checkpoint(tensors, *vision, where)
        model = DeepseekVL2Text(language_config(config, where), {}, use_mla, vision, config.get("global_view_pos", "head"))
        built = set(model.state_dict())
        frozen = {k: v for k, v in vision_to_memory(tensors).items() if not k.startswith(LANGUAGE) and k not in built}
        attach_frozen(model, frozen)
        return model

    def memory_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return vision_to_memory(fuse_experts(tensors))

    @classmethod
    def load_model(cls, directory, config: dict, dtype: torch.dtype) -> nn.Module:
        model = cls.build_model(config, directory)
        state = cls(model).memory_tensors(read_state(Path(directory)))
        return load_into(model, state, Path(directory)).to(dtype)

