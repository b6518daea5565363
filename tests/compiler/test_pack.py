"""Bit packing: exact round trips, the on-disk layout pinned by a frozen reference, and equality with
compressed-tensors' ``pack-quantized`` format."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mopeq.compiler.pack import pack_int32, packed_words, unpack_int32

BITS = (2, 3, 4, 8)


def frozen_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """FROZEN reference, do not edit: row -> one Python integer bit stream, code k at bit k*bits
    (LSB first), cut into 32-bit words, word w = stream bits [32w, 32w+32), stored as signed int32."""
    rows = []
    for row in codes.tolist():
        stream = sum(int(c) << (k * bits) for k, c in enumerate(row))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(-(-len(row) * bits // 32))]
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


def ct_documented_pack(signed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors ``pack_to_int32`` as documented for 2/4/8 bits: offset the signed int8 value by
    ``2**(bits-1)``, ``32 // bits`` values per int32, value ``i`` of a word shifted left by ``bits * i``,
    packed along dim 1, zero-padded at the end of a row."""
    per_word = 32 // bits
    unsigned = signed.to(torch.int64) + (1 << (bits - 1))
    n, k = unsigned.shape
    padded = torch.zeros(n, -(-k // per_word) * per_word, dtype=torch.int64)
    padded[:, :k] = unsigned
    words = (padded.view(n, -1, per_word) << (torch.arange(per_word) * bits)).sum(-1)
    return (words & 0xFFFFFFFF).to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else \
        torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# Bytes on disk for codes[r, c] = (3r + 5c + 1) mod 2**bits, shape (2, 19). Frozen: do not regenerate.
EXPECTED = {
    2: [[960051513, 57], [-454761244, 36]],
    3: [[-241348367, 15834448], [-1930786932, 26012295]],
    4: [[1336216417, -953318423, 2913], [1926774420, -95373796, 3732]],
    8: [[269157889, 606018069, 942878249, 1279738429, 5985873], [319686916, 656547096, 993407276, 1330267456, 6183252]],
}


def random_codes(shape, bits, seed=0):
    return torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(830, 545), (1, 1), (3, 31), (5, 33), (2, 7, 97)])
def test_round_trip_exact(bits, shape):
    codes = random_codes(shape, bits).to(torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape[-1] == packed_words(shape[-1], bits)
    assert torch.equal(unpack_int32(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", BITS)
def test_frozen_bytes(bits):
    codes = torch.tensor([[(3 * r + 5 * c + 1) % 2**bits for c in range(19)] for r in range(2)])
    expected = torch.tensor(EXPECTED[bits], dtype=torch.int32)
    assert torch.equal(frozen_pack(codes, bits), expected)
    assert torch.equal(pack_int32(codes, bits), expected)
    assert pack_int32(codes, bits).numpy().tobytes() == expected.numpy().astype("<i4").tobytes()


@pytest.mark.parametrize("bits", BITS)
def test_matches_frozen_reference_on_odd_shape(bits):
    codes = random_codes((37, 545), bits, seed=bits)
    assert torch.equal(pack_int32(codes, bits), frozen_pack(codes, bits))


@pytest.mark.parametrize("bits", BITS)
def test_matches_frozen_reference_for_every_row_length_up_to_two_word_cycles(bits):
    # 3 bits: eight codes make three bytes, so row lengths where 3*ceil(K/8) passes 4*words (K = 9, 19, ...)
    # exercise the cut of the padding bytes; 2/4 bits: rows that end mid-byte
    for k in range(1, 70):
        codes = random_codes((3, k), bits, seed=k)
        assert torch.equal(pack_int32(codes, bits), frozen_pack(codes, bits)), k


@pytest.mark.parametrize("bits", BITS)
def test_codes_at_an_unaligned_storage_offset(bits):
    base = random_codes((1, 3 + 4 * 40), bits, seed=7).to(torch.uint8)
    codes = base[0, 3:].view(4, 40)  # contiguous, but starting 3 bytes into its storage
    assert torch.equal(pack_int32(codes, bits), frozen_pack(codes, bits))


@pytest.mark.parametrize("bits", BITS)
def test_single_rows_with_odd_strides(bits):
    """One row of a wider buffer: torch calls it contiguous whatever its stride (review finding: 3 bits failed)."""
    for k in range(1, 70):
        base = random_codes((2, k + 5), bits, seed=k).to(torch.uint8)
        for codes in (base[:1, :k], base[1:, 1 : k + 1], base[:1, :k].contiguous()):
            assert torch.equal(pack_int32(codes, bits), frozen_pack(codes, bits)), (k, codes.stride())


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_equals_compressed_tensors_documented_layout(bits):
    codes = random_codes((64, 545), bits, seed=1)
    signed = codes - (1 << (bits - 1))
    assert torch.equal(pack_int32(codes, bits), ct_documented_pack(signed, bits))


def _ct_helpers():
    """compressed-tensors' pack helpers, loaded by file so its package imports (loguru, ...) are not needed.
    Looked up on sys.path, then in $MOPEQ_CT_PATH or /tmp/ct (``pip install --no-deps --target /tmp/ct
    compressed-tensors``)."""
    spec = importlib.util.find_spec("compressed_tensors")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots += [str(Path(os.environ.get("MOPEQ_CT_PATH", "/tmp/ct"), "compressed_tensors"))]
    for root in roots:
        path = Path(root, "compressors", "pack_quantized", "helpers.py")
        if path.is_file():
            mod_spec = importlib.util.spec_from_file_location("_ct_pack_helpers", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
            return module
    pytest.skip("compressed-tensors is not installed")


@pytest.mark.parametrize("bits", BITS)
def test_installed_compressed_tensors_reads_our_tensors(bits):
    ct = _ct_helpers()
    codes = random_codes((830, 545), bits, seed=2)
    signed = (codes - (1 << (bits - 1))).to(torch.int8)
    ours = pack_int32(codes, bits)
    assert torch.equal(ct.pack_to_int32(signed, bits), ours)
    assert torch.equal(ct.unpack_from_int32(ours, bits, signed.shape), signed)
