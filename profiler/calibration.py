"""Calibration batches: the demo's own set, text from a ``.txt``/``.jsonl`` file, or image+prompt pairs.

A batch is a dict: ``input_ids`` ``[B, T]``, optional ``images``, optional position-aligned ``labels``
(``-100`` = ignored; absent means next-token prediction on ``input_ids``), and ``modality``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..schemas import InputError

DEMO_CALIB = "demo"


def demo_batches(config, text_windows: int = 48, questions: int = 64, batch: int = 16) -> list[dict]:
    """Training-split text windows and training-split digit questions (never the held-out data)."""
    from ..demo.data import QUESTIONS, digit_images, text_windows as windows, vqa_batch
    from ..demo.model import DemoConfig

    cfg = DemoConfig.from_dict(config)
    out = [{"input_ids": w, "modality": "text"} for w in windows("train", limit=text_windows).split(batch)]
    images, labels = digit_images("train")
    gen = torch.Generator().manual_seed(1234)
    pick = torch.randperm(len(labels), generator=gen)[:questions]
    names = list(QUESTIONS)
    qs = [names[i % len(names)] for i in range(len(pick))]
    ans = [QUESTIONS[q](d) for q, d in zip(qs, labels[pick].tolist())]
    ids, lab, imgs = vqa_batch(cfg, images[pick], qs, ans)
    for s in range(0, len(pick), batch):
        out.append({"input_ids": ids[s:s + batch], "labels": lab[s:s + batch], "images": imgs[s:s + batch],
                    "modality": "image"})
    return out


def text_file_batches(path: Path, tokenizer, seq_len: int = 256, batch: int = 8, max_windows: int = 64) -> list[dict]:
    """Windows of ``seq_len`` tokens from a ``.txt`` file or a ``.jsonl`` file with a ``text`` field."""
    texts = read_texts(path)
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise InputError(f"{path}: {len(ids)} tokens, need at least {seq_len} for one calibration window")
    windows = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return [{"input_ids": w, "modality": "text"} for w in windows.split(batch)]


def read_texts(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: calibration file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        if not raw.strip():
            raise InputError(f"{path}: calibration file is empty")
        return [raw]
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{lineno}: expected an object with a string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise InputError(f"{path}: no records")
    return texts


def batches_hash(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "labels", "images", "images_seq_mask", "images_spatial_crop", "image_masks",
                    "image_input_idx"):
            if b.get(key) is not None:
                h.update(b[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def summary(batches: list[dict], source: str) -> dict:
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    by_modality: dict[str, int] = {}
    for b in batches:
        by_modality[b["modality"]] = by_modality.get(b["modality"], 0) + int(b["input_ids"].numel())
    return {"source": source, "batches": len(batches), "tokens": tokens, "tokens_by_modality": by_modality,
            "sha256": batches_hash(batches)}


IMAGE_INDEX = "index.jsonl"


def image_folder_batches(folder: Path, config: dict, batch: int = 16, tokenizer=None,
                         directory: Path | None = None) -> list[dict]:
    """Image+question+answer batches from ``folder/index.jsonl``, for the demo VLM, DeepSeek-VL2 or MolmoE.

    Each line: ``{"image": "relative/path", "question": "...", "answer": "..."}``. Demo: 8x8 ``.npy``
    arrays with values in [0, 1], or PNGs (converted to grey, resized to 8x8, scaled to [0, 1]).
    DeepSeek-VL2 and MolmoE (need ``tokenizer``; MolmoE also the model ``directory``): any RGB image PIL
    reads, tiled by the model's own processor (``vl2_batches``, ``molmo_batches``). The model's adapter
    picks the builder (``MoEAdapter.image_batches``).
    """
    from ..models import adapter_class

    folder = Path(folder)
    return adapter_class(config, folder).image_batches(folder, config, tokenizer, directory, batch)


def demo_image_batches(folder: Path, config: dict, batch: int = 16) -> list[dict]:
    """Demo VLM batches of ``batch`` questions: 8x8 images, the demo's own prompt and answer tokens."""
    from ..demo.data import vqa_batch
    from ..demo.model import DemoConfig

    records = _image_records(folder)
    images = torch.stack([load_image(folder / r["image"], where) for where, r in records])
    ids, labels, imgs = vqa_batch(DemoConfig.from_dict(config), images, [r["question"] for _, r in records],
                                  [r["answer"] for _, r in records])
    return [{"input_ids": ids[s:s + batch], "labels": labels[s:s + batch], "images": imgs[s:s + batch],
             "modality": "image"} for s in range(0, len(records), batch)]


def vl2_batches(folder: Path, config: dict, tokenizer) -> list[dict]:
    """DeepSeek-VL2 batches, one sample each: prompt ``<image>\n{question} {answer}``, tiles from VL2's processor.

    Labels are the next token at every text position (``-100`` where the next token is an image slot).
    One sample per batch: image token counts differ by hundreds (421 to 2017 per image), and padding
    would run through the routers and count in every expert statistic.
    """
    from ..models.deepseek_vl2_vision import encode

    out = []
    for where, r in _image_records(folder):
        sample = encode(f"<image>\n{r['question']} {r['answer']}", [load_rgb(folder / r["image"], where)],
                        tokenizer, config)
        labels = _text_labels(sample["input_ids"], sample["images_seq_mask"])
        out.append(dict(sample, labels=labels, modality="image"))
    return out


