"""Published config.json files (``tests/models/published/``, sources in its README), shrunk only in sizes.

``shrink(config)`` keeps every key, null, flag and quirk of the published file and replaces only sizes:
hidden width, layer count, expert count and width, heads, vocabulary (and the token ids that must stay
inside it), the compressed-KV ranks, the vision tower's widths. ``build(name, directory)`` writes a
tiny checkpoint for it in the family's on-disk layout (transformers' ``save_pretrained`` for the
families it builds; the public key names for DeepSeek-VL2 and MolmoE).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PUBLISHED = Path(__file__).parent / "published"
SEED_CONFIGS = Path(__file__).parents[2] / "mopeq" / "models" / "configs"
VOCAB = 64
HIDDEN, HEADS, DENSE_INTER, EXPERT_INTER, SHARED_INTER = 48, 4, 40, 16, 24
MAX_EXPERTS = 16

# size key -> tiny value (None: leave it as published)
SIZES = {"hidden_size": HIDDEN, "intermediate_size": DENSE_INTER, "moe_intermediate_size": EXPERT_INTER,
         "shared_expert_intermediate_size": SHARED_INTER, "num_attention_heads": HEADS, "vocab_size": VOCAB,
         "embedding_size": VOCAB, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 8, "v_head_dim": 8, "head_dim": 16}
EXPERT_COUNTS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "moe_k", "moe_top_k")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
             "vision_start_token_id", "vision_end_token_id")
# Which published file each test uses; VL2: the seed configs mopeq ships (the published page was only
# partly readable; ``mopeq/models/configs/*.json`` note what each key was checked against).
FILES = {"deepseek-vl2-tiny": SEED_CONFIGS / "deepseek-vl2-tiny.json",
         "deepseek-vl2-small": SEED_CONFIGS / "deepseek-vl2-small.json",
         "deepseek-vl2": SEED_CONFIGS / "deepseek-vl2.json",
         **{p.stem: p for p in sorted(PUBLISHED.glob("*.json")) if not p.stem.startswith("deepseek-vl2")}}


def published(name: str) -> dict:
    config = json.loads(FILES[name].read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def shrink(config: dict, layers: int = 2) -> dict:
    """The same config with tiny sizes (see the module docstring); nested configs shrunk likewise."""
    out = dict(config)
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith(("_config",)) and key != "quantization_config":
            out[key] = shrink_vision(value) if key == "vision_config" else shrink(value, layers)
        elif key in SIZES and value:  # null and 0 stay what they are (e.g. VL2-tiny's MHA)
            out[key] = SIZES[key]
    if out.get("num_key_value_heads"):
        ratio = max(1, config["num_attention_heads"] // config["num_key_value_heads"])
        out["num_key_value_heads"] = max(1, HEADS // ratio)  # GQA stays GQA
    counts = [k for k in EXPERT_COUNTS if config.get(k)]
    groups = int(config.get("n_group") or 1)
    for key in counts:
        experts = min(config[key], MAX_EXPERTS)
        out[key] = experts - experts % groups
    for key in TOP_K:
        if config.get(key) and counts:
            out[key] = min(config[key], out[counts[0]] // 2)
    if "num_hidden_layers" in config or "vision_config" not in config:  # absent: the family's default depth
        dense = 1 if config.get("first_k_dense_replace") else 0
        out["num_hidden_layers"] = layers + dense
        if dense:
            out["first_k_dense_replace"] = dense
        if "moe_layer_end_index" in config:
            out["moe_layer_end_index"] = layers + dense - 1
        if config.get("moe_layer_start_index"):
            out["moe_layer_start_index"] = 1
            out["num_hidden_layers"] = layers + 1
    if "max_window_layers" in config:
        out["max_window_layers"] = out.get("num_hidden_layers", layers)
    rope = config.get("rope_scaling")
    if isinstance(rope, dict) and "mrope_section" in rope:  # sections of head_dim / 2
        out["rope_scaling"] = {**rope, "mrope_section": [2, 3, 3]}
    for key in TOKEN_IDS:
        if isinstance(config.get(key), int) and config[key] >= VOCAB:
            out[key] = VOCAB - 1 - TOKEN_IDS.index(key)  # ids must exist in the tiny vocabulary
    return out


def shrink_vision(vision: dict) -> dict:
    """Vision towers: Qwen3-VL (depth / hidden / heads / merge) or DeepSeek-VL2's SigLIP (width / layers)."""
    out = dict(vision)
    tiny = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": HIDDEN,
            "num_position_embeddings": 16, "patch_size": 4, "width": 16, "layers": 2, "heads": 2, "image_size": 16}
    out.update({k: v for k, v in tiny.items() if k in vision})
    if "deepstack_visual_indexes" in vision:
        out["deepstack_visual_indexes"] = [0]
    if "temporal_patch_size" in vision:
        out["temporal_patch_size"] = 1
    return out


def shrink_vl2(config: dict) -> dict:
    out = shrink(config)
    scale = out["vision_config"]["image_size"] / config["vision_config"]["image_size"]
    out["projector_config"] = {**config["projector_config"], "input_dim": out["vision_config"]["width"],
                               "n_embed": HIDDEN}
    out["candidate_resolutions"] = [[round(a * scale), round(b * scale)] for a, b in config["candidate_resolutions"]]
    return out


def build(name: str, directory: Path) -> Path:
    """A tiny checkpoint for published config ``name`` in the family's on-disk layout, with a tokenizer."""
    from .conftest import _randomize_routers, build_deepseek_vl2, build_molmoe, save_tokenizer

    config = published(name)
    if config["model_type"] == "deepseek_vl_v2":
        build_deepseek_vl2(directory, config=shrink_vl2(config))
        save_tokenizer(directory, extra_tokens=("<image>",))
        return directory
    if config["model_type"] == "molmoe":  # no expert keys: the remote code's 64 experts, top 8, as published
        tiny = {**shrink(config), "hidden_size": 32, "intermediate_size": 16, "num_attention_heads": 2,
                "num_key_value_heads": 2}
        return build_molmoe(directory, megablocks=False, hf_config=True, config=tiny, experts=64, vision=False)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    tiny = shrink(config)
    torch.manual_seed(0)
    hf = AutoConfig.for_model(**{k: v for k, v in tiny.items() if k != "quantization_config"})
    auto = AutoModelForImageTextToText if "vision_config" in tiny else AutoModelForCausalLM
    model = auto.from_config(hf)
    _randomize_routers(model)
    model.save_pretrained(directory)
    # the published keys, not a re-serialisation; the weights written are unquantized, so DeepSeek-V3's fp8
    # quantization_config goes (test_quantized_source_is_refused keeps it)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in tiny.items() if k != "quantization_config"},
                                                      indent=1))
    save_tokenizer(directory)
    return directory
