"""Tiny checkpoints (a few hundred KB) in each family's exact on-disk layout, with a character tokenizer.

transformers families: the real config class at tiny sizes, ``save_pretrained`` (which writes the
family's own on-disk names), plus variants for layouts that hub checkpoints use and
``save_pretrained`` does not (Qwen3-VL-MoE transposed fused experts). DeepSeek-VL2: a
``deepseek_vl_v2`` config.json and safetensors with the public key names (``language.*`` with one
tensor per expert, ``vision.*``, ``projector.*``, ``image_newline``, ``view_seperator``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

VOCAB = 64
CHARS = string.ascii_lowercase + string.digits + " .,;:!?'-()\n"
TEXT = "the quick brown fox jumps over the lazy dog. " * 40
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)

# family -> (model_type, config kwargs); every family: 4 routed experts, top-2, I = 16 (H = 32).
FAMILIES = {
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16)),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16)),
    "deepseek_v2": ("deepseek_v2", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                        n_shared_experts=1, first_k_dense_replace=1, **MLA)),
    "deepseek_v3": ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, **MLA)),
    "phimoe": ("phimoe", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16)),  # generic detector
}
# I = 24 so that the transposed hub layout [E, H, 2I] is not square (square shapes are ambiguous).
QWEN3_VL_TEXT = dict(COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
QWEN3_VL_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=1, num_position_embeddings=16,
                       deepstack_visual_indexes=[0])
VL2_LANGUAGE = dict(COMMON, model_type="deepseek_v2", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
                    use_mla=True, **MLA)


def save_tokenizer(directory: Path, extra_tokens: tuple[str, ...] = ()) -> None:
    """A character-level WordLevel tokenizer over ``CHARS`` (ids 3..), wrapped as PreTrainedTokenizerFast;
    ``extra_tokens`` (e.g. DeepSeek-VL2's ``<image>``) are added as special tokens after them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
        assert len(fast) <= VOCAB
    fast.save_pretrained(directory)


def build_transformers(family: str, directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **extra}))
    _randomize_routers(model)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def build_qwen3_vl(directory: Path, hub_layout: bool) -> Path:
    """Qwen3-VL-MoE; ``hub_layout`` rewrites the fused experts transposed, as hub checkpoints store them."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_vl_moe", text_config=QWEN3_VL_TEXT, vision_config=QWEN3_VL_VISION,
                               tie_word_embeddings=False)
    model = AutoModelForImageTextToText.from_config(cfg)
    _randomize_routers(model)
    model.save_pretrained(directory)
    if hub_layout:
        path = directory / "model.safetensors"
        state = load_file(str(path))
        state = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in state.items()}
        save_file(state, str(path), metadata={"format": "pt"})
    save_tokenizer(directory)
    return directory


def build_deepseek_vl2(directory: Path, use_mla: bool = True, config: dict | None = None) -> Path:
    """DeepSeek-VL2 layout: ``language.`` + per-expert tensors, plus vision/projector tensors kept as-is.
    ``config``: a whole ``deepseek_vl_v2`` config.json (e.g. a published one shrunk) instead of the fixture's."""
    from mopeq.models.deepseek_vl2 import language_config

    torch.manual_seed(0)
    if config is None:
        config = {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekVLV2ForCausalLM"],
                  "language_config": dict(VL2_LANGUAGE, use_mla=use_mla), "vision_config": dict(VL2_VISION),
                  "projector_config": dict(VL2_PROJECTOR), "tile_tag": "2D", "global_view_pos": "head",
                  "candidate_resolutions": VL2_RESOLUTIONS}
    lang = config["language_config"]
    use_mla = lang.get("use_mla", True)
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM(language_config(config, directory))
    _randomize_routers(model)
    state = {f"language.{k}": v for k, v in _split_experts(model.state_dict()).items()}
    if not use_mla:
        state = {k: v for k, v in state.items() if ".self_attn." not in k}
        gen, h = torch.Generator().manual_seed(1), lang["hidden_size"]
        for i in range(lang["num_hidden_layers"]):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"language.model.layers.{i}.self_attn.{p}.weight"] = torch.randn(h, h, generator=gen) * 0.1
    if lang.get("topk_method") == "noaux_tc":  # the public router's per-expert score bias
        gen = torch.Generator().manual_seed(4)
        for i in range(lang.get("first_k_dense_replace", 0), lang["num_hidden_layers"]):
            state[f"language.model.layers.{i}.mlp.gate.e_score_correction_bias"] = \
                torch.randn(lang["n_routed_experts"], generator=gen) * 0.1
    state.update(vl2_vision_weights(vision=config["vision_config"], projector=config["projector_config"]))
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_tokenizer(directory, extra_tokens=("<image>",))
    return directory


