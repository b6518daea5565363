"""Native CPU kernels built with the system C compiler on first use: the fast path of ``quantize_packed``
(``rtn_pack.c``) and of the runtime's ``dequantize_packed`` (``runtime/dequant.c``), in one library.

The RTN kernel reads each weight once and writes packed words, scales and zero points, bit-identical to
the torch path (``_rtn_block`` + ``pack_int32``); the dequantization kernel is likewise bit-identical to
its torch code. The library is loaded with ctypes, whose calls release the GIL.
It is built into ``$MOPEQ_CACHE`` (default ``$XDG_CACHE_HOME/mopeq`` or ``~/.cache/mopeq``) under a name
keyed by the source, the flags, the compiler and its version, and this CPU, and published atomically.
A library is only ever loaded from a folder that this user owns and nobody else can write; where the
cache folder is not such a folder, or cannot be made, each process builds into a fresh private temp
folder (well under a second) and deletes it once loaded. Where no compiler works, or with
``MOPEQ_NATIVE=0``, ``rtn_pack`` returns False and the caller runs the torch path; a failed build is
logged once per process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .pack import SUPPORTED_BITS, packed_words

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rtn_pack.c")
# Built into the same library: the runtime's CPU dequantization (mopeq.runtime sits beside mopeq.compiler).
SOURCES = [SOURCE, Path(__file__).resolve().parents[1] / "runtime" / "dequant.c"]
HEADERS = [Path(__file__).with_name("float_bits.h")]  # included by both: part of the cache key
# No fast-math and no FMA contraction: every operation must round as torch's does.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # float_bits.h's DTYPE_F32/BF16/F16
SCALE_DTYPES = {d: DTYPE_CODES[d] for d in (torch.bfloat16, torch.float16)}  # what rtn_pack.c stores
_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def enabled() -> bool:
    """Off with ``MOPEQ_NATIVE=0``, and on big-endian hosts (the kernel writes the little-endian byte stream)."""
    return os.environ.get("MOPEQ_NATIVE", "1") != "0" and sys.byteorder == "little"


def cache_dir() -> Path | None:
    """``$MOPEQ_CACHE``, else ``$XDG_CACHE_HOME/mopeq``, else ``~/.cache/mopeq``; None where there is no home."""
    if os.environ.get("MOPEQ_CACHE"):
        return Path(os.environ["MOPEQ_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mopeq"
    try:
        return Path.home() / ".cache" / "mopeq"
    except RuntimeError:  # no $HOME and no passwd entry (containers run under an arbitrary uid)
        return None


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``), else cc, gcc or clang."""
    candidates = [shlex.split(os.environ["CC"])] if os.environ.get("CC", "").strip() else []
    for command in candidates + [["cc"], ["gcc"], ["clang"]]:
        found = shutil.which(command[0])
        if found:
            return [found, *command[1:]]
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on (a library built on another CPU may use instructions this one
    lacks): the first processor's block of /proc/cpuinfo, vendor, family, model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().split("\n\n")[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build_flags(cpu: str) -> list[str]:
    """``FLAGS``, without BMI2 on AMD Zen 1/2 (family 23), where ``pext`` is microcoded and ~50x slower."""
    zen12 = "AuthenticAMD" in cpu and re.search(r"^cpu family\s*:\s*23\s*$", cpu, re.M)
    return FLAGS + ["-mno-bmi2"] if zen12 else FLAGS


