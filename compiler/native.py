"""The native fast path of ``quantize_packed``: ``rtn_pack.c`` built with the system C compiler on first use.

The kernel reads each weight once and writes packed words, scales and zero points, bit-identical to
the torch path (``_rtn_block`` + ``pack_int32``). It is built into ``$MOPEQ_CACHE`` (default
``~/.cache/mopeq``, or a temp folder where that is read-only) under a name keyed by the source, the
flags, the compiler and this CPU, written atomically, and loaded with ctypes, whose calls release the GIL. Where no compiler works, or with
``MOPEQ_NATIVE=0``, ``rtn_pack`` returns None and the caller runs the torch path; a failed build is
logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rtn_pack.c")
# No fast-math and no FMA contraction: every operation must round as torch's does.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC"]
SOURCE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SCALE_DTYPES = {torch.bfloat16: 1, torch.float16: 2}
_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def enabled() -> bool:
    """Off with ``MOPEQ_NATIVE=0``, and on big-endian hosts (the kernel writes the little-endian byte stream)."""
    return os.environ.get("MOPEQ_NATIVE", "1") != "0" and sys.byteorder == "little"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mopeq"
    return Path(os.environ.get("MOPEQ_CACHE", default))


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a library built on another CPU may use instructions this one lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _build(cc: str, directory: Path) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, cc, platform.machine(), _cpu_signature(),
                                    sys.platform]).encode()).hexdigest()[:16]
    target = directory / f"rtn_pack-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders each publish a complete library
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be built (logged once)."""
    cc = compiler()
    if cc is None:
        log.info("mopeq native RTN kernel: no C compiler found; using the torch path")
        return None
    try:
        try:
            path = _build(cc, cache_dir())
        except OSError:  # a read-only or broken cache folder: this user's folder in the temp directory
            path = _build(cc, Path(tempfile.gettempdir()) / f"mopeq-{os.getuid()}")
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("mopeq native RTN kernel: build with %s failed, using the torch path: %s", cc,
                    str(detail).strip().splitlines()[-1:] or detail)
        return None
    lib.mopeq_rtn_pack.restype = _INT
    lib.mopeq_rtn_pack.argtypes = [_PTR, _INT, _I64, _I64, _I64, _INT, _I64, _INT, _INT, _PTR, _I64, _PTR, _PTR]
    lib.mopeq_round_scales.argtypes = [_PTR, _I64, _INT, _PTR]
    lib.mopeq_widen_f16.argtypes = [_PTR, _I64, _PTR]
    return lib


def rtn_pack(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
             packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> bool:
    """Fill ``packed`` [N, words] int32, ``scale`` [N, G] and ``zero`` [N, G] uint8 (None if symmetric) from
    ``w`` [N, K]; ``group_size`` <= K. Returns False, writing nothing meaningful, where the torch path must
    run instead: kernel unavailable or disabled, an unsupported dtype or layout, or non-finite groups."""
    if not enabled() or w.device.type != "cpu" or w.dtype not in SOURCE_DTYPES or scale_dtype not in SCALE_DTYPES:
        return False
    n, k = w.shape
    if n == 0 or k == 0:
        return False
    if w.stride(1) != 1 or w.stride(0) < k:
        w = w.contiguous()
    lib = library()
    if lib is None:
        return False
    status = lib.mopeq_rtn_pack(w.data_ptr(), SOURCE_DTYPES[w.dtype], n, k, w.stride(0), bits, group_size,
                                int(symmetric), SCALE_DTYPES[scale_dtype], packed.data_ptr(), packed.shape[1],
                                scale.data_ptr(), None if zero is None else zero.data_ptr())
    if status == 2:
        raise MemoryError("mopeq native RTN kernel: could not allocate its row buffers")
    return status == 0
