"""``mopeq estimate``: the memory footprint a spec gives a real model, from its config alone.

No weights are read. The family's adapter builds the model's module tree on the ``meta`` device (no
memory), exactly as profile, compile and run build it: every expert matrix's shape, the MoE layers and
the parameters outside the experts are counted on it, not re-derived from config keys. Expert bytes at
each width come from ``packed_nbytes`` (exactly what the compiler writes). The planner needs
sensitivities, so the profile is **synthetic**: expert ``e`` gets ``s_e ~ LogNormal(0, 1)`` (seeded)
and ``Omega_b = s_e * params * 4^-b`` (uniform quantization error falls ~4x per extra bit). The byte
totals depend only on the widths chosen, so they are real; which experts get which width is not.

Shipped configs (``mopeq/models/configs/``): the seed models and one published config of every
advertised family; any model directory or ``config.json`` works too.

Example: ``mopeq estimate deepseek-vl2-small --spec specs/demo.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compiler.quantize import packed_nbytes
from .safety import read_json_object
from .schemas import ExpertNode, InputError, Profile, ProfileMeta, Trace, config_hash

CONFIGS = Path(__file__).parent / "models" / "configs"
ALIASES = {"deepseek-vl2-base": "deepseek-vl2", "molmoe": "molmoe-1b", "molmoe-1b-0924": "molmoe-1b"}
SOURCE = "hessian-local"


@dataclass(frozen=True)
class MoEShape:
    moe_layers: list[int]
    experts: int  # routed experts per MoE layer (the first one's)
    top_k: int
    matrices: dict[str, dict[str, list[int]]]  # expert id -> {gate, up, down: [out, in]}
    non_expert_params: int
    layer_params: list[int]  # every decoder layer's parameters
    vocab: int
    hidden: int


def read_named_config(name: str) -> tuple[str, dict, Path]:
    """A shipped seed config by name (``deepseek-vl2-small``) or a ``config.json`` / model directory."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = CONFIGS / f"{ALIASES.get(name, name)}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise InputError(f"{name}: not a config file or directory, nor a known model ({', '.join(known)})")
    config = read_json_object(path, "config")
    if path.parent == CONFIGS:  # mopeq's notes on where each shipped key was read
        config = {k: v for k, v in config.items() if k not in ("_mopeq_note", "_published_size")}
    return path.stem if path.parent == CONFIGS else name, config, path


def moe_shape(config: dict, where: str | Path = "config") -> MoEShape:
    """Expert geometry and sizes from the family's module tree built on the meta device (no memory)."""
    from .models import adapter_class, skeleton

    where = Path(where)
    directory = where if where.is_dir() else where.parent
    adapter_class(config, directory).check_config(config, where)
    adapter = skeleton(config, directory, device="meta")
    refs = adapter.experts()
    matrices = {r.id: {m: list(w.shape) for m, w in adapter.expert_weights(r).items()} for r in refs}
    expert_params = sum(int(np.prod(s)) for shapes in matrices.values() for s in shapes.values())
    total = sum(p.numel() for p in adapter.model.parameters()) + adapter.unbuilt_params()
    layers = adapter.moe_layers()
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in adapter.decoder_layers()]
    vocab, hidden = adapter.decoder_stack().embed_tokens.weight.shape
    return MoEShape(layers, adapter.num_experts(layers[0]), adapter.top_k(), matrices, total - expert_params,
                    per_layer, int(vocab), int(hidden))