def molmo_batches(folder: Path, config: dict, tokenizer, directory: Path) -> list[dict]:
    """MolmoE batches, one image each (crop counts differ): ``mopeq.vlm.molmo_inputs`` with the text
    `` User: {question} Assistant: {answer}``. Labels are the next token wherever that token is text."""
    from ..models.checkpoint import header
    from ..models.molmo_vision import image_token_ids, vision_geometry
    from ..models.molmoe import geometry, normalise
    from ..vlm import molmo_inputs

    tensors = header(directory)
    cfg = normalise(config, tensors)
    g = vision_geometry(cfg, tensors, geometry(cfg, directory / "config.json")["d"], directory)
    if g is None:
        raise InputError(f"{directory}: no model.vision_backbone.* tensors: this MolmoE checkpoint runs text only")
    special = torch.tensor(sorted(image_token_ids(cfg, tokenizer).values()))
    out = []
    for where, r in _image_records(folder):
        b = molmo_inputs(cfg, g, tokenizer, load_rgb(folder / r["image"], where),
                         f" User: {r['question']} Assistant: {r['answer']}")
        labels = _text_labels(b["input_ids"], torch.isin(b["input_ids"], special))
        out.append(dict(b, labels=labels, modality="image"))
    return out


def _text_labels(ids: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` next-token labels, ``-100`` where the next token is an image slot (and at the end)."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(image_slots[:, 1:], -100, ids[:, 1:])
    return labels


def load_rgb(path: Path, where: str):
    """A PIL RGB image from any file PIL reads (``.npy`` arrays ``[H, W, 3]`` uint8 too)."""
    import numpy as np
    from PIL import Image

    if not path.is_file():
        raise InputError(f"{where}: image {path} not found")
    if path.suffix == ".npy":
        arr = read_npy(path, where)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(f"{where}: {path} has shape {arr.shape} dtype {arr.dtype}, expected uint8 [H, W, 3]")
        return Image.fromarray(arr)
    return open_image(path, where, "RGB")


def open_image(path: Path, where: str, mode: str):
    """The image file at ``path`` decoded and converted to PIL ``mode``; any unreadable file is an
    ``InputError`` (PIL reports damage as ``OSError``, ``SyntaxError``, ``ValueError`` or a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{where}: {path} is not a readable image ({' '.join(str(exc).split())[:200]})") from None


def _image_records(folder: Path) -> list[tuple[str, dict]]:
    index = folder / IMAGE_INDEX
    if not index.is_file():
        raise InputError(f"{folder}: no {IMAGE_INDEX} (one JSON object per line with image, question, answer)")
    return read_qa_jsonl(index)


def read_qa_jsonl(path: Path) -> list[tuple[str, dict]]:
    """``(file:line, record)`` for each ``{"image", "question", "answer"[, "choices"]}`` line of a JSONL file.

    ``choices`` (multiple choice) must be a list of strings that contains the answer.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("image", "question", "answer")):
            raise InputError(f"{where}: expected an object with string fields 'image', 'question', 'answer'")
        choices = record.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
                                    or record["answer"] not in choices):
            raise InputError(f"{where}: 'choices' must be a list of strings containing the answer")
        out.append((where, record))
    if not out:
        raise InputError(f"{path}: no records")
    return out


def read_npy(path: Path, where: str):
    """A numpy array from an ``.npy`` file (no pickles); any malformed file is an ``InputError``.

    ``np.load`` reports a corrupt header as ``ValueError``, ``EOFError``, ``SyntaxError`` or even
    ``tokenize.TokenError`` (bench/fuzz.py found the last one)."""
    import tokenize

    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as exc:
        raise InputError(f"{where}: {path} is not a numpy array ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{where}: {path} holds an archive, expected one array")
    return arr


def load_image(path: Path, where: str, size: int = 8) -> torch.Tensor:
    """An ``[8, 8]`` float image in [0, 1] from ``.npy`` or ``.png``."""
    import numpy as np

    if not path.is_file():
        raise InputError(f"{where}: image {path} not found")
    if path.suffix == ".npy":
        arr = read_npy(path, where)
        if arr.shape != (size, size) or not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"{where}: {path} has shape {arr.shape} dtype {arr.dtype}, expected numeric ({size}, {size})")
        return torch.tensor(arr, dtype=torch.float32).clamp(0, 1)
    if path.suffix.lower() == ".png":
        from PIL import Image

        img = open_image(path, where, "L").resize((size, size), Image.BILINEAR)
        return torch.tensor(np.asarray(img, dtype=np.float32) / 255.0)
    raise InputError(f"{where}: {path} has suffix {path.suffix!r}, expected .npy or .png")
