"""Group similar experts of a layer so that each group (cluster) gets one bit width.

``kmeans``: k-means (scikit-learn, fixed ``random_state``) on each expert's log sensitivity per width.
``graph``: greedy modularity communities (networkx) of the profile's same-layer similarity edges,
merged down to ``k``. Shared experts are always their own cluster; without clustering every expert
is its own cluster, named by its id. ``target: vllm`` ties all routed experts of a layer into one.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np

from mopeq.schemas import ExpertNode, Profile

from .spec import Clusters


def assign_clusters(profile: Profile, costs: np.ndarray, clusters: Clusters, tie_layers: bool) -> list[str]:
    """Cluster name per expert (same order as ``profile.experts``); ``costs`` is ``[E, W]``."""
    names = [node.id for node in profile.experts]
    for layer, members in _routed_by_layer(profile.experts).items():
        k = 1 if tie_layers else clusters.per_layer
        if k is None or k >= len(members):
            continue
        labels = _labels(profile, members, costs, k, clusters.method)
        for index, label in zip(members, labels):
            names[index] = f"L{layer}.C{label}"
    return names


def _routed_by_layer(experts: list[ExpertNode]) -> dict[int, list[int]]:
    layers = defaultdict(list)
    for index, node in enumerate(experts):
        if not node.shared:
            layers[node.layer].append(index)
    return dict(sorted(layers.items()))


def _labels(profile: Profile, members: list[int], costs: np.ndarray, k: int, method: str) -> list[int]:
    if k == 1:
        return [0] * len(members)
    if method == "graph":
        return _graph_labels(profile, members, k)
    return _kmeans_labels(costs[members], k)


def _kmeans_labels(costs: np.ndarray, k: int) -> list[int]:
    from sklearn.cluster import KMeans

    finite = np.where(np.isfinite(costs), costs, 0.0)  # [n, W]
    if (finite >= 0).all():
        features = np.log(finite + 1e-30)
    else:  # measured ablation costs can be negative (removing an expert's error helped): a signed log
        unit = float(np.median(np.abs(finite[finite != 0]))) if (finite != 0).any() else 1.0
        features = np.sign(finite) * np.log1p(np.abs(finite) / unit)
    features = (features - features.mean(0)) / (features.std(0) + 1e-12)
    labels = KMeans(n_clusters=k, random_state=0, n_init=4).fit_predict(features)
    return _renumber(labels)


def _graph_labels(profile: Profile, members: list[int], k: int) -> list[int]:
    ids = [profile.experts[i].id for i in members]
    graph = nx.Graph()
    graph.add_nodes_from(ids)
    inside = set(ids)
    graph.add_weighted_edges_from((a, b, max(w, 0.0)) for a, b, w in profile.edges if a in inside and b in inside)
    communities = nx.community.greedy_modularity_communities(graph, weight="weight", cutoff=k, best_n=k)
    communities = _merge_smallest(sorted((sorted(c) for c in communities), key=lambda c: c[0]), k)
    label = {node: j for j, community in enumerate(communities) for node in community}
    return _renumber([label[i] for i in ids])


def _merge_smallest(communities: list[list[str]], k: int) -> list[list[str]]:
    """Isolated experts form their own communities; merge the smallest until ``k`` remain."""
    while len(communities) > k:
        communities.sort(key=len)
        communities = [communities[0] + communities[1]] + communities[2:]
    return communities


def _renumber(labels) -> list[int]:
    """Labels in order of first appearance, so names do not depend on the library's numbering."""
    order = {}
    return [order.setdefault(int(label), len(order)) for label in labels]
