"""A reference MolmoE image path in plain tensor ops, written from the public remote code (not from mopeq).

``modeling_molmoe.py``: ``VisionTransformer`` / ``ResidualAttentionBlock`` / ``MultiHeadDotProductAttention`` /
``MLP`` / ``MolmoPretrainedVisionBackbone.encode_image`` and ``forward`` / ``MolmoModel.forward``; weights by
their checkpoint names (``model.vision_backbone.*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

V = "model.vision_backbone."


def attention(q, k, v, heads: int):
    """q [n, Lq, W], k/v [n, Lk, W] -> [n, Lq, W]; softmax(q k^T / sqrt(head_dim)) v per head."""
    hd = q.shape[-1] // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, hd) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("nqhd,nkhd->nhqk", q / math.sqrt(hd), k), -1)
    return torch.einsum("nhqk,nkhd->nqhd", weights, v).reshape(q.shape[0], q.shape[1], -1)


def linear(w: dict, name: str, x):
    out = x @ w[name + ".weight"].t()
    return out + w[name + ".bias"] if name + ".bias" in w else out


def vit_hidden_states(w: dict, patches, heads: int, layers: int) -> list:
    """patches [N, G*G, P*P*3] -> every resblock's output [N, 1+G*G, W]."""
    p = V + "image_vit."
    width = w[p + "class_embedding"].shape[0]
    ln = lambda x, name: F.layer_norm(x, (width,), w[name + ".weight"], w[name + ".bias"], 1e-5)  # noqa: E731
    x = patches @ w[p + "patch_embedding.weight"].t()
    x = torch.cat([w[p + "class_embedding"].expand(x.shape[0], 1, width), x], 1) + w[p + "positional_embedding"]
    x = ln(x, p + "pre_ln")
    out = []
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        h = ln(x, b + "attention_norm")
        q, k, v = (linear(w, f"{b}attention.{m}", h) for m in ("wq", "wk", "wv"))
        a = attention(q, k, v, heads)
        x = x + linear(w, b + "attention.wo", a)
        h = linear(w, b + "feed_forward.w1", ln(x, b + "ffn_norm"))
        x = x + linear(w, b + "feed_forward.w2", h * torch.sigmoid(1.702 * h))
        out.append(x)
    return out


def image_features(w: dict, images, image_masks, heads: int, layers: int, vit_layers=(-2, -9)):
    """images [B, T, G*G, D], image_masks [B, T, G*G] -> [B, T, (G/2)^2, d_model]."""
    b, t, n, d = images.shape
    hs = vit_hidden_states(w, images.reshape(b * t, n, d), heads, layers)
    feats = torch.cat([hs[i] for i in vit_layers], -1)[:, 1:]
    valid = ~torch.all(images.reshape(b * t, n * d) == -1, -1)
    feats = (feats * valid[:, None, None]).reshape(b, t, n, -1)
    all_pad = image_masks == 0
    partial = (image_masks < 1) & ~all_pad
    feats = feats + w[V + "pad_embed"][0] * all_pad[..., None] + w[V + "pad_embed"][1] * partial[..., None]
    g = math.isqrt(n)
    cells = torch.stack([feats.reshape(b, t, g, g, -1)[:, :, dh::2, dw::2] for dh in (0, 1) for dw in (0, 1)], -2)
    cells = cells.reshape(-1, 4, feats.shape[-1])  # (b t h w) (dh dw) c
    pool = V + "image_pooling_2d."
    query = cells.mean(-2, keepdim=True)
    pooled = attention(linear(w, pool + "wq", query), linear(w, pool + "wk", cells), linear(w, pool + "wv", cells),
                       heads)
    pooled = linear(w, pool + "wo", pooled).reshape(b, t, (g // 2) ** 2, -1)
    proj = V + "image_projector."
    x1, x3 = pooled @ w[proj + "w1.weight"].t(), pooled @ w[proj + "w3.weight"].t()
    return (F.silu(x1) * x3) @ w[proj + "w2.weight"].t()


def image_embeddings(w: dict, ids, images, image_masks, image_input_idx, heads: int, layers: int):
    """``wte(ids * (ids != -1))`` plus the features at ``image_input_idx >= 0`` (``MolmoModel.forward``)."""
    table = torch.cat([w["model.transformer.wte.embedding"], w["model.transformer.wte.new_embedding"]])
    x = F.embedding(ids * (ids != -1), table).clone()
    feats = image_features(w, images, image_masks, heads, layers)
    for bi, ti, k in torch.nonzero(image_input_idx >= 0).tolist():
        x[bi, image_input_idx[bi, ti, k]] += feats[bi, ti, k]
    return x