# Tiny SigLIP (timm names, as VL2's checkpoints store it): 16 px tiles of 4 px patches (a 4x4 grid), width 16,
# 2 blocks, 2 heads, MLP 32; projector 2x2 downsampling to the LM width 32 (4 tokens per tile).
VL2_VISION = {"model_name": "siglip_tiny", "image_size": 16, "patch_size": 4, "width": 16, "layers": 2, "heads": 2,
              "mlp_ratio": 2.0, "global_pool": "map", "ignore_head": True, "class_token": False}
VL2_PROJECTOR = {"projector_type": "downsample_mlp_gelu", "input_dim": 16, "n_embed": 32, "depth": 2, "mlp_ratio": 1,
                 "downsample_ratio": 2}
VL2_RESOLUTIONS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def vl2_vision_weights(seed: int = 2, vision: dict = VL2_VISION, projector: dict = VL2_PROJECTOR) -> dict:
    """Every ``vision.*`` / ``projector.*`` tensor of VL2's image path (``attn_pool`` included, never run)."""
    gen = torch.Generator().manual_seed(seed)
    w, f, p = vision["width"], int(vision["width"] * vision["mlp_ratio"]), vision["patch_size"]
    n, d = (vision["image_size"] // p) ** 2, projector["n_embed"]
    r = lambda *s, scale=0.3: torch.randn(*s, generator=gen) * scale  # noqa: E731
    out = {"vision.patch_embed.proj.weight": r(w, 3, p, p), "vision.patch_embed.proj.bias": r(w),
           "vision.pos_embed": r(1, n, w), "vision.norm.weight": 1 + r(w, scale=0.1), "vision.norm.bias": r(w),
           "vision.attn_pool.latent": r(1, 1, w), "vision.attn_pool.q.weight": r(w, w), "vision.attn_pool.q.bias": r(w),
           "vision.attn_pool.kv.weight": r(2 * w, w), "vision.attn_pool.kv.bias": r(2 * w),
           "vision.attn_pool.proj.weight": r(w, w), "vision.attn_pool.proj.bias": r(w),
           "vision.attn_pool.norm.weight": 1 + r(w), "vision.attn_pool.norm.bias": r(w),
           "vision.attn_pool.mlp.fc1.weight": r(f, w), "vision.attn_pool.mlp.fc1.bias": r(f),
           "vision.attn_pool.mlp.fc2.weight": r(w, f), "vision.attn_pool.mlp.fc2.bias": r(w),
           "projector.layers.0.weight": r(d, 4 * w), "projector.layers.0.bias": r(d),
           "projector.layers.2.weight": r(d, d), "projector.layers.2.bias": r(d),
           "image_newline": r(d, scale=1.0), "view_seperator": r(d, scale=1.0)}
    for i in range(vision["layers"]):
        b = f"vision.blocks.{i}."
        out.update({b + "norm1.weight": 1 + r(w, scale=0.1), b + "norm1.bias": r(w), b + "attn.qkv.weight": r(3 * w, w),
                    b + "attn.qkv.bias": r(3 * w), b + "attn.proj.weight": r(w, w), b + "attn.proj.bias": r(w),
                    b + "norm2.weight": 1 + r(w, scale=0.1), b + "norm2.bias": r(w), b + "mlp.fc1.weight": r(f, w),
                    b + "mlp.fc1.bias": r(f), b + "mlp.fc2.weight": r(w, f), b + "mlp.fc2.bias": r(w)})
    return out


def _split_experts(state: dict) -> dict:
    """Fused ``experts.gate_up_proj``/``down_proj`` -> one ``experts.{j}.{gate,up,down}_proj.weight`` each."""
    out = {}
    for key, value in state.items():
        if key.endswith("experts.gate_up_proj"):
            prefix, inter = key[: -len("gate_up_proj")], value.shape[1] // 2
            for j, w in enumerate(value):
                out[f"{prefix}{j}.gate_proj.weight"], out[f"{prefix}{j}.up_proj.weight"] = w[:inter], w[inter:]
        elif key.endswith("experts.down_proj"):
            for j, w in enumerate(value):
                out[f"{key[: -len('down_proj')]}{j}.down_proj.weight"] = w
        else:
            out[key] = value
    return out


@torch.no_grad()
def _randomize_routers(model) -> None:
    """Routers initialise to zeros in some families; random routers make routing (and the test) real."""
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "mlp.router.weight")) and p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> directory, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {f: build_transformers(f, root / f) for f in FAMILIES}
    dirs["qwen3_vl_moe"] = build_qwen3_vl(root / "qwen3_vl_moe", hub_layout=False)
    dirs["qwen3_vl_moe_hub"] = build_qwen3_vl(root / "qwen3_vl_moe_hub", hub_layout=True)
    dirs["deepseek_vl2"] = build_deepseek_vl2(root / "deepseek_vl2", use_mla=True)
    dirs["deepseek_vl2_tiny_mha"] = build_deepseek_vl2(root / "deepseek_vl2_tiny_mha", use_mla=False)
    return dirs


