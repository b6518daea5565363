"""DeepSeek-VL2's image path: SigLIP encoder, downsampling MLP projector, tile layout, processor.

Re-derived from the public source (code-search index; forks where deepseek-ai/DeepSeek-VL2 lacks a
file: FyrbyAdditive/DeepSeek-VL2 and kerbymart/DeepSeek-VL2 for ``modeling_deepseek_vl_v2.py``,
sheryc/DeepSeek-VL2-Latest for ``processing_deepseek_vl_v2.py``; ``siglip_vit.py`` from deepseek-ai):

* **Encoder** (``DeepseekVLV2ForCausalLM.__init__`` builds ``siglip_vit.VisionTransformer`` directly,
  not through ``create_siglip_vit``): timm ViT, ``qkv_bias=True``, no class/register tokens, learned
  ``pos_embed [1, N, W]``, pre-norm blocks, LayerNorm eps 1e-6, GELU(tanh), MLP width
  ``int(W * mlp_ratio)``, final ``norm`` applied, and with ``ignore_head=True`` the ``attn_pool``
  head is built but never run: the output is ``[tiles, N, W]``. That is transformers'
  ``SiglipVisionModel`` with ``vision_use_head=False`` and ``hidden_act="gelu_pytorch_tanh"``, which
  mopeq builds; ``VISION_KEYS`` maps the timm names onto it (the fused ``attn.qkv`` rows are
  ``[q; k; v]``, head-major, so they split into ``q_proj``/``k_proj``/``v_proj``; ``pos_embed`` drops its
  batch axis). ``vision.attn_pool.*`` rides along as frozen, never-run parameters under ``vision_head.``.
* **Projector** (``MlpProjector``, ``projector_type: downsample_mlp_gelu``): zero-pad the ``h x h`` token
  grid at the bottom/right to a multiple of ``r = downsample_ratio``, ``F.unfold(kernel=r, stride=r)``
  (channel-major: feature ``c*r*r + ki*r + kj``), then ``layers`` = Linear(in*r*r, n_embed*mlp_ratio),
  ``depth-2`` x [GELU, Linear], GELU, Linear(-> n_embed) (exact GELU).
* **Token layout** (``prepare_inputs_embeds``, ``tile_tag: 2D``): per image the global tile's
  ``h x w`` grid plus an ``image_newline`` column, ``view_seperator``, then the local tiles (row-major,
  ``ty * nw + tx``) stitched into one ``(nh*h) x (nw*w)`` grid plus a newline column; ``global_view_pos:
  tail`` puts local first. The features fill the ``images_seq_mask`` positions in order
  (``masked_scatter``). ``images_spatial_crop`` rows are ``(num_width_tiles, num_height_tiles)``; a zero
  row ends a sample's images.
* **Processor** (``DeepseekVLV2Processor``): normalise ``(x/255 - 0.5)/0.5``; best resolution among
  ``candidate_resolutions`` (max effective pixels, then least waste) when the prompt has at most two
  images, else one tile; global view = ``ImageOps.pad`` to ``image_size`` with grey (127) fill, local
  view = ``ImageOps.pad`` to the best resolution, cut row by row into ``image_size`` tiles;
  ``h = w = ceil((image_size // patch_size) / downsample_ratio)`` and ``h*(w+1) + 1 + (nh*h)*(nw*w+1)``
  ``<image>`` tokens per image.

Not found publicly (so not reproduced): the real checkpoints' ``config.json`` values and the
``<image>`` token id (read from the tokenizer here); VL2's chat template (calibration prompts here are
``<image>\\n{question} {answer}``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..schemas import InputError

# ``VisionEncoderConfig`` / ``MlpProjectorConfig`` defaults (modeling_deepseek_vl_v2.py): keys a config omits.
VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4,
                   "ignore_head": True, "class_token": False}
PROJECTOR_DEFAULTS = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048, "depth": 2,
                      "mlp_ratio": 1, "downsample_ratio": 2, "token_pooling": False}
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5
IMAGE_TOKEN = "<image>"


def vision_settings(config: dict, where: Path) -> tuple[dict, dict]:
    """The vision and projector settings of a ``deepseek_vl_v2`` config.json, defaults filled in."""
    vc = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
    pc = {**PROJECTOR_DEFAULTS, **(config.get("projector_config") or {})}
    where = Path(where) / "config.json"
    if vc["class_token"] or not vc["ignore_head"]:
        raise InputError(f"{where}: vision_config needs class_token false and ignore_head true (as every "
                         f"DeepSeek-VL2 checkpoint has); got class_token={vc['class_token']}, ignore_head={vc['ignore_head']}")
    if pc["projector_type"] != "downsample_mlp_gelu" or pc["token_pooling"]:
        raise InputError(f"{where}: projector_config.projector_type {pc['projector_type']!r} "
                         f"(token_pooling={pc['token_pooling']}); only downsample_mlp_gelu is supported")
    if pc["input_dim"] != vc["width"]:
        raise InputError(f"{where}: projector_config.input_dim {pc['input_dim']} != vision_config.width {vc['width']}")
    if config.get("tile_tag", "2D") != "2D":
        raise InputError(f"{where}: tile_tag {config.get('tile_tag')!r}; only '2D' is supported (1D is abandoned upstream)")
    return vc, pc


def vision_params(config: dict) -> int:
    """Parameters of VL2's image path from its config alone: encoder, ``attn_pool`` head (stored, never run)
    when ``global_pool`` is ``map``, projector, ``image_newline`` and ``view_seperator``."""
    vc, pc = vision_settings(config, Path("."))
    w, f, p = vc["width"], int(vc["width"] * vc["mlp_ratio"]), vc["patch_size"]
    n = (vc["image_size"] // p) ** 2
    mlp = 2 * f * w + f + w
    block = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + mlp
    encoder = (3 * p * p * w + w) + n * w + vc["layers"] * block + 2 * w
    head = w + (w * w + w) + (2 * w * w + 2 * w) + (w * w + w) + 2 * w + mlp if vc.get("global_pool", "map") == "map" else 0
    r, hidden, d = pc["downsample_ratio"], pc["n_embed"] * pc["mlp_ratio"], pc["n_embed"]
    projector = (pc["input_dim"] * r * r * hidden + hidden) + max(pc["depth"] - 2, 0) * (hidden * hidden + hidden) \
        + (hidden * d + d)
    return encoder + head + projector + 2 * d


def siglip_config(vc: dict):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=vc["width"], intermediate_size=int(vc["width"] * vc["mlp_ratio"]),
                              num_hidden_layers=vc["layers"], num_attention_heads=vc["heads"], num_channels=3,
                              image_size=vc["image_size"], patch_size=vc["patch_size"],
                              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
                              vision_use_head=False)


class MlpProjector(nn.Module):
    """``downsample_mlp_gelu``: ``r x r`` token blocks concatenated channel-major, then an MLP."""

    def __init__(self, pc: dict):
        super().__init__()
        r, hidden = pc["downsample_ratio"], pc["n_embed"] * pc["mlp_ratio"]
        mods: list[nn.Module] = [nn.Linear(pc["input_dim"] * r * r, hidden)]
        for _ in range(max(pc["depth"] - 2, 0)):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        mods += [nn.GELU(), nn.Linear(hidden, pc["n_embed"])]
        self.layers = nn.Sequential(*mods)
        self.ratio = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, hw, c = x.shape
        h, r = math.isqrt(hw), self.ratio
        pad = (r - h % r) % r
        x = nn.functional.pad(x.view(bs, h, h, c), (0, 0, 0, pad, 0, pad)).permute(0, 3, 1, 2)
        x = nn.functional.unfold(x, kernel_size=r, stride=r).permute(0, 2, 1)  # [bs, (H/r)(W/r), c*r*r]
        return self.layers(x)


def build_vision(model: nn.Module, vc: dict, pc: dict) -> None:
    """Attach ``vision`` (SigLIP), ``projector``, ``image_newline`` and ``view_seperator`` to ``model``."""
    from transformers import SiglipVisionModel

    model.vision = SiglipVisionModel(siglip_config(vc))
    model.projector = MlpProjector(pc)
    model.image_newline = nn.Parameter(torch.zeros(pc["n_embed"]))
    model.view_seperator = nn.Parameter(torch.zeros(pc["n_embed"]))  # (sic), the checkpoint's spelling


def checkpoint_keys(vc: dict, pc: dict) -> list[str]:
    """Every tensor name VL2's image path reads from a checkpoint (``attn_pool``, never run, excluded)."""
    keys = ["vision.patch_embed.proj.weight", "vision.patch_embed.proj.bias", "vision.pos_embed",
            "vision.norm.weight", "vision.norm.bias", "image_newline", "view_seperator"]
    for i in range(vc["layers"]):
        keys += [f"vision.blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")]
    linears = 2 + max(pc["depth"] - 2, 0)
    return keys + [f"projector.layers.{2 * j}.{p}" for j in range(linears) for p in ("weight", "bias")]


