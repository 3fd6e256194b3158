"""Build (once per machine and torch version) and load losa-zero's C++ CPU kernels: the
bitmask sparse linear and SparseGPT's column loop, one extension.

The extension is compiled on first use with torch's cpp_extension into a cache folder
(``$LOSA_ZERO_KERNEL_CACHE``, default ``~/.cache/losa-zero/kernels``); later processes load
the built library. Where no C++ compiler is present (or the build fails) one line says so
and :func:`load_kernel` returns ``None``: callers then fall back to torch (sparse linears stay
dense, SparseGPT runs its column loop as torch operations, with the same results).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# the torch binding, the row loop compiled once per instruction set (chosen at run time), and
# SparseGPT's column loop
SOURCES = [HERE / f"bitmask_{name}.cpp" for name in ("linear", "rows_avx512", "rows_avx2", "rows_scalar")]
SOURCES.append(HERE / "sparsegpt_block.cpp")
HEADERS = [HERE / "bitmask_rows.h", HERE / "bitmask_rows_api.h", HERE / "sparsegpt_block.h"]
_STATE: dict = {}


def cache_dir() -> Path:
    """One folder per torch / Python version and kernel source: processes running different
    versions of the sources (two checkouts) never rebuild over each other's library."""
    root = os.environ.get("LOSA_ZERO_KERNEL_CACHE") or Path.home() / ".cache" / "losa-zero" / "kernels"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return Path(root) / tag


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def load_kernel(verbose: bool = False):
    """The compiled extension module (``matmul``, ``decompress``, ``isa``, ``sparsegpt_block``),
    or ``None``."""
    if "module" in _STATE:
        return _STATE["module"]
    module = None
    if _compiler() is None:
        log.warning("losa-zero: no C++ compiler found (c++ / g++; set CXX): compiled CPU kernels disabled "
                    "(sparse linears stay dense, SparseGPT's column loop runs slower in torch); install one "
                    "(e.g. apt-get install g++) to enable them")
    else:
        from torch.utils.cpp_extension import load

        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        try:
            module = load(
                name="losa_zero_cpu_kernels",
                sources=[str(p) for p in SOURCES],
                build_directory=str(build),
                # no fused multiply-add: the SparseGPT loop must round exactly as its torch twin
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # a broken toolchain must not stop inference: fall back to dense
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("losa-zero: building the CPU kernels in %s failed (%s): linears stay dense, SparseGPT "
                        "loops in torch; "
                        "rerun with LOSA_ZERO_KERNEL_VERBOSE=1 to see the compiler output", build, first)
            module = None
    _STATE["module"] = module
    return module


def kernel_available() -> bool:
    return load_kernel(verbose=os.environ.get("LOSA_ZERO_KERNEL_VERBOSE") == "1") is not None