# MolmoE (allenai/MolmoE-1B-0924): flattened OLMo ModelConfig keys; sizes tiny (d 32, 2 heads, 4 experts, I 16).
MOLMOE_CONFIG = {"model_type": "molmo", "architectures": ["MolmoForCausalLM"], "d_model": 32, "n_heads": 2,
                 "n_kv_heads": None, "n_layers": 2, "mlp_ratio": 1, "mlp_hidden_size": None, "block_type": "moe",
                 "activation_type": "swiglu", "moe_num_experts": 4, "moe_top_k": 2, "moe_shared_expert": False,
                 "moe_dropless": True, "moe_mlp_impl": "sparse", "vocab_size": 60, "embedding_size": VOCAB,
                 "additional_vocab_size": 8, "weight_tying": False, "rope": True, "rope_theta": 10000.0,
                 "layer_norm_type": "rms", "layer_norm_eps": 1e-5, "attention_layer_norm": True, "clip_qkv": None,
                 "include_bias": False, "bias_for_layer_norm": False, "max_sequence_length": 512,
                 "max_position_embeddings": 512, "use_position_ids": True,
                 "vision_backbone": {"image_model_type": "openai", "image_default_input_size": [16, 16],
                                     "image_patch_size": 2, "image_emb_dim": 16, "image_num_heads": 2,
                                     "image_num_key_value_heads": 2, "image_head_dim": 8, "image_num_layers": 9,
                                     "image_mlp_dim": 32, "image_mlp_activations": "quick_gelu", "image_num_pos": 65,
                                     "image_norm_eps": 1e-5},
                 "vit_layers": [-2, -9], "image_pooling_h": 2, "image_pooling_w": 2,
                 "image_pooling_2d": "attention-meanq", "image_projector": "mlp",
                 "image_padding_embed": "pad_and_partial_pad", "use_cls_feature": False}
