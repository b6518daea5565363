"""Grouped MoE layer over experts of mixed bit widths (2/3/4/8) in two Triton launches.

Every expert's ``gate``/``up`` live in one ``KernelWeights`` (entries ``0..E-1`` gate, ``E..2E-1``
up, each ``[I, H]``) and its ``down`` in another (``[H, I]``), whatever their widths: each program
reads its expert's bit width from ``meta`` and runs the loop specialised for it. The launch count is
therefore fixed (routing prep in torch, gate/up+SiLU, down+routing weight, one sum over top-k) and
no host synchronisation happens, so the layer can be captured in a CUDA graph.

Routing rows ("slots", ``t * top_k + j`` for token t's j-th expert) are sorted by expert and padded
to blocks of ``BLOCK_M`` rows that each belong to one expert (``align_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kernel_dequant_matmul import Blocks, KernelWeights, _matmul_loop, dequant_matmul_torch, fp32_blocks, repack


@triton.jit
def _expert_matmul(x_ptr, x_rows, x_ok, words_ptr, scale_ptr, zero_ptr, meta_ptr, entry, rows, row_ok,
                   K, k_pad, n_groups, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_N]`` = x[x_rows] @ W_entry[rows]^T, at the entry's own bit width."""
    bits = tl.load(meta_ptr + entry * 4)
    lo = words_ptr + tl.load(meta_ptr + entry * 4 + 1)
    hi = words_ptr + tl.load(meta_ptr + entry * 4 + 2)
    group_offset = tl.load(meta_ptr + entry * 4 + 3)
    scale_ptr += group_offset
    zero_ptr += group_offset
    if bits == 2:
        acc = _matmul_loop(x_ptr, x_rows, x_ok, lo, hi, scale_ptr, zero_ptr, rows, row_ok, K, k_pad,
                           n_groups, 2, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    elif bits == 3:
        acc = _matmul_loop(x_ptr, x_rows, x_ok, lo, hi, scale_ptr, zero_ptr, rows, row_ok, K, k_pad,
                           n_groups, 3, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    elif bits == 4:
        acc = _matmul_loop(x_ptr, x_rows, x_ok, lo, hi, scale_ptr, zero_ptr, rows, row_ok, K, k_pad,
                           n_groups, 4, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _matmul_loop(x_ptr, x_rows, x_ok, lo, hi, scale_ptr, zero_ptr, rows, row_ok, K, k_pad,
                           n_groups, 8, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    return acc


@triton.jit
def moe_gate_up_kernel(x_ptr, slot_ptr, block_expert_ptr, words_ptr, scale_ptr, zero_ptr, meta_ptr, h_ptr,
                       num_slots, num_experts, H, I, k_pad, n_groups, TOP_K: tl.constexpr,
                       GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[p] = silu(x[t] @ gate_e^T) * (x[t] @ up_e^T) for the padded sorted rows p of one block.

    x ``[T, H]`` fp16/bf16/fp32; slot_ptr int32 ``[num_blocks * BLOCK_M]`` (the slot of each padded
    row, ``num_slots`` for padding); block_expert_ptr int32 ``[num_blocks]`` (-1: unused block);
    words/scale/zero/meta: the gate/up ``KernelWeights`` (2E entries ``[I, H]``); h ``[num_blocks *
    BLOCK_M, I]`` in x's dtype. Grid: (num_blocks, cdiv(I, BLOCK_N)).
    """
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    padded_rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slot_ptr + padded_rows)
    ok = slots < num_slots
    tokens = (slots // TOP_K).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = _expert_matmul(x_ptr, tokens, ok, words_ptr, scale_ptr, zero_ptr, meta_ptr, expert, rows,
                          rows < I, H, k_pad, n_groups, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    up = _expert_matmul(x_ptr, tokens, ok, words_ptr, scale_ptr, zero_ptr, meta_ptr, expert + num_experts,
                        rows, rows < I, H, k_pad, n_groups, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    h = gate / (1.0 + tl.exp(-gate)) * up
    mask = ok[:, None] & (rows < I)[None, :]
    tl.store(h_ptr + padded_rows[:, None] * I + rows[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_down_kernel(h_ptr, slot_ptr, block_expert_ptr, route_weight_ptr, words_ptr, scale_ptr, zero_ptr,
                    meta_ptr, y_ptr, num_slots, H, I, k_pad, n_groups, GROUP: tl.constexpr,
                    HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """y[slot] = route_weight[slot] * (h[p] @ down_e^T) for the padded sorted rows p of one block.

    h ``[num_blocks * BLOCK_M, I]``; route_weight ``[num_slots]`` (any float dtype); words/scale/
    zero/meta: the down ``KernelWeights`` (E entries ``[H, I]``); y fp32 ``[num_slots, H]``.
    Grid: (num_blocks, cdiv(H, BLOCK_N)).
    """
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    padded_rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slot_ptr + padded_rows)
    ok = slots < num_slots
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _expert_matmul(h_ptr, padded_rows, ok, words_ptr, scale_ptr, zero_ptr, meta_ptr, expert, rows,
                         rows < H, I, k_pad, n_groups, GROUP, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    weight = tl.load(route_weight_ptr + slots, mask=ok, other=0.0).to(tl.float32)
    mask = ok[:, None] & (rows < H)[None, :]
    tl.store(y_ptr + slots.to(tl.int64)[:, None] * H + rows[None, :], acc * weight[:, None], mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
@dataclass
class MoEWeights:
    """A layer's experts repacked for the kernels: gate_up (2E entries ``[I, H]``: gates, then ups)
    and down (E entries ``[H, I]``)."""

    gate_up: KernelWeights
    down: KernelWeights
    num_experts: int

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


def repack_experts(experts) -> MoEWeights:
    """``experts[j] = {"gate", "up", "down"} -> PackedMatrix`` (as in ``QuantizedExperts``) -> ``MoEWeights``."""
    gate_up = repack([e["gate"] for e in experts] + [e["up"] for e in experts])
    return MoEWeights(gate_up, repack([e["down"] for e in experts]), len(experts))


def align_tokens(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sort routing slots by expert into blocks of ``block_m`` rows of one expert, on the device.

    top_k_index ``[T, k]`` int -> (slots int32 ``[num_blocks * block_m]``: the slot ``t*k+j`` of each
    padded row, ``T*k`` for padding; block_expert int32 ``[num_blocks]``: the expert of each block, -1
    for unused). ``num_blocks = cdiv(T*k, block_m) + min(E, T*k)`` bounds the need without a host sync;
    ids outside ``[0, E)`` are dropped (their slots contribute zero). With ``block_m == 1`` every slot
    is its own block, in slot order.
    """
    flat = top_k_index.reshape(-1).long()
    num_slots, device = flat.numel(), flat.device
    if block_m == 1:  # one slot per block: nothing to sort (decode; a few launches only)
        slots = torch.arange(num_slots, device=device, dtype=torch.int32)
        return slots, torch.where((flat >= 0) & (flat < num_experts), flat, -1).to(torch.int32)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # E = dropped
    order = torch.argsort(flat, stable=True)  # [Tk] slots sorted by expert
    counts = torch.bincount(flat, minlength=num_experts + 1)  # [E+1]
    blocks = (counts[:num_experts] + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]
    num_blocks = triton.cdiv(num_slots, block_m) + min(num_experts, num_slots)
    block_ids = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True)  # [num_blocks] in [0, E]
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    sorted_expert = flat[order]  # [Tk]
    first = (torch.cumsum(counts, 0) - counts)[sorted_expert]  # sorted index of the expert's first slot
    block_start = torch.cat([block_end - blocks, block_end.new_zeros(1)])[sorted_expert]
    position = block_start * block_m + torch.arange(num_slots, device=device) - first
    position = torch.where(sorted_expert < num_experts, position, num_blocks * block_m)  # dropped -> dump
    slots = torch.full((num_blocks * block_m + 1,), num_slots, dtype=torch.int32, device=device)
    slots[position] = order.to(torch.int32)
    return slots[:-1], block_expert


def moe_blocks(num_slots: int, num_experts: int, n: int, k: int) -> Blocks:
    """Default tiles: one row per block (CUDA-core reduction) while most experts see under one row."""
    if num_slots < num_experts:
        return Blocks(1, 16, 256, warps=4, stages=3)
    per_expert = num_slots / num_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    return Blocks(block_m, 64, 128, warps=4, stages=3)


def _weights_args(w: KernelWeights):
    return w.words, w.scale, w.zero if w.has_zero else w.scale, w.meta


def moe_forward_triton(weights: MoEWeights, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, blocks: Blocks | None = None) -> torch.Tensor:
    """SiLU-gated MoE: hidden ``[T, H]`` (fp16/bf16/fp32), top_k_index ``[T, k]`` int, top_k_weights
    ``[T, k]`` -> ``[T, H]`` in hidden's dtype. Same function as ``qlayer.moe_forward_torch``."""
    T, H = hidden.shape
    top_k = top_k_index.shape[1]
    I, E = weights.gate_up.n, weights.num_experts
    num_slots = T * top_k
    if num_slots == 0:
        return torch.zeros_like(hidden)
    blocks = blocks or fp32_blocks(moe_blocks(num_slots, E, I, H), hidden.dtype)
    slots, block_expert = align_tokens(top_k_index, E, blocks.m)
    num_blocks = block_expert.numel()
    x = hidden.contiguous()
    h = torch.empty(num_blocks * blocks.m, I, device=x.device, dtype=x.dtype)
    gu, dn = weights.gate_up, weights.down
    launch = dict(BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, num_warps=blocks.warps,
                  num_stages=blocks.stages)
    moe_gate_up_kernel[(num_blocks, triton.cdiv(I, blocks.n))](
        x, slots, block_expert, *_weights_args(gu), h, num_slots, E, H, I, gu.k_pad, gu.n_groups,
        TOP_K=top_k, GROUP=gu.group, HAS_ZERO=gu.has_zero, **launch)
    y = torch.zeros(num_slots, H, device=x.device, dtype=torch.float32)
    route_weight = top_k_weights.reshape(-1).contiguous()
    moe_down_kernel[(num_blocks, triton.cdiv(H, blocks.n))](
        h, slots, block_expert, route_weight, *_weights_args(dn), y, num_slots, H, I, dn.k_pad,
        dn.n_groups, GROUP=dn.group, HAS_ZERO=dn.has_zero, **launch)
    return y.view(T, top_k, H).sum(1).to(hidden.dtype)


def moe_forward_reference(weights: MoEWeights, hidden: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``moe_forward_triton`` read from the same kernel layout (fp32 math)."""
    E = weights.num_experts
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(E):
        token, j = torch.nonzero(top_k_index == e, as_tuple=True)
        if token.numel() == 0:
            continue
        x = hidden[token].float()
        gate = dequant_matmul_torch(x, weights.gate_up, e)
        up = dequant_matmul_torch(x, weights.gate_up, e + E)
        y = dequant_matmul_torch(torch.nn.functional.silu(gate) * up, weights.down, e)
        out.index_add_(0, token, y * top_k_weights[token, j, None].float())
    return out.to(hidden.dtype)