def memory_gb(shape: MoEShape, planned_expert_bytes: int, calib_tokens: int, batch_tokens: int) -> dict[str, float]:
    """What each step needs in memory (GB), by the rules ``--max-memory`` plans with (``safety.memory_needs``):
    profile in memory (float32) and layer-streamed, each without and with loss curvature (fisher / gauss-newton;
    gauss-newton with a block of 8 probes; the Hessian keeps more), compile (one layer's source
    experts + its packed output) and run (the artifact: packed experts + 16-bit rest)."""
    from .models.base import ExpertRef
    from .safety import memory_needs, streamed_curvature_needs

    total = shape.non_expert_params + sum(n * k for s in shape.matrices.values() for n, k in s.values())
    routed = [0] * len(shape.layer_params)  # routed expert parameters per decoder layer (bf16 when streamed)
    for eid, shapes in shape.matrices.items():
        ref = ExpertRef.parse(eid)
        routed[ref.layer] += 0 if ref.shared else sum(n * k for n, k in shapes.values())
    plain, full = (memory_needs(shape.layer_params, total, shape.vocab, shape.hidden, batch_tokens, calib_tokens, w,
                                routed) for w in (False, True))
    in_ram, on_disk = streamed_curvature_needs(plain, ["gauss-newton"], 8)
    per_source = {}  # layer-streamed, one source at a time: (inputs in RAM, on disk); probe blocks of 8
    for source in ("fisher", "gauss-newton", "hessian"):
        ram, disk = streamed_curvature_needs(plain, [source], 8)
        per_source[f"profile_streamed_{source.replace('-', '_')}"] = ram / 1e9
        per_source[f"profile_streamed_{source.replace('-', '_')}_disk"] = disk / 1e9
    per_layer_experts = max(shape.layer_params) * 2  # bf16 source
    layers = max(len(shape.moe_layers), 1)
    return {"profile_in_memory": plain["in_memory"] / 1e9, "profile_in_memory_curvature": full["in_memory"] / 1e9,
            "profile_streamed": plain["streamed"] / 1e9,
            "profile_streamed_curvature": in_ram / 1e9, "profile_streamed_curvature_disk": on_disk / 1e9, **per_source,
            "compile": (per_layer_experts + planned_expert_bytes / layers) / 1e9,
            "run": (planned_expert_bytes + 2 * shape.non_expert_params) / 1e9}


def synthetic_profile(shape: MoEShape, model_id: str, config: dict, bits: list[int], group_size: int,
                      symmetric: bool, seed: int = 0) -> Profile:
    """Real sizes, seeded synthetic sensitivities (see the module docstring)."""
    from .models.base import ExpertRef

    rng = np.random.default_rng(seed)
    nodes = [_node(ExpertRef.parse(eid), shapes, bits, group_size, symmetric, rng) for eid, shapes in shape.matrices.items()]
    meta = ProfileMeta(model_id=model_id, family=str(config.get("model_type")), config_hash=config_hash(config),
                       calibration={"source": "synthetic", "tokens": 0, "seed": seed, "loss": 0.0},
                       settings={"bits": bits, "group_size": group_size, "symmetric": symmetric,
                                 "clip_search": False, "seed": seed, "synthetic": True},
                       top_k=shape.top_k, non_expert_bytes=2 * shape.non_expert_params)
    return Profile(meta=meta, experts=nodes)


def _node(ref, shapes, bits, group_size, symmetric, rng) -> ExpertNode:
    params = sum(n * k for n, k in shapes.values())
    size = {str(b): sum(packed_nbytes(n, k, b, group_size, symmetric) for n, k in shapes.values()) for b in bits}
    s = float(rng.lognormal(0.0, 1.0))
    perturbation = {str(b): params * 4.0 ** -b for b in bits}
    return ExpertNode(id=ref.id, layer=ref.layer, expert=ref.expert, shared=ref.shared, params=params,
                      shapes=shapes, bytes=size, bf16_bytes=2 * params,
                      trace={SOURCE: Trace(mean=s * params)}, perturbation=perturbation,
                      sensitivity={SOURCE: {b: s * p for b, p in perturbation.items()}})


def estimate(name: str, spec_path: Path, seed: int = 0, calib_tokens: int = 128 * 512,
             batch_tokens: int = 4 * 512) -> dict:
    """Plan ``name`` under the spec from a synthetic profile; sizes in GB (1e9 bytes); ``memory_gb``: what each
    step needs for a calibration of ``calib_tokens`` tokens in batches of ``batch_tokens``."""
    from .planner import load_spec, make_plan

    model_id, config, where = read_named_config(name)
    spec = load_spec(spec_path)
    shape = moe_shape(config, where)
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
            "solver": f"{plan.solver.backend} {plan.solver.status} gap {plan.solver.gap:.1e}",
            "memory_gb": memory_gb(shape, plan.totals["bytes"], calib_tokens, batch_tokens)}
