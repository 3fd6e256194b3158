"""Build (once per machine and torch version) and load the C++ bitmask kernel.

The extension is compiled on first use with torch's cpp_extension into a cache folder
(``$LOSA_ZERO_KERNEL_CACHE``, default ``~/.cache/losa-zero/kernels``); later processes load
the built library. Where no C++ compiler is present (or the build fails) one line says so
and :func:`load_kernel` returns ``None``: callers then keep the dense linears.
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
# the torch binding, then the row loop compiled once per instruction set (chosen at run time)
SOURCES = [HERE / f"bitmask_{name}.cpp" for name in ("linear", "rows_avx512", "rows_avx2", "rows_scalar")]
HEADERS = [HERE / "bitmask_rows.h", HERE / "bitmask_rows_api.h"]
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
    """The compiled extension module (``matmul``, ``decompress``, ``isa``), or ``None``."""
    if "module" in _STATE:
        return _STATE["module"]
    module = None
    if _compiler() is None:
        log.warning("losa-zero: no C++ compiler found (c++ / g++; set CXX): sparse kernels disabled, "
                    "linears stay dense; install one (e.g. apt-get install g++) to enable them")
    else:
        from torch.utils.cpp_extension import load

        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        try:
            module = load(
                name="losa_zero_bitmask_linear",
                sources=[str(p) for p in SOURCES],
                build_directory=str(build),
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # a broken toolchain must not stop inference: fall back to dense
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("losa-zero: building the sparse kernel in %s failed (%s): linears stay dense; "
                        "rerun with LOSA_ZERO_KERNEL_VERBOSE=1 to see the compiler output", build, first)
            module = None
    _STATE["module"] = module
    return module


def kernel_available() -> bool:
    return load_kernel(verbose=os.environ.get("LOSA_ZERO_KERNEL_VERBOSE") == "1") is not None