# The same tiny model in the published allenai/MolmoE-1B-0924 config.json dialect (HF key names, model_type
# "molmoe", MOLMoEForCausalLM, auto_map to the remote config_molmoe.MolmoeConfig). The real file has no
# expert-count keys (64 / top-8 come from MolmoeConfig's defaults); this tiny one names num_experts /
# num_experts_per_tok, the MolmoeConfig keyword names, because it has 4 experts / top-2.
MOLMOE_HF_CONFIG = {"architectures": ["MOLMoEForCausalLM"],
                    "auto_map": {"AutoConfig": "config_molmoe.MolmoeConfig",
                                 "AutoModelForCausalLM": "modeling_molmoe.MOLMoEForCausalLM"},
                    "model_type": "molmoe", "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": VOCAB, "embedding_size": VOCAB,
                    "additional_vocab_size": 8, "layer_norm_eps": 1e-5, "max_position_embeddings": 512,
                    "qkv_bias": False, "rope_theta": 10000.0, "clip_qkv": None, "tie_word_embeddings": False,
                    "weight_tying": False, "use_position_ids": True, "torch_dtype": "float32",
                    "num_experts": 4, "num_experts_per_tok": 2}
# A tiny, consistent MolmoE vision backbone in the real checkpoint names: ViT width 16, 9 resblocks (so that
# vit_layers [-2, -9] are real layers), MLP 32, 2x2-pixel patches on an 8 x 8 grid (16-pixel crops),
# projector hidden 24 -> d_model 32. MOLMOE_CONFIG names its sizes (2 heads of 8); MOLMOE_HF_CONFIG does not.
MOLMOE_VISION = dict(width=16, layers=9, mlp=32, patch=2, grid=8, projector=24)


def molmoe_vision_weights(seed: int = 2) -> dict:
    """Every ``model.vision_backbone.*`` tensor of the tiny backbone (``MOLMOE_VISION``), random but well scaled."""
    gen = torch.Generator().manual_seed(seed)
    v, c = MOLMOE_VISION, 2 * MOLMOE_VISION["width"]  # two ViT layers concatenated
    w, f = v["width"], v["mlp"]
    r = lambda *s, scale=0.3: torch.randn(*s, generator=gen) * scale  # noqa: E731
    vit, out = "model.vision_backbone.image_vit.", {}
    out.update({vit + "class_embedding": r(w), vit + "positional_embedding": r(1 + v["grid"] ** 2, w),
                vit + "patch_embedding.weight": r(w, v["patch"] ** 2 * 3), vit + "pre_ln.weight": 1 + r(w, scale=0.1),
                vit + "pre_ln.bias": r(w, scale=0.1)})
    for i in range(v["layers"]):
        p = f"{vit}transformer.resblocks.{i}."
        for m in ("wq", "wk", "wv", "wo"):
            out.update({f"{p}attention.{m}.weight": r(w, w), f"{p}attention.{m}.bias": r(w, scale=0.1)})
        out.update({p + "feed_forward.w1.weight": r(f, w), p + "feed_forward.w1.bias": r(f, scale=0.1),
                    p + "feed_forward.w2.weight": r(w, f), p + "feed_forward.w2.bias": r(w, scale=0.1)})
        for norm in ("attention_norm", "ffn_norm"):
            out.update({f"{p}{norm}.weight": 1 + r(w, scale=0.1), f"{p}{norm}.bias": r(w, scale=0.1)})
    pool, proj = "model.vision_backbone.image_pooling_2d.", "model.vision_backbone.image_projector."
    for m in ("wq", "wk", "wv"):
        out.update({f"{pool}{m}.weight": r(w, c), f"{pool}{m}.bias": r(w, scale=0.1)})
    out.update({pool + "wo.weight": r(w, w), pool + "wo.bias": r(w, scale=0.1),
                proj + "w1.weight": r(v["projector"], w), proj + "w3.weight": r(v["projector"], w),
                proj + "w2.weight": r(MOLMOE_CONFIG["d_model"], v["projector"]),
                "model.vision_backbone.pad_embed": r(2, c)})
    return out


