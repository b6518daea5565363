"""Synthetic profiles for planner tests."""

import numpy as np

from mopeq.schemas import ExpertNode, Profile, ProfileMeta

SOURCES = ("hessian", "fisher", "gauss-newton", "hessian-local")


def random_profile(layers=2, experts=4, shared=1, bits=(2, 3, 4, 8), seed=0, group_size=128,
                   symmetric=False) -> Profile:
    rng = np.random.default_rng(seed)
    nodes = []
    for layer in range(layers):
        for e in range(experts + shared):
            is_shared = e >= experts
            params = int(rng.integers(64, 512)) * 128
            trace = float(rng.lognormal(0, 1))
            pert = {str(b): float(params * 4.0 ** -b * rng.uniform(0.7, 1.3)) for b in bits}
            sens = {s: {k: trace * v / params * rng.uniform(0.8, 1.2) for k, v in pert.items()} for s in SOURCES}
            nodes.append(ExpertNode(
                id=f"L{layer}.S{e - experts}" if is_shared else f"L{layer}.E{e}", layer=layer,
                expert=e, shared=is_shared, params=params, shapes={"down": [params // 128, 128]},
                bytes={str(b): params * b // 8 + params // group_size * 4 + int(rng.integers(0, 3)) for b in bits},
                bf16_bytes=2 * params, tokens=int(rng.integers(0, 100)), frequency=float(rng.random()),
                perturbation=pert, sensitivity=sens,
                ablation={k: v * rng.uniform(0.5, 2) for k, v in sens["hessian"].items()}))
    edges = [(a.id, b.id, float(rng.random())) for a in nodes for b in nodes
             if a.layer == b.layer and a.id < b.id and not a.shared and not b.shared]
    meta = ProfileMeta(model_id="synthetic", family="test", config_hash="abc", calibration={},
                       settings={"bits": list(bits), "group_size": group_size, "symmetric": symmetric},
                       top_k=2, non_expert_bytes=1000)
    return Profile(meta=meta, experts=nodes, edges=edges, sha256="0" * 64)