def _private(directory: Path) -> bool:
    """``directory``, created if missing, belongs to this user and nobody else can write to it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    return st.st_uid == getattr(os, "getuid", lambda: st.st_uid)() and not st.st_mode & 0o022


def _library_folder() -> tuple[Path, bool]:
    """Where to build and load: the cache folder if private, else a fresh temp folder (True: delete after)."""
    directory = cache_dir()
    try:
        if directory is not None and _private(directory):
            return directory, False
        reason = "is writable by others or not this user's"
    except OSError as e:
        reason = f"cannot be used ({e.strerror or e})"
    log.info("mopeq native RTN kernel: cache folder %s %s; building in a private temp folder", directory, reason)
    return Path(tempfile.mkdtemp(prefix="mopeq-native-")), True


def _compile(cc: list[str], flags: list[str], output: str) -> None:
    subprocess.run([*cc, *flags, *map(str, SOURCES), "-o", output], check=True, capture_output=True, text=True,
                   timeout=120)


def _build(cc: list[str], directory: Path) -> Path:
    cpu = _cpu_signature()
    flags = build_flags(cpu)
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, *flags, *cc, version, cpu, platform.machine(), sys.platform]).encode())
    target = directory / f"rtn_pack-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    _remove_stale_partial_builds(directory)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=directory)
    os.close(fd)
    try:
        try:
            _compile(cc, flags, tmp)
        except subprocess.CalledProcessError:  # a compiler without -march=native: portable code, still exact
            _compile(cc, [f for f in flags if f != "-march=native"], tmp)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would leave other users of a shared cache unable to load it
        os.replace(tmp, target)  # atomic: concurrent builders each publish a complete library
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _remove_stale_partial_builds(directory: Path, age_s: float = 3600.0) -> None:
    """Half-written libraries of builds killed over an hour ago (a live build takes well under a second)."""
    for path in directory.glob("*.so.tmp"):
        try:
            if time.time() - path.stat().st_mtime > age_s:
                path.unlink()
        except OSError:
            pass  # another process removed or is replacing it


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be built (logged once per process)."""
    cc = compiler()
    if cc is None:
        log.info("mopeq native RTN kernel: no C compiler found; using the torch path")
        return None
    directory, temporary = None, False
    try:
        directory, temporary = _library_folder()
        lib = ctypes.CDLL(str(_build(cc, directory)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        log.warning("mopeq native RTN kernel: build with %s failed, using the torch path: %s", shlex.join(cc),
                    str(detail).strip().splitlines()[-1:] or detail)
        return None
    finally:
        if temporary:  # a loaded library stays mapped after its file is gone
            shutil.rmtree(directory, ignore_errors=True)
    lib.mopeq_rtn_pack.restype = _INT
    lib.mopeq_rtn_pack.argtypes = [_PTR, _INT, _I64, _I64, _I64, _INT, _I64, _INT, _INT, _PTR, _I64, _PTR, _PTR]
    lib.mopeq_round_scales.argtypes = [_PTR, _I64, _INT, _PTR]
    lib.mopeq_widen_f16.argtypes = [_PTR, _I64, _PTR]
    lib.mopeq_dequantize.restype = _INT
    lib.mopeq_dequantize.argtypes = [_PTR, _I64, _I64, _INT, _I64, _I64, _PTR, _INT, _PTR, _INT, _PTR]
    return lib


def rtn_pack(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
             packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> bool:
    """Fill ``packed`` [N, words] int32, ``scale`` [N, G] and ``zero`` [N, G] uint8 (None if symmetric) from
    ``w`` [N, K]; ``group_size`` <= K. Returns False, writing nothing meaningful, where the torch path must
    run instead: kernel unavailable or disabled, an unsupported dtype or layout, or non-finite groups."""
    if not enabled() or w.device.type != "cpu" or w.dtype not in DTYPE_CODES or scale_dtype not in SCALE_DTYPES:
        return False
    n, k = w.shape
    if n == 0 or k == 0:
        return False
    lib = library()
    if lib is None:
        return False
    w = w.resolve_neg()  # a lazily negated view holds the un-negated values in memory
    if w.stride(1) != 1 or w.stride(0) < k:
        w = w.contiguous()
    groups = -(-k // group_size)
    assert 1 <= group_size <= k and bits in SUPPORTED_BITS
    assert packed.dtype == torch.int32 and packed.is_contiguous() and packed.shape == (n, packed_words(k, bits))
    assert scale.dtype == scale_dtype and scale.is_contiguous() and scale.shape == (n, groups)
    assert (zero is None) == symmetric and (zero is None or (zero.dtype == torch.uint8 and zero.is_contiguous()
                                                             and zero.shape == (n, groups)))
    status = lib.mopeq_rtn_pack(w.data_ptr(), DTYPE_CODES[w.dtype], n, k, w.stride(0), bits, group_size,
                                int(symmetric), SCALE_DTYPES[scale_dtype], packed.data_ptr(), packed.shape[1],
                                scale.data_ptr(), None if zero is None else zero.data_ptr())
    if status == 2:
        raise MemoryError("mopeq native RTN kernel: could not allocate its row buffers")
    return status == 0



def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
               k: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``(codes - zero) * scale`` of packed ``[..., N, W]`` (scales/zeros ``[..., N, G]``) as ``[..., N, K]`` in
    ``dtype``, bit-identical to ``mopeq.runtime.qlayer.dequantize_packed``'s torch code; None where that code
    must run instead: kernel unavailable or disabled, another device or dtype, inconsistent shapes (the
    torch code raises), gradients wanted through the scales, or a scale beyond ``dtype``."""
    if not (packed.is_cpu and scale.is_cpu and (zero is None or zero.is_cpu)) or dtype not in DTYPE_CODES \
            or scale.dtype not in DTYPE_CODES or packed.dtype != torch.int32 \
            or (zero is not None and zero.dtype != torch.uint8) or bits not in SUPPORTED_BITS or k < 1 \
            or group_size < 1 or packed.dim() < 1 or packed.numel() == 0 or not enabled():
        return None
    if torch.is_grad_enabled() and (scale.requires_grad or packed.requires_grad):
        return None  # the torch code keeps the graph (uint8 zero points cannot require grad)
    group_size = min(group_size, k)
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_words(k, bits) or scale.shape[:-1] != lead \
            or scale.shape[-1] != -(-k // group_size) or (zero is not None and zero.shape != scale.shape):
        return None
    lib = library()
    if lib is None:
        return None
    packed, scale = packed.resolve_neg().contiguous(), scale.resolve_neg().contiguous()
    zero = None if zero is None else zero.contiguous()
    words = packed.shape[-1]
    out = torch.empty((*lead, k), dtype=dtype)
    status = lib.mopeq_dequantize(packed.data_ptr(), packed.numel() // words, words, bits, k, group_size,
                                  scale.data_ptr(), DTYPE_CODES[scale.dtype],
                                  None if zero is None else zero.data_ptr(), DTYPE_CODES[dtype], out.data_ptr())
    if status == 2:
        raise MemoryError("mopeq native dequantize: could not allocate its row buffers")
    return out if status == 0 else None
