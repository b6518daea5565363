"""Dispatch from the quantized modules to the Triton kernels (CUDA only).

Imports nothing from Triton until a kernel is needed, so this module loads on machines without
Triton or a GPU; ``available()`` says whether the kernels can run. The kernels want their own
layout (``kernel_dequant_matmul.KernelWeights``), built from a module's packed buffers on first use
and cached on the module per device.

Example::

    if kernels.available():
        out = kernels.moe_forward(quantized_experts, hidden, top_k_index, top_k_weights)
"""

from __future__ import annotations

import functools

import torch

_CACHE_ATTR = "_mopeq_kernel_weights"


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    return _triton_importable() and torch.cuda.is_available()


def _is_silu(act_fn) -> bool:
    return act_fn is torch.nn.functional.silu or type(act_fn).__name__ in ("SiLU", "SiLUActivation")


def _cached(module, key, build):
    """``build()`` once per (device, buffer identity) and keep it on ``module``."""
    cached = getattr(module, _CACHE_ATTR, None)
    if cached is None or cached[0] != key:
        cached = (key, build())
        object.__setattr__(module, _CACHE_ATTR, cached)
    return cached[1]


def moe_weights(experts):
    """The ``kernel_moe.MoEWeights`` of a ``QuantizedExperts`` (repacked once per device)."""
    from .kernel_moe import repack_experts

    first = experts.experts[0]["gate"].packed
    return _cached(experts, (str(first.device), first.data_ptr()), lambda: repack_experts(experts.experts))


def moe_forward(experts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    """``QuantizedExperts`` forward on the Triton kernels: hidden ``[T, H]``, top_k_index ``[T, k]``,
    top_k_weights ``[T, k]`` -> ``[T, H]``. Non-SiLU activations fall back to the torch path."""
    if not _is_silu(experts.act_fn):
        from .qlayer import moe_forward_torch

        return moe_forward_torch(experts, hidden, top_k_index, top_k_weights)
    from .kernel_moe import moe_forward_triton

    return moe_forward_triton(moe_weights(experts), hidden, top_k_index, top_k_weights)


def linear(matrix, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ W.T`` for a ``PackedMatrix`` W ``[N, K]`` (dequant-GEMV/GEMM); the repacked
    weights are cached on the matrix object."""
    from .kernel_dequant_matmul import dequant_matmul, repack

    weights = _cached(matrix, (str(matrix.packed.device), matrix.packed.data_ptr()), lambda: repack([matrix]))
    return dequant_matmul(x, weights)
