"""``mopeq estimate``: the memory footprint a spec gives a real model, from its config alone.

No weights are read. The config (a seed model's shipped in ``mopeq/models/configs/``, or any
``config.json``) gives the MoE layers, experts, top-k and matrix sizes; expert bytes at each width
come from ``packed_nbytes`` (exactly what the compiler writes). The planner needs sensitivities, so
the profile is **synthetic**: expert ``e`` gets ``s_e ~ LogNormal(0, 1)`` (seeded) and
``Omega_b = s_e * params * 4^-b`` (uniform quantization error falls ~4x per extra bit). The byte
totals depend only on the widths chosen, so they are real; which experts get which width is not.

Example: ``mopeq estimate deepseek-vl2-small --spec specs/demo.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compiler.quantize import packed_nbytes
from .schemas import ExpertNode, InputError, Profile, ProfileMeta, Trace, config_hash

CONFIGS = Path(__file__).parent / "models" / "configs"
ALIASES = {"deepseek-vl2-base": "deepseek-vl2", "molmoe": "molmoe-1b", "molmoe-1b-0924": "molmoe-1b"}
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")
SOURCE = "hessian-local"


@dataclass(frozen=True)
class MoEShape:
    moe_layers: list[int]
    experts: int
    top_k: int
    hidden: int
    inter: int
    shared_inter: int  # 0 without a shared expert
    non_expert_params: int


def read_named_config(name: str) -> tuple[str, dict]:
    """A shipped seed config by name (``deepseek-vl2-small``) or a ``config.json`` / model directory."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = CONFIGS / f"{ALIASES.get(name, name)}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise InputError(f"{name}: not a config file or directory, nor a known model ({', '.join(known)})")
    try:
        return path.stem if path.parent == CONFIGS else name, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _first(cfg: dict, keys: tuple[str, ...], where: str) -> int:
    for key in keys:
        if cfg.get(key):
            return int(cfg[key])
    raise InputError(f"{where}: none of {', '.join(keys)} in the config")


def moe_shape(config: dict, where: str = "config") -> MoEShape:
    """Expert geometry of a config (DeepSeek-VL2 ``language_config``, text_config or flat)."""
    if config.get("model_type") == "molmoe":  # the published config has no expert keys: remote-code defaults
        from .models.molmoe import HF_DEFAULT_EXPERTS, HF_DEFAULT_TOP_K

        config = {"num_experts": HF_DEFAULT_EXPERTS, "num_experts_per_tok": HF_DEFAULT_TOP_K, **config}
    cfg = config.get("language_config") or config.get("text_config") or config
    layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    experts, top_k = _first(cfg, EXPERT_COUNT_KEYS, where), _first(cfg, TOP_K_KEYS, where)
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    first = int(cfg.get("first_k_dense_replace", 0) or 0)
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    moe_layers = [i for i in range(first, layers) if (i + 1) % step == 0 and i not in cfg.get("mlp_only_layers", [])]
    shared = int(cfg.get("n_shared_experts") or 0) * inter or int(cfg.get("shared_expert_intermediate_size") or 0)
    return MoEShape(moe_layers, experts, top_k, hidden, inter, shared, non_expert_params(cfg, config, layers - len(moe_layers)))