def check_checkpoint(tensors: dict, vc: dict, pc: dict, where: Path) -> None:
    """Refuse a checkpoint with part of the image path, naming the first missing tensor by its checkpoint name."""
    missing = [k for k in checkpoint_keys(vc, pc) if k not in tensors]
    if missing:
        raise InputError(f"{where}: tensor {missing[0]} missing from the checkpoint (DeepSeek-VL2's image path "
                         f"needs all {len(checkpoint_keys(vc, pc))} vision/projector tensors; {len(missing)} missing)")


# timm (checkpoint) name under ``vision.`` -> SiglipVisionModel state-dict name, and how to convert.
VISION_KEYS = [
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.out_proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
]
QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
HEAD = "vision_head."  # in-memory root of the never-run ``vision.attn_pool.*`` tensors


def vision_to_memory(tensors: dict) -> dict:
    """Checkpoint ``vision.*`` names (timm) -> the in-memory names of the SigLIP rebuild; other keys unchanged.

    Works on tensors and on ``(shape, dtype)`` header entries alike (``attach_frozen`` input).
    """
    out = {}
    for key, value in tensors.items():
        if not key.startswith("vision."):
            out[key] = value
            continue
        rest = key[len("vision."):]
        qkv = QKV.match(rest)
        if qkv:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), _chunk3(value)):
                out[f"vision.encoder.layers.{qkv[1]}.self_attn.{name}.{qkv[2]}"] = part
            continue
        for pattern, target in VISION_KEYS:
            if pattern.match(rest):
                new = pattern.sub(target, rest)
                out[f"vision.{new}"] = _squeeze0(value) if rest == "pos_embed" else value
                break
        else:
            out[HEAD + rest] = value  # attn_pool.* (and anything else VL2 builds but never runs)
    return out