def molmoe_weights(seed: int = 0, experts: int | None = None) -> dict:
    """Reference MolmoE LM weights in OLMo's own (megablocks) names, before any layout is chosen."""
    gen = torch.Generator().manual_seed(seed)
    c, e, inter = MOLMOE_CONFIG, experts or MOLMOE_CONFIG["moe_num_experts"], MOLMOE_CONFIG["d_model"] // 2
    d = c["d_model"]
    r = lambda *s, scale=0.2: torch.randn(*s, generator=gen) * scale  # noqa: E731
    w = {"model.transformer.wte.embedding": r(c["embedding_size"], d, scale=1.0),
         "model.transformer.wte.new_embedding": r(c["additional_vocab_size"], d, scale=1.0),
         "model.transformer.ln_f.weight": 1 + r(d, scale=0.1), "model.transformer.ff_out.weight": r(c["embedding_size"], d)}
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        w.update({p + "att_proj.weight": r(3 * d, d), p + "attn_out.weight": r(d, d),
                  p + "attn_norm.weight": 1 + r(d, scale=0.1), p + "ff_norm.weight": 1 + r(d, scale=0.1),
                  p + "q_norm.weight": 1 + r(d, scale=0.1), p + "k_norm.weight": 1 + r(d, scale=0.1),
                  p + "ffn.router.layer.weight": r(e, d, scale=1.0),
                  p + "ffn.experts.mlp.w1": r(e * inter, d), p + "ffn.experts.mlp.v1": r(e * inter, d),
                  p + "ffn.experts.mlp.w2": r(e * inter, d)})
    return w


def hf_layout(w: dict, experts: int | None = None) -> dict:
    """The remote-code layout (``blocks.{i}.attn.*``, ``blocks.{i}.mlp.experts.{j}.*_proj.weight``, ``lm_head``)."""
    out, e = {}, experts or MOLMOE_CONFIG["moe_num_experts"]
    for key, value in w.items():
        if key == "model.transformer.ff_out.weight":
            out["lm_head.weight"] = value
        elif ".ffn.experts.mlp." in key:
            prefix, name = key.split(".ffn.experts.mlp.")
            for j, rows in enumerate(value.chunk(e)):
                m = {"w1": "gate", "v1": "up", "w2": "down"}[name]
                out[f"{prefix}.mlp.experts.{j}.{m}_proj.weight"] = rows.t() if name == "w2" else rows
        elif key.endswith(".ffn.router.layer.weight"):
            out[key.replace(".ffn.router.layer.", ".mlp.gate.")] = value
        elif key.endswith(".ff_norm.weight"):
            out[key.replace(".ff_norm.", ".mlp.ff_norm.")] = value
        elif ".blocks." in key:
            prefix, name = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
            out[f"{prefix}.attn.{name}"] = value
        else:
            out[key] = value
    return out


def build_molmoe(directory: Path, megablocks: bool = True, rope_impl: str | None = None,
                 hf_config: bool = False, vision: bool = True, config: dict | None = None, experts: int | None = None) -> Path:
    """A tiny MolmoE directory; ``hf_config`` writes the published (HF-key, ``molmoe``) config.json dialect
    (``config``: that dialect's dict itself, e.g. the published file shrunk, with ``experts`` routed experts);
    ``vision`` adds the tiny vision backbone (``molmoe_vision_weights``)."""
    w = molmoe_weights(experts=experts)
    state = w if megablocks else hf_layout(w, experts)
    if vision:
        state.update(molmoe_vision_weights())
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config = dict(config or (MOLMOE_HF_CONFIG if hf_config else MOLMOE_CONFIG))
    if rope_impl is not None:
        config["rope_impl"] = rope_impl
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_tokenizer(directory)
    return directory
