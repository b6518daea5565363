"""The streaming compile path: the header-first shard writer (``save_file``'s header format, tensors in
arrival order, greedy shard cuts, sha256 computed while writing), and the fused RTN + pack path ==
``pack_int32(quantize(...).codes)`` bit for bit."""

import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mopeq.compiler.artifact import ST_BYTES, ST_DTYPES, ST_ORDER, StreamingShardWriter, safetensors_header
from mopeq.compiler.pack import pack_int32
from mopeq.compiler.quantize import quantize, quantize_packed

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def mixed_tensors():
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES * 2):
        shape = [(i % 3) + 1, (7 * i) % 11 + 1] if i % 4 else [(5 * i) % 13 + 1]
        t = torch.randn(shape, generator=gen) * 10
        out[f"layers.{i % 5}.t{(13 * i) % 17}.{dtype}".replace("torch.", "")] = t.to(dtype)
    out["scalar"] = torch.tensor(3.5, dtype=torch.bfloat16)
    out["empty"] = torch.empty(0, 4, dtype=torch.float32)
    return out




def test_header_equals_save_file(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    specs = sorted([(n, ST_DTYPES[t.dtype], list(t.shape)) for n, t in tensors.items()],
                   key=lambda t: (-ST_ORDER.index(t[1]), t[0].encode()))
    header, _ = safetensors_header(specs, {"format": "pt"})
    assert ref[: len(header)] == header


@pytest.mark.parametrize("max_bytes", [1, 64, 10**9])
def test_streaming_writer_shards_and_hashes(tmp_path, max_bytes):
    tensors = mixed_tensors()
    new = StreamingShardWriter(tmp_path, max_bytes, [(n, ST_DTYPES[t.dtype], list(t.shape)) for n, t in tensors.items()])
    src = tmp_path / "src.bin"
    for i, (name, t) in enumerate(tensors.items()):
        if i % 2:  # half through copy(), as compile copies unquantized tensors
            src.write_bytes(b"xyz" + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            fd = os.open(src, os.O_RDONLY)
            new.copy(name, fd, 3)
            os.close(fd)
        else:
            new.add(name, t)
    weight_map = new.finish()
    new.close()
    assert set(weight_map) == set(tensors)
    # greedy cuts: a shard closes when the next tensor would take it past max_bytes
    names, expected, size = list(tensors), [[]], 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if expected[-1] and size + nbytes > max_bytes:
            expected.append([])
            size = 0
        expected[-1].append(name)
        size += nbytes
    shards = sorted(set(weight_map.values()))
    assert [sorted(n for n in names if weight_map[n] == s) for s in shards] == [sorted(e) for e in expected]
    assert new.sha256 == {s: hashlib.sha256((tmp_path / s).read_bytes()).hexdigest() for s in shards}
    for shard in shards:
        with safe_open(str(tmp_path / shard), "pt") as f:
            for name in f.keys():
                assert torch.equal(f.get_tensor(name).reshape(-1).view(torch.uint8),
                                   tensors[name].reshape(-1).view(torch.uint8))
        raw = (tmp_path / shard).read_bytes()  # no gaps, nothing after the last tensor, every tensor aligned
        names_here = [n for n in names if weight_map[n] == shard]
        assert len(raw) == 8 + int.from_bytes(raw[:8], "little") + sum(
            ST_BYTES[ST_DTYPES[tensors[n].dtype]] * tensors[n].numel() for n in names_here)
        header = __import__("json").loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert all(e["data_offsets"][0] % ST_BYTES[e["dtype"]] == 0 for k, e in header.items() if k != "__metadata__")


def test_aligned_arrival_order_is_kept_and_hashed_as_written(tmp_path):
    """A shard whose arrival order is aligned keeps it (streamed hashing); one that is not gets dtype order."""
    specs = [("a", "I64", [2]), ("b", "F32", [3]), ("c", "F32", [1]), ("d", "U8", [3])]
    w = StreamingShardWriter(tmp_path, 1 << 20, specs)
    assert w.in_order == [True]
    w.close()
    bad = [("z", "U8", [3]), ("y", "F32", [4]), ("x", "F16", [1]), ("w", "I64", [2])]
    (tmp_path / "x").mkdir()
    w2 = StreamingShardWriter(tmp_path / "x", 1 << 20, bad)
    assert w2.in_order == [False]
    for name, dtype, shape in bad:
        w2.add(name, torch.ones(shape, dtype={v: k for k, v in ST_DTYPES.items()}[dtype]))
    w2.finish()
    w2.close()
    with safe_open(str(tmp_path / "x" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("y").data_ptr() % 4 == 0 and f.get_tensor("w").data_ptr() % 8 == 0
    assert w2.sha256["model-00001-of-00001.safetensors"] == hashlib.sha256(
        (tmp_path / "x" / "model-00001-of-00001.safetensors").read_bytes()).hexdigest()


def test_streaming_writer_refuses_out_of_order(tmp_path):
    w = StreamingShardWriter(tmp_path, 1 << 20, [("a", "F32", [2]), ("b", "I32", [3])])
    with pytest.raises(RuntimeError, match="out of the planned order"):
        w.add("b", torch.zeros(3, dtype=torch.int32))
    w.close()


def test_streaming_writer_refuses_unplanned_and_missing(tmp_path):
    w = StreamingShardWriter(tmp_path, 1 << 20, [("a", "F32", [2]), ("b", "I32", [3])])
    with pytest.raises(RuntimeError, match="planned"):
        w.add("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="not in the planned layout"):
        w.add("c", torch.zeros(2))
    w.add("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.finish()
    w.close()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric,clip", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_packed_equals_quantize_then_pack(bits, symmetric, clip, dtype):
    gen = torch.Generator().manual_seed(bits)
    for n, k, group in [(37, 300, 128), (64, 256, 64), (5, 7, 128), (130, 1024, 128)]:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        w[0, :6] = torch.tensor([0.5, -0.5, 1.5, 0.0, -0.0, 2.5]).to(dtype)  # exact ties after scaling
        w[1] = 0
        for block in (1 << 20, 700):
            q = quantize(w, bits, group, symmetric, clip, torch.bfloat16)
            packed, scale, zero = quantize_packed(w, bits, group, symmetric, clip, torch.bfloat16, block)
            assert torch.equal(packed, pack_int32(q.codes, bits)), (n, k, block)
            assert torch.equal(scale, q.scale)
            assert (zero is None) == symmetric and (symmetric or torch.equal(zero, q.zero))


def test_source_keys_sort_naturally_whatever_their_parts():
    """Fuzz finding (bench/fuzz.py checkpoint target): a key with text where another has a number crashed the sort."""
    from mopeq.compiler.artifact import _natural

    keys = ["m.layers.10.w", "m.layers.x.w", "m.layers.2.w", "m.layers.²", "m.layers", "m.layers.2"]
    assert sorted(keys, key=_natural) == ["m.layers", "m.layers.2", "m.layers.2.w", "m.layers.10.w", "m.layers.x.w",
                                          "m.layers.²"]
