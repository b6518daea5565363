"""GPTQ-style error compensation for group-wise quantization, from each expert's routed-input Gram.

For one ``[N, K]`` weight ``W`` and the Gram ``H = X^T X`` (``[K, K]``) of the inputs it sees, GPTQ
minimises ``tr((W - Q) H (W - Q)^T)`` one input column at a time: column ``k`` is rounded with the
group's scale and zero point, and its error ``e_k = (w_k - q_k) / [H^-1]_kk`` is spread over the
columns not yet quantized, ``W[:, k+1:] -= e_k [H^-1]_{k, k+1:}`` (Frantar et al., 2022), computed
with the upper Cholesky factor of ``H^-1`` and lazy block updates.

Groups: with the default column order each group's scale/zero point is chosen (with the same RTN
rule as ``quantize``, clip search included) from the *updated* columns when the sweep reaches the
group; with ``act_order`` columns go in decreasing ``diag(H)`` and groups are fixed up front from the
original weight ("static groups"), so the stored layout stays contiguous groups along the input.

Gram inputs: ``gate``/``up`` see the routed hidden states, ``down`` the activated intermediate
``act(x W_gate^T) * (x W_up^T)``. Rows are weighted by the routing weight ``g_t`` (``X^T G^2 X``)
or not at all (``X^T X``), as ``profiler/gram.py`` recorded them.

Fallbacks, never a NaN scale: no Gram, fewer than ``min_tokens`` routed tokens, a zero or non-finite
Gram, or a Cholesky that fails after raising the dampening three times all give plain RTN
(``quantize``). Input columns that never fire (``H_kk = 0``) get ``H_kk = 1`` so they are rounded
without spreading error. Dampening adds ``damp * mean(diag H)`` to the diagonal.

The output is a ``QuantizedWeight`` exactly like ``quantize``'s: ``dequantize`` reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from ..schemas import InputError
from .quantize import QuantizedWeight, num_groups, quantize

GRAMS_VERSION = 1
GRAM_INPUT = {"gate": "in", "up": "in", "down": "mid"}  # matrix -> which Gram of its expert


class Quantizer(str, Enum):
    RTN = "rtn"
    GPTQ = "gptq"


class GramWeighting(str, Enum):
    NONE = "none"  # H = X^T X
    ROUTING = "routing"  # H = X^T G^2 X, g_t the routing weight of token t


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01
    act_order: bool = False
    min_tokens: int = 16

    def to_dict(self) -> dict:
        return {"damp": self.damp, "act_order": self.act_order, "min_tokens": self.min_tokens}


def _inverse_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` in float64, None if it fails."""
    h = gram.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    for attempt in range(4):
        damped = h + (damp * 10**attempt) * mean_diag * torch.eye(len(h), dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper
    return None


def _usable(gram: torch.Tensor | None, k: int, tokens: int | None, settings: GPTQSettings) -> bool:
    if gram is None or tuple(gram.shape) != (k, k):
        return False
    if tokens is not None and tokens < settings.min_tokens:
        return False
    return bool(torch.isfinite(gram).all()) and float(torch.diagonal(gram).sum()) > 0


def _group_params(cols: torch.Tensor, bits: int, symmetric: bool, clip_search: bool, scale_dtype):
    """RTN scale and zero point of one group ``[N, g]``, exactly as ``quantize`` picks them."""
    q = quantize(cols, bits, cols.shape[1], symmetric, clip_search, scale_dtype)
    zero = q.zero.float()[:, 0] if q.zero is not None else torch.full((len(cols),), 2.0 ** (bits - 1))
    return q.scale.float()[:, 0], zero


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor | None, bits: int, group_size: int,
                  symmetric: bool = False, clip_search: bool = False, tokens: int | None = None,
                  settings: GPTQSettings = GPTQSettings(),
                  scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """GPTQ of a ``[N, K]`` weight given its input Gram ``[K, K]``; RTN when the Gram is unusable.

    Example: ``gptq_quantize(w, x.T @ x, 2, 128).codes.shape == w.shape``.
    """
    n, k = w.shape
    if not _usable(gram, k, tokens, settings):
        return quantize(w, bits, group_size, symmetric, clip_search, scale_dtype)
    upper = _inverse_cholesky(gram, settings.damp)
    if upper is None:
        return quantize(w, bits, group_size, symmetric, clip_search, scale_dtype)
    gs = min(group_size, k)
    order = torch.argsort(torch.diagonal(gram), descending=True, stable=True) if settings.act_order \
        else torch.arange(k)
    static = _static_params(w, bits, gs, symmetric, clip_search, scale_dtype) if settings.act_order else None
    codes, scale, zero = _sweep(w.detach().double()[:, order], upper[order][:, order], order, bits, gs,
                                symmetric, clip_search, scale_dtype, static)
    return QuantizedWeight(codes, scale.to(scale_dtype), None if symmetric else zero.to(torch.uint8), bits, gs)


def _static_params(w, bits, gs, symmetric, clip_search, scale_dtype):
    q = quantize(w, bits, gs, symmetric, clip_search, scale_dtype)
    zero = q.zero.float() if q.zero is not None else torch.full(q.scale.shape, 2.0 ** (bits - 1))
    return q.scale.float(), zero


def _sweep(work, upper, order, bits, gs, symmetric, clip_search, scale_dtype, static):
    """The column sweep over ``work`` (columns already in ``order``), in blocks of ``gs`` columns.

    Returns codes ``[N, K]`` (original column order), scale and zero point ``[N, G]``.
    """
    n, k = work.shape
    qmax = 2**bits - 1
    scale = torch.zeros(n, num_groups(k, gs)) if static is None else static[0]
    zero = torch.zeros(n, num_groups(k, gs)) if static is None else static[1]
    codes = torch.zeros(n, k, dtype=torch.uint8)
    for start in range(0, k, gs):
        stop = min(start + gs, k)
        block, err = work[:, start:stop].clone(), torch.zeros(n, stop - start, dtype=work.dtype)
        if static is None:  # dynamic groups: blocks coincide with groups in natural order
            scale[:, start // gs], zero[:, start // gs] = _group_params(
                block.float(), bits, symmetric, clip_search, scale_dtype)
        for i in range(stop - start):
            col = int(order[start + i])
            s, z = scale[:, col // gs].double(), zero[:, col // gs].double()
            q = (block[:, i].float() / s.float() + z.float()).round().clamp(0, qmax).double()
            codes[:, col] = q.to(torch.uint8)
            err[:, i] = (block[:, i] - (q - z) * s) / upper[start + i, start + i]
            block[:, i:] -= err[:, i:i + 1] * upper[start + i, start + i:stop][None]
        work[:, stop:] -= err @ upper[start:stop, stop:]
    return codes, scale, zero


class GramFile:
    """Read-only access to ``grams.safetensors`` (written by ``mopeq.profiler.gram``), one Gram at a time.

    Names: ``L{layer}.E{j}.in`` ``[H, H]``, ``L{layer}.E{j}.mid`` ``[I, I]``, shared experts
    ``L{layer}.S0.*``; metadata: version, weighting, config hash, tokens per expert (JSON).
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: Gram file not found")
        try:
            self._file = safe_open(str(self.path), "pt")
            meta = self._file.metadata() or {}
            self.tokens = {k: int(v) for k, v in json.loads(meta.get("tokens", "{}")).items()}
        except Exception as exc:  # safetensors raises its own types for bad headers
            raise InputError(f"{self.path}: not a Gram file ({exc})") from None
        if meta.get("mopeq_grams_version") != str(GRAMS_VERSION):
            raise InputError(f"{self.path}: Gram file version {meta.get('mopeq_grams_version')!r}, "
                             f"expected '{GRAMS_VERSION}'; re-run the Gram collection")
        self.meta = meta
        self.names = set(self._file.keys())

    def check_model(self, config_hash: str) -> None:
        if self.meta.get("config_hash") != config_hash:
            raise InputError(f"{self.path}: Grams were collected on another model (config hash "
                             f"{self.meta.get('config_hash')}, plan has {config_hash})")

    def gram(self, expert_id: str, matrix: str) -> torch.Tensor | None:
        name = f"{expert_id}.{GRAM_INPUT[matrix]}"
        return self._file.get_tensor(name) if name in self.names else None
