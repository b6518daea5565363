"""MolmoE-1B's image path: CLIP ViT-L/14-336 + 2x2 attention pooling + SwiGLU projector, and its preprocessing.

What the public source says (read through the code index; no download of the real checkpoint here):

* Module tree and forward: the remote code ``modeling_molmoe.py`` (mirrored in ChulanZhang/molmo_hf
  ``molmo/models/modeling_molmoe.py``): ``MolmoPretrainedVisionBackbone`` holds ``image_vit``
  (``VisionTransformer``: ``class_embedding`` ``[W]``, ``positional_embedding`` ``[1+G*G, W]``,
  ``patch_embedding`` = ``Linear(P*P*3, W, bias=False)``, ``pre_ln`` (LayerNorm), ``transformer.resblocks.{i}``
  = ``ResidualAttentionBlock``: ``x + attention(attention_norm(x))``, ``x + feed_forward(ffn_norm(x))``,
  attention ``wq|wk|wv|wo`` with bias, ``feed_forward.w1|w2`` with bias and ``quick_gelu``; no post-LN),
  ``image_pooling_2d`` (``MultiHeadDotProductAttention(is_vit_layer=False)``: ``wq|wk|wv`` ``[heads*head_dim,
  len(vit_layers)*W]``, ``wo`` ``[W, heads*head_dim]``, all with bias, softmax(q k^T / sqrt(head_dim))),
  ``image_projector`` (``MLP``: ``w2(silu(w1 x) * w3 x)``, no bias; ``LlamaSwiGLU``) and ``pad_embed``
  ``[2, len(vit_layers)*W]`` for ``image_padding_embed == "pad_and_partial_pad"``.
  ``encode_image``: ViT on ``[B*T, G*G, P*P*3]``, features = ``cat(hidden_states[l] for l in vit_layers)``,
  class token dropped, times the crop-validity mask. ``forward``: pad embeddings from ``image_masks``
  (``all_pad = m == 0``; ``partial = (m < 1) & ~all_pad``), ``'b n (h dh) (w dw) c -> (b n h w) (dh dw) c'``,
  ``attention-meanq`` (query = mean of the 4 features), projector. ``MolmoModel.forward`` embeds
  ``input_ids * (input_ids != -1)`` and *adds* the features at ``image_input_idx >= 0``.
* Crop-validity mask: the remote code's ``encode_image`` keeps a crop when *no* value is -1
  (``all(images != -1)``); vLLM's Molmo port keeps it unless *all* values are -1. Both agree on the
  collator's all ``-1`` padding crops; we use vLLM's form, which cannot drop a real crop by chance.
* Sizes: the remote code builds ``VisionBackboneConfig()`` with its defaults (ViT-L/14 at 336 px: W 1024,
  23 layers, 16 heads of 64, MLP 4096, ``quick_gelu``, 577 positions, eps 1e-5) and ``vit_layers [-2, -9]``,
  ``image_pooling_h = w = 2``. Here every size comes from the checkpoint's tensor shapes, cross-checked
  against ``vision_backbone.*`` (or top-level ``image_*``) config keys when they are present; the head count
  defaults to 16 (inferred from the defaults above) only when the width divides by 16.
* Preprocessing: the HF image processor ``image_preprocessing_molmo.py`` (``MolmoImageProcessor``; the copy
  read was PaddleNLP's port, ``select_tiling``/``resize_and_pad``/``image_to_patches_and_tokens``/
  ``build_image_input_idx``, identical to the forks' copies), see :func:`molmo_image_inputs`.

The ViT blocks are transformers' ``CLIPEncoderLayer`` (pre-LN, biased q/k/v/out_proj, ``quick_gelu``): the
same computation as ``ResidualAttentionBlock`` under other names, so :func:`memory_key` renames the
resblock tensors (``attention.wq`` -> ``self_attn.q_proj``, ``attention_norm`` -> ``layer_norm1``, ...).
Everything else keeps its checkpoint name (``model.vision_backbone.*`` minus nothing). Vision tensors are
never quantized; the compiler copies them byte for byte under their checkpoint names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..schemas import InputError

VISION = "model.vision_backbone."
VIT = VISION + "image_vit."
RESBLOCK = re.compile(r"^(model\.vision_backbone\.image_vit\.transformer\.resblocks\.\d+)\.(.+)\.(weight|bias)$")
# ResidualAttentionBlock names -> transformers' CLIPEncoderLayer names.
RESBLOCK_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.out_proj",
                  "attention_norm": "layer_norm1", "ffn_norm": "layer_norm2",
                  "feed_forward.w1": "mlp.fc1", "feed_forward.w2": "mlp.fc2"}
# The remote code's VisionBackboneConfig / MolmoConfig settings this module reproduces (see the docstring).
DEFAULTS = {"vit_layers": [-2, -9], "image_pooling_h": 2, "image_pooling_w": 2, "image_pooling_2d": "attention-meanq",
            "image_projector": "mlp", "image_padding_embed": "pad_and_partial_pad", "use_cls_feature": False,
            "image_mlp_activations": "quick_gelu", "image_model_type": "openai"}
DEFAULT_HEADS = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD, the processor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# molmo's tokenizer.py EXTRA_TOKENS order; build_tokenizer(pad_tokenizer_to=embedding_size) gives them the ids
# embedding_size + 0, 1, 2, 3 (inferred from that code: the real tokenizer's ids were not found publicly).
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>")


def memory_key(key: str) -> str:
    """A ``model.vision_backbone.*`` checkpoint name -> the in-memory (``MolmoVisionBackbone``) name."""
    match = RESBLOCK.match(key)
    if match is None or match[2] not in RESBLOCK_NAMES:
        return key
    return f"{match[1]}.{RESBLOCK_NAMES[match[2]]}.{match[3]}"


@dataclass(frozen=True)
class VisionGeometry:
    width: int  # W, the ViT width
    layers: int
    heads: int
    mlp: int  # F
    patch: int  # P (pixels)
    grid: int  # G patches per side of a crop
    projector: int  # Hp, the projector's hidden width
    d_model: int
    vit_layers: tuple[int, ...]
    eps: float

    @property
    def features(self) -> int:
        return self.width * len(self.vit_layers)


def expected_shapes(g: VisionGeometry) -> dict[str, tuple[int, ...]]:
    """Every ``model.vision_backbone.*`` checkpoint tensor and its shape (the module docstring's list)."""
    w, f, c = g.width, g.mlp, g.features
    out = {VIT + "class_embedding": (w,), VIT + "positional_embedding": (1 + g.grid ** 2, w),
           VIT + "patch_embedding.weight": (w, g.patch * g.patch * 3), VIT + "pre_ln.weight": (w,),
           VIT + "pre_ln.bias": (w,)}
    for i in range(g.layers):
        p = f"{VIT}transformer.resblocks.{i}."
        for m in ("wq", "wk", "wv", "wo"):
            out.update({f"{p}attention.{m}.weight": (w, w), f"{p}attention.{m}.bias": (w,)})
        out.update({p + "feed_forward.w1.weight": (f, w), p + "feed_forward.w1.bias": (f,),
                    p + "feed_forward.w2.weight": (w, f), p + "feed_forward.w2.bias": (w,)})
        for norm in ("attention_norm", "ffn_norm"):
            out.update({f"{p}{norm}.weight": (w,), f"{p}{norm}.bias": (w,)})
    pool = VISION + "image_pooling_2d."
    for m in ("wq", "wk", "wv"):
        out.update({f"{pool}{m}.weight": (w, c), f"{pool}{m}.bias": (w,)})
    out.update({pool + "wo.weight": (w, w), pool + "wo.bias": (w,)})
    proj = VISION + "image_projector."
    out.update({proj + "w1.weight": (g.projector, w), proj + "w3.weight": (g.projector, w),
                proj + "w2.weight": (g.d_model, g.projector), VISION + "pad_embed": (2, c)})
    return out


def default_geometry(d_model: int) -> VisionGeometry:
    """MolmoE-1B's backbone as the remote code builds it by default (ViT-L/14 at 336 px, 23 layers, 16 heads,
    MLP 4096, vit_layers [-2, -9]); the projector width 1024 (= ``mlp_ratio 1 * d_model / 2``) is inferred."""
    return VisionGeometry(width=1024, layers=23, heads=DEFAULT_HEADS, mlp=4096, patch=14, grid=24,
                          projector=d_model // 2, d_model=d_model, vit_layers=(-2, -9), eps=1e-5)


def param_count(g: VisionGeometry) -> int:
    """Parameters of the backbone's checkpoint tensors."""
    return sum(math.prod(shape) for shape in expected_shapes(g).values())


def vision_settings(config: dict) -> dict:
    """``vision_backbone.*`` and top-level ``image_*``/``vit_layers`` keys, defaults where absent."""
    nested = config.get("vision_backbone") if isinstance(config.get("vision_backbone"), dict) else {}
    out = dict(DEFAULTS)
    out.update({k: v for k, v in config.items() if (k.startswith("image_") or k in DEFAULTS) and v is not None})
    out.update({k: v for k, v in nested.items() if v is not None})
    return out


def vision_geometry(config: dict, tensors: dict, d_model: int, where="checkpoint") -> VisionGeometry | None:
    """Sizes of the vision backbone from the checkpoint header (``name -> (shape, dtype)``); None without one.

    Raises ``InputError`` naming the first missing, unexpected or mis-shaped tensor, or the config field that
    disagrees with the shapes.
    """
    names = sorted(k for k in tensors if k.startswith(VISION))
    if not names:
        return None
    s = vision_settings(config)
    _check_supported(s, where)
    shape = lambda key: _need(tensors, key, where)  # noqa: E731
    width = shape(VIT + "class_embedding")[0]
    layers = 1 + max((int(m[1]) for k in names if (m := re.match(r".*\.resblocks\.(\d+)\.", k))), default=-1)
    mlp = shape(VIT + "transformer.resblocks.0.feed_forward.w1.weight")[0] if layers else 0
    positions = shape(VIT + "positional_embedding")[0] - 1
    grid, patch = math.isqrt(max(positions, 0)), math.isqrt(shape(VIT + "patch_embedding.weight")[-1] // 3)
    heads = int(s.get("image_num_heads") or (DEFAULT_HEADS if width % DEFAULT_HEADS == 0 else 0))
    g = VisionGeometry(width, layers, heads, mlp, patch, grid, shape(VISION + "image_projector.w1.weight")[0], d_model,
                       tuple(int(v) for v in s["vit_layers"]), float(s.get("image_norm_eps", 1e-5)))
    _check_sizes(g, s, positions, where)
    want = expected_shapes(g)
    for key in names:
        if key not in want:
            raise InputError(f"{where}: tensor {key} is not part of the supported MolmoE vision backbone")
    for key, size in want.items():
        if key not in tensors:
            raise InputError(f"{where}: tensor {key} missing (the MolmoE vision backbone is partial)")
        if tuple(tensors[key][0]) != size:
            raise InputError(f"{where}: tensor {key} has shape {tuple(tensors[key][0])}, expected {size}")
    return g


def _need(tensors: dict, key: str, where) -> tuple[int, ...]:
    if key not in tensors:
        raise InputError(f"{where}: tensor {key} missing (the MolmoE vision backbone is partial)")
    return tuple(tensors[key][0])


def _check_supported(s: dict, where) -> None:
    for key in ("image_pooling_h", "image_pooling_w", "image_pooling_2d", "image_projector", "image_padding_embed",
                "use_cls_feature", "image_mlp_activations", "image_model_type"):
        if s[key] != DEFAULTS[key]:
            raise InputError(f"{where}: molmo {key} {s[key]!r} is not supported (expected {DEFAULTS[key]!r}, "
                             "as in MolmoE-1B)")


def _check_sizes(g: VisionGeometry, s: dict, positions: int, where) -> None:
    vit = VIT + "positional_embedding"
    if g.grid * g.grid != positions or g.grid < 2:
        raise InputError(f"{where}: tensor {vit} has {positions + 1} rows, expected 1 + G*G for a square G x G grid")
    if g.patch * g.patch * 3 * g.width == 0 or g.layers == 0:
        raise InputError(f"{where}: MolmoE vision backbone without patch embedding or resblocks")
    if g.heads < 1 or g.width % g.heads:
        raise InputError(f"{where}: molmo image_num_heads {s.get('image_num_heads')!r}: expected a divisor of the "
                         f"ViT width {g.width} (the default {DEFAULT_HEADS} needs a width divisible by it)")
    checks = {"image_emb_dim": g.width, "image_num_layers": g.layers, "image_mlp_dim": g.mlp,
              "image_patch_size": g.patch, "image_num_pos": positions + 1, "image_head_dim": g.width // g.heads,
              "image_num_key_value_heads": g.heads}
    for key, value in checks.items():
        if s.get(key) is not None and int(s[key]) != value:
            raise InputError(f"{where}: molmo {key} is {s[key]!r}, but the checkpoint's vision tensors give {value}")
    size = s.get("image_default_input_size")
    if size is not None and list(size) != [g.grid * g.patch] * 2:
        raise InputError(f"{where}: molmo image_default_input_size {size!r}, expected {[g.grid * g.patch] * 2} "
                         "(G x P from the positional and patch embeddings)")
    if not g.vit_layers or any(not -g.layers <= v < g.layers for v in g.vit_layers):
        raise InputError(f"{where}: molmo vit_layers {list(g.vit_layers)} out of range for {g.layers} ViT layers")


# --- modules ----------------------------------------------------------------------------------------
class Resblocks(nn.Module):
    """``image_vit.transformer``: ``resblocks`` = transformers' ``CLIPEncoderLayer`` x layers."""

    def __init__(self, g: VisionGeometry):
        super().__init__()
        from transformers import CLIPVisionConfig
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        cfg = CLIPVisionConfig(hidden_size=g.width, intermediate_size=g.mlp, num_attention_heads=g.heads,
                               layer_norm_eps=g.eps, hidden_act="quick_gelu", attention_dropout=0.0)
        cfg._attn_implementation = "sdpa"  # non-causal, scale 1/sqrt(head_dim), like the remote code's sdpa path
        self.resblocks = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(g.layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = []
        for block in self.resblocks:
            x = block(x, None)
            x = x[0] if isinstance(x, tuple) else x
            hidden.append(x)
        return hidden


class VisionTransformer(nn.Module):
    """``image_vit``: patch embedding, class token, positions, ``pre_ln``, resblocks (no post-LN)."""

    def __init__(self, g: VisionGeometry):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(g.width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + g.grid ** 2, g.width))
        self.patch_embedding = nn.Linear(g.patch * g.patch * 3, g.width, bias=False)
        self.pre_ln = nn.LayerNorm(g.width, eps=g.eps)
        self.transformer = Resblocks(g)

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embedding(patches)  # [N, G*G, W]
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], 1)
        return self.transformer(self.pre_ln(x + self.positional_embedding.to(x.dtype)))


class MeanQueryPool(nn.Module):
    """``image_pooling_2d`` (``attention-meanq``): one query, the mean of the 2x2 cell, attends to the cell."""

    def __init__(self, g: VisionGeometry):
        super().__init__()
        self.heads = g.heads
        self.wq, self.wk, self.wv = (nn.Linear(g.features, g.width) for _ in range(3))
        self.wo = nn.Linear(g.width, g.width)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        """cells [n, 4, C] -> [n, W]."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [n, heads, q|k, hd]
        q, k, v = split(self.wq(cells.mean(1, keepdim=True))), split(self.wk(cells)), split(self.wv(cells))
        out = F.scaled_dot_product_attention(q, k, v)  # [n, heads, 1, hd]
        return self.wo(out.transpose(1, 2).flatten(2))[:, 0]


class Projector(nn.Module):
    """``image_projector``: ``w2(silu(w1 x) * w3 x)``, no bias."""

    def __init__(self, g: VisionGeometry):
        super().__init__()
        self.w1 = nn.Linear(g.width, g.projector, bias=False)  # input_dim = image_emb_dim for attention-meanq
        self.w3 = nn.Linear(g.width, g.projector, bias=False)
        self.w2 = nn.Linear(g.projector, g.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoVisionBackbone(nn.Module):
    """``model.vision_backbone``: crops ``[B, T, G*G, P*P*3]`` -> features ``[B, T, (G/2)^2, d_model]``."""

    def __init__(self, g: VisionGeometry):
        super().__init__()
        self.geometry = g
        self.image_vit = VisionTransformer(g)
        self.image_pooling_2d = MeanQueryPool(g)
        self.image_projector = Projector(g)
        self.pad_embed = nn.Parameter(torch.zeros(2, g.features))

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        g, (b, t, n, d) = self.geometry, images.shape
        images = images.to(self.pad_embed.dtype)
        valid = ~(images == -1).all(-1).all(-1)  # [B, T]: padding crops are all -1
        hidden = self.image_vit(images.reshape(b * t, n, d))
        feats = torch.cat([hidden[i] for i in g.vit_layers], -1)[:, 1:]  # [B*T, G*G, C], class token dropped
        feats = feats.view(b, t, n, -1) * valid[..., None, None].to(feats.dtype)
        masks = image_masks.to(feats.dtype)
        all_pad = (masks == 0).to(feats.dtype)[..., None]
        partial = ((masks < 1) & (masks != 0)).to(feats.dtype)[..., None]
        feats = feats + self.pad_embed[0] * all_pad + self.pad_embed[1] * partial
        feats = feats.view(b, t, g.grid, g.grid, -1)
        if g.grid % 2:  # the remote code pads an odd grid by one row and column of zeros
            feats = F.pad(feats, (0, 0, 0, 1, 0, 1))
        half = feats.shape[2] // 2
        cells = feats.view(b, t, half, 2, half, 2, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(b * t * half * half, 4, -1)
        pooled = self.image_pooling_2d(cells).view(b, t, half * half, -1)
        return self.image_projector(pooled)  # [B, T, (G/2)^2, d_model]


def add_image_features(embeds: torch.Tensor, features: torch.Tensor, image_input_idx: torch.Tensor) -> torch.Tensor:
    """``x[b, image_input_idx[b, t, k]] += features[b, t, k]`` where the index is >= 0 (``MolmoModel.forward``)."""
    b = embeds.shape[0]
    idx = image_input_idx.reshape(b, -1)
    feats = features.reshape(b, idx.shape[1], -1).to(embeds.dtype)
    valid = idx >= 0
    if bool((idx[valid] >= embeds.shape[1]).any()):
        raise InputError(f"image_input_idx: a position >= the sequence length {embeds.shape[1]}")
    rows = torch.arange(b, device=embeds.device)[:, None].expand_as(idx)
    return embeds.index_put((rows[valid], idx[valid]), feats[valid], accumulate=True)


# --- preprocessing --------------------------------------------------------------------------------
def image_token_ids(config: dict, tokenizer=None) -> dict[str, int]:
    """``<im_start>``, ``<im_end>``, ``<im_patch>``, ``<im_col>`` ids: the tokenizer's when it has all four,
    else ``embedding_size + 0..3`` (molmo's ``build_tokenizer(pad_tokenizer_to=embedding_size)`` appends
    ``EXTRA_TOKENS`` in this order after padding the vocabulary: inferred, the real ids were not found)."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if all(t in vocab for t in IMAGE_TOKENS):
        return {t: int(vocab[t]) for t in IMAGE_TOKENS}
    embed = config.get("embedding_size") or config.get("vocab_size")
    extra = config.get("additional_vocab_size")
    if not isinstance(embed, int) or not isinstance(extra, int) or extra < len(IMAGE_TOKENS):
        raise InputError(f"config.json: molmo image tokens need embedding_size and additional_vocab_size >= "
                         f"{len(IMAGE_TOKENS)} (got {embed!r}, {extra!r}) when the tokenizer lacks {IMAGE_TOKENS}")
    return {t: embed + i for i, t in enumerate(IMAGE_TOKENS)}


def select_tiling(h: float, w: float, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of ``window``-pixel tiles for an ``h x w`` image: the public ``select_tiling``, verbatim."""
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
                     key=lambda x: (x[0] * x[1], x[0]))
    candidates = np.array(tilings, dtype=np.int32)
    scale = (candidates * window).astype(np.float32) / np.array([h, w], dtype=np.float32)
    scale = scale.min(-1)
    ix = np.argmax(scale) if np.all(scale < 1) else np.argmin(np.where(scale < 1.0, 10e9, scale))
    return int(candidates[ix][0]), int(candidates[ix][1])


def resize_and_pad(image: torch.Tensor, size: tuple[int, int], mean=CLIP_MEAN, std=CLIP_STD):
    """float ``[H, W, 3]`` in [0, 1] -> (normalised ``[h, w, 3]``, pixel mask ``[h, w]``): scale by the smaller
    ratio (float32, truncated), bilinear with antialias, clip, centred zero pad, then normalise."""
    height, width = image.shape[:2]
    scale = min(np.float32(size[0]) / np.float32(height), np.float32(size[1]) / np.float32(width))
    sh, sw = int(np.float32(height) * scale), int(np.float32(width) * scale)
    resized = F.interpolate(image.permute(2, 0, 1)[None], size=(sh, sw), mode="bilinear", align_corners=False,
                            antialias=True)[0].clamp(0, 1).permute(1, 2, 0)
    top, left = (size[0] - sh) // 2, (size[1] - sw) // 2
    out = torch.zeros(size[0], size[1], 3)
    mask = torch.zeros(size[0], size[1], dtype=torch.bool)
    out[top:top + sh, left:left + sw], mask[top:top + sh, left:left + sw] = resized, True
    return (out - torch.tensor(mean)) / torch.tensor(std), mask


def molmo_image_inputs(image, token_ids: dict[str, int], *, base: int = 336, patch: int = 14, max_crops: int = 12,
                       margins: tuple[int, int] = (4, 4), prefix=(), suffix=(), mean=CLIP_MEAN,
                       std=CLIP_STD) -> dict[str, torch.Tensor]:
    """One image (``[H, W, 3]`` uint8, or float in [0, 1]) -> a batch of one for ``MolmoeText.forward``.

    The public ``MolmoImageProcessor`` (``image_to_patches_and_tokens`` + ``build_image_input_idx``), generic in
    the crop grid ``G = base // patch`` (``G`` even, pooling 2x2 as in the processor's ``(n + 1) // 2``):

    * crops: tiles of ``window = (G - sum(margins)) * patch`` pixels (224 for 336/14), ``select_tiling(h - m,
      w - m, window, max_crops)`` with ``m = sum(margins) * patch`` (112), the image resized-and-padded to
      ``tiles * window + m`` and cut into ``base``-pixel crops at ``y0 = i * window``, ``x0 = j * window``;
      the global image (resized-and-padded to ``base``) is crop 0.
    * tokens: ``<im_start>``, ``G/2`` x (``G/2`` ``<im_patch>`` + ``<im_col>``), ``<im_end>`` for the global
      image, then ``<im_start>``, ``R`` x (``C`` ``<im_patch>`` + ``<im_col>``), ``<im_end>`` with
      ``R = (tiles_h * (G - sum(margins)) + sum(margins) + 1) // 2`` (``8 * tiles_h + 4`` for 336/14), ``C`` alike.
    * ``image_input_idx`` ``[1, 1 + crops, (G/2)^2]``: pooled feature -> its ``<im_patch>`` position; a crop keeps
      pooled rows ``[0, G/2 - right/2)`` if first, ``[left/2, G/2 - right/2)`` in the middle, ``[left/2, G/2)``
      if last, ``[0, G/2)`` if alone (cols alike), numbered row-major across the whole image; dropped: -100.
    * ``image_masks`` ``[1, 1 + crops, G*G]``: the fraction of real pixels per patch of each tiled crop, then one
      row of -1 *appended*: the public processor's ``np.pad(img_mask, [[0, 1], [0, 0]], constant_values=-1)``
      leaves the global image with crop 0's mask and the last crop with -1s; reproduced as published.

    ``prefix``/``suffix`` token ids go before/after the image tokens (``image_input_idx`` shifted), e.g. a BOS
    before and the prompt after, as ``multimodal_preprocess`` does for an image at the start. Not reproduced:
    the chat template and BOS choice of the HF ``MolmoProcessor`` (the caller's ``prefix``/``suffix``), several
    images per sequence, and batching of images with different crop counts (pad crops with -1, their
    ``image_masks`` with -1 and ``image_input_idx`` with -100, as the collator does). Resizing is
    ``F.interpolate(bilinear, antialias=True)``, which torchvision's ``Resize`` calls for tensors. Example::

        ids = image_token_ids(config, tokenizer)
        batch = molmo_image_inputs(pixels, ids, prefix=[bos], suffix=tokenizer.encode(" User: what is this?"))
        logits = model(**batch).logits
    """
    image = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))  # a writable copy
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"image: shape {tuple(image.shape)}, expected [H, W, 3]")
    grid, (left, right) = base // patch, margins
    if base % patch or grid % 2 or left % 2 or right % 2 or left + right >= grid:
        raise InputError(f"image geometry: base {base}, patch {patch}, margins {margins}: expected base = G * patch "
                         "with G even and even margins summing to less than G")
    inner, margin_px = grid - left - right, (left + right) * patch
    tiles = select_tiling(image.shape[0] - margin_px, image.shape[1] - margin_px, inner * patch, max_crops)
    resized = (tiles[0] * inner * patch + margin_px, tiles[1] * inner * patch + margin_px)
    src, pixel_mask = resize_and_pad(image, resized, mean, std)
    kept = [_kept(tiles[a], grid, left, right) for a in (0, 1)]  # per axis: [(first, stop)] pooled cells of each tile
    rows, cols = (tiles[0] * inner + left + right + 1) // 2, (tiles[1] * inner + left + right + 1) // 2
    half = grid // 2
    glob, crop = _block(token_ids, half, half), _block(token_ids, rows, cols)
    pos = torch.arange(half * half)
    index = [1 + (pos // half) * (half + 1) + pos % half]  # the global image's own tokens, in order
    crops, masks, start = [], [], len(glob)  # the crops' <im_start>
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            y0, x0 = i * inner * patch, j * inner * patch
            crops.append(src[y0:y0 + base, x0:x0 + base])
            masks.append(_patch_mean(pixel_mask[y0:y0 + base, x0:x0 + base].float(), patch))
            index.append(_crop_index(kept[0], kept[1], i, j, half, cols, start))
    images = torch.stack([resize_and_pad(image, (base, base), mean, std)[0]] + crops)
    masks.append(torch.full((grid * grid,), -1.0))
    offset = len(prefix)
    idx = torch.stack(index)
    return {"input_ids": torch.tensor([list(prefix) + glob + crop + list(suffix)]),
            "images": _patchify(images, patch)[None], "image_masks": torch.stack(masks)[None],
            "image_input_idx": torch.where(idx >= 0, idx + offset, idx)[None]}


def _block(ids: dict[str, int], rows: int, cols: int) -> list[int]:
    """``<im_start>``, rows x (cols ``<im_patch>`` + ``<im_col>``), ``<im_end>``."""
    return [ids["<im_start>"]] + ([ids["<im_patch>"]] * cols + [ids["<im_col>"]]) * rows + [ids["<im_end>"]]


def _kept(tiles: int, grid: int, left: int, right: int) -> list[tuple[int, int]]:
    """Pooled cells ``[first, stop)`` that each tile along one axis keeps (``crop_y0`` / ``(crop_h + 1) // 2``)."""
    out = []
    for i in range(tiles):
        size = grid - left - right + (left if i == 0 else 0) + (right if i == tiles - 1 else 0)
        first = 0 if i == 0 else left // 2
        out.append((first, first + (size + 1) // 2))
    return out


def _crop_index(kept_rows, kept_cols, i: int, j: int, half: int, cols: int, start: int) -> torch.Tensor:
    """``<im_patch>`` positions of crop (i, j)'s pooled cells, -100 for the cells it drops."""
    out = torch.full((half, half), -100, dtype=torch.long)
    row0 = sum(b - a for a, b in kept_rows[:i])
    col0 = sum(b - a for a, b in kept_cols[:j])
    (r0, r1), (c0, c1) = kept_rows[i], kept_cols[j]
    r = torch.arange(r0, r1)[:, None] - r0 + row0
    c = torch.arange(c0, c1)[None, :] - c0 + col0
    out[r0:r1, c0:c1] = start + 1 + r * (cols + 1) + c
    return out.flatten()


def _patch_mean(mask: torch.Tensor, patch: int) -> torch.Tensor:
    g = mask.shape[0] // patch
    return mask.view(g, patch, g, patch).mean((1, 3)).flatten()


def _patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[T, G*P, G*P, 3]`` -> ``[T, G*G, P*P*3]``: ``(h dh) (w dw) c -> (h w) (dh dw c)``."""
    t, size = images.shape[0], images.shape[1]
    g = size // patch
    return images.view(t, g, patch, g, patch, 3).permute(0, 1, 3, 2, 4, 5).reshape(t, g * g, patch * patch * 3)
