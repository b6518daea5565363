"""Dequant-GEMV (decode) and dequant-GEMM (prefill) over packed 2/3/4/8-bit weights, in Triton.

Kernel layout (``KernelWeights``, built once at load time by ``repack`` from the canonical
``PackedMatrix`` format of ``mopeq.compiler.pack``): one or more *entries* (matrices of one shape
``[N, K]``, e.g. every expert's ``gate``) concatenated into flat buffers with offsets in ``meta``.

- Codes are split into power-of-two *bit planes* so that no code straddles a word: 2, 4 and 8 bits
  are one plane of that width; 3 bits are a 2-bit plane (low bits) followed by a 1-bit plane (high
  bit). A plane of ``b`` bits holds ``32 // b`` codes per int32 word, LSB first along the input dim
  (the canonical layout), each row padded with zero codes to ``k_pad = ceil(K / 32) * 32`` columns:
  ``[N, k_pad * b / 32]`` words. For 2/4/8 bits this is the canonical packing with padded rows.
- Scales ``[N, n_groups]`` (and uint8 zero points, when any entry is asymmetric) are re-expressed
  over a power-of-two *kernel group* ``group`` dividing every entry's group size, so a tile of
  ``BLOCK_K`` columns sees either one scale per row or ``BLOCK_K // group`` of them.
- ``meta`` int64 ``[E, 4]``: ``(bits, lo_plane_word_offset, hi_plane_word_offset, group_offset)``.

Weights dequantize as ``w = (q - zero) * scale`` with ``zero = 2**(bits-1)`` for symmetric entries;
accumulation is fp32 whatever the activation dtype (fp16, bf16 or fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..compiler.pack import unpack_int32

# bits -> power-of-two planes (low bits first). 3-bit = 2-bit plane + 1-bit plane.
BIT_PLANES = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
K_ALIGN = 32  # rows are padded to whole words of the 1-bit plane


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
@triton.jit
def _unpack_plane(base, rows, row_ok, k0, k_pad, PLANE_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """int32 codes ``[BLOCK_N, BLOCK_K]`` of columns ``k0 ..`` from a plane of ``PLANE_BITS`` bits."""
    per_word: tl.constexpr = 32 // PLANE_BITS
    words_per_row = k_pad // per_word
    cols = k0 // per_word + tl.arange(0, BLOCK_K // per_word)
    ptrs = base + rows[:, None] * words_per_row + cols[None, :]
    words = tl.load(ptrs, mask=row_ok[:, None] & (cols < words_per_row)[None, :], other=0)
    shifts = tl.arange(0, per_word) * PLANE_BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << PLANE_BITS) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _load_codes(lo_ptr, hi_ptr, rows, row_ok, k0, k_pad, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    if BITS == 3:
        low = _unpack_plane(lo_ptr, rows, row_ok, k0, k_pad, 2, BLOCK_N, BLOCK_K)
        codes = low | (_unpack_plane(hi_ptr, rows, row_ok, k0, k_pad, 1, BLOCK_N, BLOCK_K) << 2)
    else:
        codes = _unpack_plane(lo_ptr, rows, row_ok, k0, k_pad, BITS, BLOCK_N, BLOCK_K)
    return codes.to(tl.float32)


@triton.jit
def _dequant_tile(lo_ptr, hi_ptr, scale_ptr, zero_ptr, rows, row_ok, k0, k_pad, n_groups,
                  BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights ``[BLOCK_N, BLOCK_K]``: rows ``rows`` [BLOCK_N], columns ``k0 .. k0+BLOCK_K``."""
    codes = _load_codes(lo_ptr, hi_ptr, rows, row_ok, k0, k_pad, BITS, BLOCK_N, BLOCK_K)
    if GROUP >= BLOCK_K:  # one scale per row in this tile
        g = rows * n_groups + k0 // GROUP
        scale = tl.load(scale_ptr + g, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            codes = codes - tl.load(zero_ptr + g, mask=row_ok, other=0).to(tl.float32)[:, None]
        else:
            codes = codes - (1 << (BITS - 1))
        w = codes * scale
    else:  # BLOCK_K // GROUP scales per row
        per_tile: tl.constexpr = BLOCK_K // GROUP
        cols = k0 // GROUP + tl.arange(0, per_tile)
        g = rows[:, None] * n_groups + cols[None, :]
        ok = row_ok[:, None] & (cols < n_groups)[None, :]
        scale = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        codes = tl.reshape(codes, (BLOCK_N, per_tile, GROUP))
        if HAS_ZERO:
            codes = codes - tl.load(zero_ptr + g, mask=ok, other=0).to(tl.float32)[:, :, None]
        else:
            codes = codes - (1 << (BITS - 1))
        w = tl.reshape(codes * scale, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _multiply_add(acc, x, w, USE_DOT: tl.constexpr):
    """acc ``[BM, BN]`` fp32 += x ``[BM, BK]`` @ w ``[BN, BK]``^T; tensor cores when ``USE_DOT``."""
    if USE_DOT:
        if x.dtype == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    else:
        acc = acc + tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _matmul_loop(x_ptr, x_rows, x_ok, lo_ptr, hi_ptr, scale_ptr, zero_ptr, rows, row_ok, K, k_pad,
                 n_groups, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_N]`` = x[x_rows, :K] @ W[rows, :K]^T; x is row-major with row stride K."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + x_rows[:, None] * K + ks[None, :], mask=x_ok[:, None] & (ks < K)[None, :],
                    other=0.0)
        w = _dequant_tile(lo_ptr, hi_ptr, scale_ptr, zero_ptr, rows, row_ok, k0, k_pad, n_groups,
                          BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K)
        acc = _multiply_add(acc, x, w, BLOCK_M >= 16)
    return acc


@triton.jit
def dequant_matmul_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, k_pad, n_groups,
                          BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out ``[M, N]`` = x ``[M, K]`` @ dequant(W)^T for one entry of a ``KernelWeights``.

    x: fp16/bf16/fp32 ``[M, K]`` contiguous; words_ptr: int32, the entry's planes (the 1-bit plane of
    3-bit weights follows the 2-bit plane); scale_ptr ``[N, n_groups]`` fp16/bf16/fp32; zero_ptr
    uint8 ``[N, n_groups]`` (ignored unless ``HAS_ZERO``); out ``[M, N]``. ``BLOCK_M < 16`` reduces
    on CUDA cores (GEMV), ``BLOCK_M >= 16`` uses ``tl.dot`` (GEMM). Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    x_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hi_ptr = words_ptr + N * (k_pad // 16)
    acc = _matmul_loop(x_ptr, x_rows, x_rows < M, words_ptr, hi_ptr, scale_ptr, zero_ptr, rows, rows < N,
                       K, k_pad, n_groups, BITS, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (x_rows < M)[:, None] & (rows < N)[None, :]
    tl.store(out_ptr + x_rows[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
@dataclass
class KernelWeights:
    """Entries of one shape ``[n, k]`` repacked for the kernels (see the module docstring).

    words int32 ``[total_words]``; scale ``[total_groups]`` (fp16/bf16/fp32); zero uint8
    ``[total_groups]`` or None (all entries symmetric); meta int64 ``[E, 4]`` on the device and
    ``entries`` its host copy (bits, lo word offset, hi word offset, group offset).
    """

    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    meta: torch.Tensor
    entries: list[tuple[int, int, int, int]]
    n: int
    k: int
    k_pad: int
    group: int
    n_groups: int

    @property
    def has_zero(self) -> bool:
        return self.zero is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero) if t is not None)


@dataclass(frozen=True)
class Blocks:
    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 2


def gemv_or_gemm_blocks(m: int, n: int, k: int) -> Blocks:
    """Default tiles: reduction on CUDA cores below 16 rows, tensor cores above."""
    if m < 16:
        return Blocks(1, 16, 256, warps=4, stages=3)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return Blocks(block_m, 64, 128, warps=4, stages=3)


def fp32_blocks(blocks: Blocks, dtype: torch.dtype) -> Blocks:
    """fp32 tl.dot runs as exact FMAs (no TF32): keep its tiles small, or the code (and compile) balloons."""
    if dtype != torch.float32 or blocks.m < 16:
        return blocks
    return Blocks(16, min(blocks.n, 32), min(blocks.k, 64), blocks.warps, blocks.stages)


def dequant_matmul(x: torch.Tensor, weights: KernelWeights, entry: int = 0, blocks: Blocks | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(weights[entry]).T -> [..., N]`` in x's dtype (fp32 accumulation).

    Example: ``dequant_matmul(torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16), repack([m]))``.
    """
    if x.shape[-1] != weights.k:
        raise ValueError(f"x: got last dim {x.shape[-1]}, expected K={weights.k}")
    x2 = x.reshape(-1, weights.k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, weights.n, device=x.device, dtype=x.dtype)
    bits, lo, _, g = weights.entries[entry]
    blocks = blocks or fp32_blocks(gemv_or_gemm_blocks(m, weights.n, weights.k), x.dtype)
    zero = weights.zero[g:] if weights.has_zero else weights.scale[g:]
    grid = (triton.cdiv(m, blocks.m), triton.cdiv(weights.n, blocks.n))
    dequant_matmul_kernel[grid](
        x2, weights.words[lo:], weights.scale[g:], zero, out, m, weights.n, weights.k, weights.k_pad,
        weights.n_groups, BITS=bits, GROUP=weights.group, HAS_ZERO=weights.has_zero,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, num_warps=blocks.warps, num_stages=blocks.stages)
    return out.reshape(*x.shape[:-1], weights.n)


# ---------------------------------------------------------------------------------------------
# Repacking (load time) and the torch reference
# ---------------------------------------------------------------------------------------------
def pack_plane(codes: torch.Tensor, plane_bits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (K a multiple of ``32 // plane_bits``) -> int32 ``[N, K * plane_bits / 32]``,
    LSB first; ``plane_bits`` in (1, 2, 4, 8)."""
    n, k = codes.shape
    per_word = 32 // plane_bits
    assert k % per_word == 0, (k, plane_bits)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * plane_bits
    words = (codes.to(torch.int64).view(n, k // per_word, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_plane(words: torch.Tensor, plane_bits: int) -> torch.Tensor:
    """Inverse of ``pack_plane``: int32 ``[N, W]`` -> int64 codes ``[N, W * 32 / plane_bits]``."""
    shifts = torch.arange(32 // plane_bits, device=words.device, dtype=torch.int64) * plane_bits
    return ((words.to(torch.int64)[..., None] >> shifts) & ((1 << plane_bits) - 1)).flatten(-2)


def _planes(matrix, k_pad: int) -> list[torch.Tensor]:
    """A ``PackedMatrix``'s codes as bit planes, int32 ``[N, k_pad * plane_bits / 32]`` each."""
    n, k = matrix.shape
    if matrix.bits != 3:
        words = k_pad * matrix.bits // 32
        return [torch.nn.functional.pad(matrix.packed, (0, words - matrix.packed.shape[1]))]
    codes = unpack_int32(matrix.packed, 3, k)
    codes = torch.nn.functional.pad(codes, (0, k_pad - k))  # [N, k_pad] uint8
    return [pack_plane(codes & 3, 2), pack_plane(codes >> 2, 1)]


def kernel_group_size(matrices) -> int:
    """Largest power of two dividing every group size, so each kernel group lies inside one original
    group; a matrix with one group per row (group size >= K) accepts any, up to K rounded up."""
    k = matrices[0].shape[1]
    sizes = [m.group_size & -m.group_size for m in matrices if m.group_size < k]
    return min(sizes, default=1 << (k - 1).bit_length())


def _regroup(matrix, group: int, n_groups: int, dtype, with_zero: bool):
    """Scales (and zero points) ``[N, n_groups]`` over kernel groups of ``group`` columns."""
    source = torch.arange(n_groups, device=matrix.scale.device) * group // matrix.group_size
    source = source.clamp(max=matrix.scale.shape[1] - 1)
    scale = matrix.scale[:, source].to(dtype)
    if not with_zero:
        return scale, None
    if matrix.zero is None:
        return scale, torch.full_like(scale, 2 ** (matrix.bits - 1), dtype=torch.uint8)
    return scale, matrix.zero[:, source].to(torch.uint8)


def repack(matrices) -> KernelWeights:
    """Concatenate ``PackedMatrix`` entries of one shape ``[N, K]`` (any mix of 2/3/4/8 bits, group
    sizes and symmetric/asymmetric) into one ``KernelWeights``, on the matrices' device."""
    n, k = matrices[0].shape
    if any(tuple(m.shape) != (n, k) for m in matrices):
        raise ValueError(f"repack: every matrix must have shape {(n, k)}")
    k_pad = -(-k // K_ALIGN) * K_ALIGN
    group = kernel_group_size(matrices)
    n_groups = -(-k // group)
    with_zero = any(m.zero is not None for m in matrices)
    dtypes = {m.scale.dtype for m in matrices}
    scale_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    words, scales, zeros, entries, word_off, group_off = [], [], [], [], 0, 0
    for m in matrices:
        planes = _planes(m, k_pad)
        hi = word_off + planes[0].numel()
        entries.append((m.bits, word_off, hi if len(planes) > 1 else word_off, group_off))
        words += [p.reshape(-1) for p in planes]
        word_off += sum(p.numel() for p in planes)
        scale, zero = _regroup(m, group, n_groups, scale_dtype, with_zero)
        scales.append(scale.reshape(-1))
        zeros.append(zero.reshape(-1) if with_zero else None)
        group_off += scale.numel()
    device = matrices[0].packed.device
    meta = torch.tensor(entries, dtype=torch.int64, device=device)
    return KernelWeights(torch.cat(words), torch.cat(scales), torch.cat(zeros) if with_zero else None,
                         meta, entries, n, k, k_pad, group, n_groups)


def dequantize_torch(weights: KernelWeights, entry: int = 0) -> torch.Tensor:
    """Reference: fp32 ``[N, K]`` weights of one entry, read back from the kernel layout."""
    bits, lo, hi, g = weights.entries[entry]
    n, k, k_pad = weights.n, weights.k, weights.k_pad
    plane0 = BIT_PLANES[bits][0]
    codes = unpack_plane(weights.words[lo: lo + n * k_pad * plane0 // 32].view(n, -1), plane0)
    if bits == 3:
        codes = codes | (unpack_plane(weights.words[hi: hi + n * k_pad // 32].view(n, -1), 1) << 2)
    groups = slice(g, g + n * weights.n_groups)
    scale = weights.scale[groups].view(n, -1).float().repeat_interleave(weights.group, 1)[:, :k]
    zero = (weights.zero[groups].view(n, -1).float().repeat_interleave(weights.group, 1)[:, :k]
            if weights.has_zero else 2.0 ** (bits - 1))
    return (codes[:, :k].float() - zero) * scale


def dequant_matmul_torch(x: torch.Tensor, weights: KernelWeights, entry: int = 0) -> torch.Tensor:
    """Reference for ``dequant_matmul``: fp32 matmul, result in x's dtype."""
    return (x.float() @ dequantize_torch(weights, entry).to(x.device).t()).to(x.dtype)