def non_expert_params(cfg: dict, config: dict, dense_layers: int) -> int:
    """Embeddings + LM head + attention (MLA or MHA) + dense MLPs + routers + vision (approximate)."""
    h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    vocab = int(cfg.get("embedding_size") or cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    if cfg.get("kv_lora_rank") and cfg.get("use_mla", True):
        qk = int(cfg["qk_nope_head_dim"]) + int(cfg["qk_rope_head_dim"])
        q = h * heads * qk if not cfg.get("q_lora_rank") else int(cfg["q_lora_rank"]) * (h + heads * qk)
        kv = h * (int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"])) + \
            int(cfg["kv_lora_rank"]) * heads * (int(cfg["qk_nope_head_dim"]) + int(cfg["v_head_dim"]))
        attention = q + kv + heads * int(cfg["v_head_dim"]) * h
    else:
        head_dim = int(cfg.get("head_dim") or h // heads)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    dense_mlp = 3 * h * int(cfg.get("intermediate_size") or 0) * dense_layers
    routers = (layers - dense_layers) * h * _first(cfg, EXPERT_COUNT_KEYS, "config")
    embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings") or cfg.get("weight_tying") else 2)
    return embeddings + layers * attention + dense_mlp + routers + _vision_params(config)


def _vision_params(config: dict) -> int:
    """DeepSeek-VL2: counted from its vision/projector config; MolmoE: from the remote code's default
    backbone; others: the config's ``_mopeq_vision_params`` (0 when absent)."""
    if config.get("model_type") == "deepseek_vl_v2" and "vision_config" in config:
        from .models.deepseek_vl2_vision import vision_params

        return vision_params(config)
    if config.get("model_type") in ("molmo", "molmoe"):
        from .models.molmo_vision import default_geometry, param_count

        return param_count(default_geometry(int(config.get("d_model") or config["hidden_size"])))
    return int(config.get("_mopeq_vision_params", 0))


def synthetic_profile(shape: MoEShape, model_id: str, config: dict, bits: list[int], group_size: int,
                      symmetric: bool, seed: int = 0) -> Profile:
    """Real sizes, seeded synthetic sensitivities (see the module docstring)."""
    rng = np.random.default_rng(seed)
    nodes = []
    for layer in shape.moe_layers:
        refs = [(j, False, shape.inter) for j in range(shape.experts)]
        refs += [(0, True, shape.shared_inter)] if shape.shared_inter else []
        for j, shared, inter in refs:
            nodes.append(_node(layer, j, shared, shape.hidden, inter, bits, group_size, symmetric, rng))
    meta = ProfileMeta(model_id=model_id, family=str(config.get("model_type")), config_hash=config_hash(config),
                       calibration={"source": "synthetic", "tokens": 0, "seed": seed, "loss": 0.0},
                       settings={"bits": bits, "group_size": group_size, "symmetric": symmetric,
                                 "clip_search": False, "seed": seed, "synthetic": True},
                       top_k=shape.top_k, non_expert_bytes=2 * shape.non_expert_params)
    return Profile(meta=meta, experts=nodes)


def _node(layer, j, shared, hidden, inter, bits, group_size, symmetric, rng) -> ExpertNode:
    shapes = {"gate": [inter, hidden], "up": [inter, hidden], "down": [hidden, inter]}
    params = 3 * hidden * inter
    size = {str(b): sum(packed_nbytes(n, k, b, group_size, symmetric) for n, k in shapes.values()) for b in bits}
    s = float(rng.lognormal(0.0, 1.0))
    perturbation = {str(b): params * 4.0 ** -b for b in bits}
    return ExpertNode(id=f"L{layer}.{'S' if shared else 'E'}{j}", layer=layer, expert=j, shared=shared, params=params,
                      shapes=shapes, bytes=size, bf16_bytes=2 * params,
                      trace={SOURCE: Trace(mean=s * params)}, perturbation=perturbation,
                      sensitivity={SOURCE: {b: s * p for b, p in perturbation.items()}})


def estimate(name: str, spec_path: Path, seed: int = 0) -> dict:
    """Plan ``name`` under the spec from a synthetic profile; sizes in GB (1e9 bytes)."""
    from .planner import load_spec, make_plan

    model_id, config = read_named_config(name)
    spec = load_spec(spec_path)
    shape = moe_shape(config, name)
    profile = synthetic_profile(shape, model_id, config, list(spec.bits), spec.group_size, spec.symmetric, seed)
    if spec.sensitivity != "uniform":
        spec = spec.model_copy(update={"sensitivity": SOURCE})
    plan = make_plan(spec, profile)
    expert_bf16 = sum(n.bf16_bytes for n in profile.experts)
    dense = profile.meta.non_expert_bytes
    return {"model": model_id, "moe_layers": len(shape.moe_layers), "experts_per_layer": shape.experts,
            "top_k": shape.top_k, "experts_bf16_gb": expert_bf16 / 1e9, "experts_planned_gb": plan.totals["bytes"] / 1e9,
            "avg_bits": plan.totals["avg_bits"], "non_expert_bf16_gb": dense / 1e9,
            "total_bf16_gb": (expert_bf16 + dense) / 1e9, "total_planned_gb": (plan.totals["bytes"] + dense) / 1e9,
            "solver": f"{plan.solver.backend} {plan.solver.status} gap {plan.solver.gap:.1e}"}