def _chunk3(value):
    if isinstance(value, torch.Tensor):
        return value.chunk(3, dim=0)
    shape, dtype = value
    return [((shape[0] // 3, *shape[1:]), dtype)] * 3


def _squeeze0(value):
    if isinstance(value, torch.Tensor):
        return value.reshape(value.shape[-2], value.shape[-1])
    shape, dtype = value
    return (tuple(shape[-2:]), dtype)


def image_embeds(model: nn.Module, input_ids: torch.Tensor, images: torch.Tensor, images_seq_mask: torch.Tensor,
                 images_spatial_crop: torch.Tensor, global_view_pos: str = "head") -> torch.Tensor:
    """``prepare_inputs_embeds``: text embeddings with every image's tile features in its ``<image>`` slots.

    ``images`` ``[B, max_tiles, 3, S, S]``, ``images_seq_mask`` ``[B, T]`` bool, ``images_spatial_crop``
    ``[B, max_images, 2]`` (``num_width_tiles, num_height_tiles``).
    """
    embeds = model.language.get_input_embeddings()(input_ids)
    crops = images_spatial_crop.tolist()
    counts = [sum(1 + nw * nh for nw, nh in _valid(rows)) for rows in crops]
    if not sum(counts):
        return embeds
    tiles = torch.cat([images[b, :n] for b, n in enumerate(counts)]).to(embeds.dtype)
    feats = model.projector(model.vision(pixel_values=tiles).last_hidden_state)  # [tiles, h*w, D]
    h = math.isqrt(feats.shape[1])
    d, newline, sep = feats.shape[-1], model.image_newline.to(feats.dtype), model.view_seperator.to(feats.dtype)
    out, pos = [], 0
    for b, rows in enumerate(crops):
        parts = []
        for nw, nh in _valid(rows):
            glob, local = feats[pos], feats[pos + 1 : pos + 1 + nw * nh]
            pos += 1 + nw * nh
            glob = torch.cat([glob.view(h, h, d), newline.expand(h, 1, d)], 1).reshape(-1, d)
            local = local.view(nh, nw, h, h, d).permute(0, 2, 1, 3, 4).reshape(nh * h, nw * h, d)
            local = torch.cat([local, newline.expand(nh * h, 1, d)], 1).reshape(-1, d)
            parts += [glob, sep[None], local] if global_view_pos == "head" else [local, sep[None], glob]
        mask = images_seq_mask[b].bool()
        if not parts:
            out.append(embeds[b])
            continue
        values = torch.cat(parts).to(embeds.dtype)
        if int(mask.sum()) != values.shape[0]:
            raise InputError(f"images_seq_mask: sample {b} marks {int(mask.sum())} image tokens, its "
                             f"{len(_valid(rows))} image(s) give {values.shape[0]} features")
        out.append(embeds[b].masked_scatter(mask.unsqueeze(-1), values))
    return torch.stack(out)


def _valid(rows: list) -> list:
    out = []
    for nw, nh in rows:
        if nw == 0 or nh == 0:
            break
        out.append((int(nw), int(nh)))
    return out


# --- processor ---------------------------------------------------------------------------------------
def select_best_resolution(size: tuple[int, int], candidates: list) -> tuple[int, int]:
    """The candidate ``(w, h)`` keeping the most of an image of ``size = (w, h)``, then the least waste."""
    w0, h0 = size
    best, best_eff, best_waste = None, -1, math.inf
    for w, h in candidates:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    return best


def tokens_per_image(image_size: int, patch_size: int, ratio: int, nw: int, nh: int) -> int:
    h = math.ceil((image_size // patch_size) / ratio)
    return h * (h + 1) + 1 + (nh * h) * (nw * h + 1)


def _to_tensor(img) -> torch.Tensor:
    import numpy as np

    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (arr / 255 - IMAGE_MEAN) / IMAGE_STD


def image_tiles(img, config: dict, cropping: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[1 + nw*nh, 3, S, S]`` tiles (global first, then row by row) and ``(nw, nh)`` for a PIL image;
    without ``cropping`` the local view is one ``S x S`` tile."""
    from PIL import ImageOps

    img = img.convert("RGB")  # as VL2's processor does before padding (grey, palette, alpha images)
    vc, _ = vision_settings(config, Path("."))
    candidates = [tuple(c) for c in config.get("candidate_resolutions") or [(vc["image_size"], vc["image_size"])]]
    size = int(candidates[0][0])
    best = select_best_resolution(img.size, candidates) if cropping else (size, size)
    fill = tuple(int(IMAGE_MEAN * 255) for _ in range(3))
    tiles = [_to_tensor(ImageOps.pad(img, (size, size), color=fill))]
    local = ImageOps.pad(img, best, color=fill)
    for y in range(0, best[1], size):
        for x in range(0, best[0], size):
            tiles.append(_to_tensor(local.crop((x, y, x + size, y + size))))
    return torch.stack(tiles), (best[0] // size, best[1] // size)


def encode(text: str, images: list, tokenizer, config: dict, cropping: bool | None = None) -> dict:
    """One sample: ``text`` with one ``<image>`` per image -> input_ids, images, images_seq_mask, images_spatial_crop.

    Each ``<image>`` becomes ``tokens_per_image`` copies of the tokenizer's ``<image>`` id; a BOS leads
    when the tokenizer has one. More than two images use one tile each (VL2's ``cropping`` rule).
    """
    vc, pc = vision_settings(config, Path("."))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise InputError(f"tokenizer: has no {IMAGE_TOKEN!r} token (DeepSeek-VL2 prompts need it)")
    segments = text.split(IMAGE_TOKEN)
    if len(segments) - 1 != len(images):
        raise InputError(f"prompt: {len(segments) - 1} {IMAGE_TOKEN} placeholders for {len(images)} images")
    cropping = len(images) <= 2 if cropping is None else cropping
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    mask, tiles, crops = [False] * len(ids), [], []
    for i, segment in enumerate(segments):
        part = tokenizer.encode(segment, add_special_tokens=False)
        ids += part
        mask += [False] * len(part)
        if i == len(images):
            break
        t, (nw, nh) = image_tiles(images[i], config, cropping)
        tiles.append(t)
        crops.append([nw, nh])
        n = tokens_per_image(int(t.shape[-1]), vc["patch_size"], pc["downsample_ratio"], nw, nh)
        ids += [image_id] * n
        mask += [True] * n
    return {"input_ids": torch.tensor([ids]), "images_seq_mask": torch.tensor([mask]),
            "images": torch.cat(tiles)[None] if tiles else None,
            "images_spatial_crop": torch.tensor([crops] if crops else [[[0, 0]]])}
