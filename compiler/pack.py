"""Bit packing of unsigned integer codes into int32 words. Written once; the runtime imports it.

Layout (``pack_int32``): codes are packed along the last (input) dimension, least significant bits
first: code ``k`` of a row occupies bits ``[k*bits, (k+1)*bits)`` of that row's bit stream, and word
``w`` holds stream bits ``[32*w, 32*w + 32)`` (bit 0 = the word's least significant bit). A row of K
codes takes ``ceil(K*bits/32)`` words; 3-bit codes straddle word boundaries. For 2, 4 and 8 bits this
is exactly compressed-tensors' ``pack-quantized`` layout (``32 // bits`` codes per word, code ``i`` of
a word shifted left by ``bits*i``), provided codes are the signed values offset by ``2**(bits-1)``.
"""

from __future__ import annotations

import functools
import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_words(num_codes: int, bits: int) -> int:
    """Number of int32 words for one row of ``num_codes`` codes."""
    return -(-num_codes * bits // 32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: got {bits}, expected one of {SUPPORTED_BITS}")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., K]`` (each in ``[0, 2**bits)``) into int32 ``[..., ceil(K*bits/32)]``.

    Example: ``pack_int32(torch.tensor([[1, 2, 3]]), 2)`` -> ``tensor([[57]], dtype=torch.int32)``.
    """
    _check_bits(bits)
    *lead, k = codes.shape
    words = packed_words(k, bits)
    if 32 % bits == 0:
        if sys.byteorder == "little" and words:
            return _pack_bytes(codes, bits, lead, k, words)
        per_word = 32 // bits
        padded = torch.zeros(*lead, words * per_word, dtype=torch.int32, device=codes.device)
        padded[..., :k] = codes
        lanes = padded.view(*lead, words, per_word)
        packed = lanes[..., 0].clone()
        for i in range(1, per_word):  # int32 arithmetic: the top lane's shift wraps like a C cast
            packed |= lanes[..., i] << (bits * i)
        return packed
    elif sys.byteorder == "little" and words:
        return _pack_3bit_bytes(codes, lead, k, words)
    else:
        codes = codes.to(torch.int64)
        bit_index = torch.arange(bits, device=codes.device, dtype=torch.int64)
        stream = ((codes.unsqueeze(-1) >> bit_index) & 1).flatten(-2)  # [..., K*bits]
        padded = torch.zeros(*lead, words * 32, dtype=torch.int64, device=codes.device)
        padded[..., : k * bits] = stream
        packed = (padded.view(*lead, words, 32) << torch.arange(32, device=codes.device)).sum(-1)
    # Words above 2**31 wrap to negative int32, as a C cast would.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _pack_bytes(codes: torch.Tensor, bits: int, lead: list, k: int, words: int) -> torch.Tensor:
    """2/4/8 bits on a little-endian host: shift-or ``8 // bits`` codes into each byte (uint8 arithmetic,
    a quarter of int32's memory traffic), then reinterpret every 4 bytes as one int32 word. Byte ``j`` of a
    little-endian word holds word bits ``[8j, 8j + 8)``, so this is the layout above, bit for bit."""
    per_byte = 8 // bits
    nbytes = words * 4
    c = codes.to(torch.uint8)
    if k != nbytes * per_byte:
        c = torch.nn.functional.pad(c, (0, nbytes * per_byte - k))
    if per_byte == 1:
        out = c.clone(memory_format=torch.contiguous_format)
    else:
        # Read each byte's codes as one little-endian int16 (4 bits) or int32 (2 bits): code i sits at
        # bit 8i, so shifting it right by (8 - bits) * i moves it to bit bits*i; the low byte is the result.
        lanes = _aligned(c, 2 if per_byte == 2 else 4).view(torch.int16 if per_byte == 2 else torch.int32)
        out = lanes | (lanes >> (8 - bits))
        for i in range(2, per_byte):
            out |= lanes >> ((8 - bits) * i)
        out = out.to(torch.uint8)
    return out.view(torch.int32)


def _pack_3bit_bytes(codes: torch.Tensor, lead: list, k: int, words: int) -> torch.Tensor:
    """3 bits on a little-endian host: eight codes fill exactly three bytes of the stream. Read each
    run of eight uint8 codes as one little-endian int64 (code i at bit 8i) and merge neighbours in
    three shift-or-mask steps (pairs of 3-bit codes into 6 bits per 16-bit lane, those into 12 bits
    per 32-bit lane, those into 24 bits), keep the low three bytes, and reinterpret the byte stream as
    int32 words (bytes past the last word only ever hold padding zeros)."""
    runs = -(-k // 8)
    c = codes.to(torch.uint8)
    if k != runs * 8:
        c = torch.nn.functional.pad(c, (0, runs * 8 - k))
    x = _aligned(c, 8).view(torch.int64)  # [..., runs]
    for shift, mask in ((5, 0x003F003F003F003F), (10, 0x00000FFF00000FFF), (20, 0xFFFFFF)):
        y = x >> shift
        y |= x
        y &= mask
        x = y
    stream = x.view(torch.uint8).view(*lead, runs, 8)[..., :3].reshape(*lead, runs * 3)
    nbytes = words * 4
    if nbytes > runs * 3:
        stream = torch.nn.functional.pad(stream, (0, nbytes - runs * 3))
    return _aligned(stream[..., :nbytes], 4).view(torch.int32)


def _aligned(codes: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``codes`` densely laid out and starting at a multiple of ``nbytes`` (what a wider view needs).

    ``is_contiguous()`` is not enough: torch calls a size-1 dimension contiguous whatever its stride,
    and a one-row slice of a wider buffer keeps that stride, which ``view`` then refuses."""
    dense, stride = [], 1
    for size in reversed(codes.shape):
        dense.insert(0, stride)
        stride *= size
    if list(codes.stride()) == dense and codes.storage_offset() % nbytes == 0:
        return codes
    return torch.empty(codes.shape, dtype=codes.dtype, device=codes.device).copy_(codes)  # dense, offset 0


def unpack_int32(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 ``[..., W]`` -> uint8 codes ``[..., num_codes]``."""
    _check_bits(bits)
    *lead, words = packed.shape
    if words != packed_words(num_codes, bits):
        raise ValueError(f"packed: got {words} words per row, expected {packed_words(num_codes, bits)} "
                         f"for {num_codes} codes at {bits} bits")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # Arithmetic shifts of int32 words are fine: the mask drops the sign-extended bits.
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)[..., :num_codes]
        return codes.to(torch.uint8)
    word, offset = _straddle_index(num_codes, bits, str(packed.device))
    wide = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    window = wide[..., word] | (wide[..., word + 1] << 32)  # 64 stream bits starting at each code's word
    return ((window >> offset) & mask).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _straddle_index(num_codes: int, bits: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each code, for widths that straddle word boundaries."""
    start = torch.arange(num_codes, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32
