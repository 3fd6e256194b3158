#!/usr/bin/env bash
# Installs losa-zero and everything it needs into the current Python environment.
# CPU machines: the pinned torch 2.13.0 (CPU build where one lies on disk). GPU machines:
# install torch 2.13.0 for your CUDA first (https://pytorch.org), then run this script;
# pip keeps the installed torch. DeepSpeed is built against the installed torch
# (--no-build-isolation), so its build never pulls a second, CUDA, torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install --quiet --upgrade pip
$PY -m pip install --quiet "torch==2.13.0"
$PY -m pip install --quiet ninja wheel setuptools "pydantic>=2" hjson msgpack einops py-cpuinfo psutil
$PY -m pip install --quiet --no-build-isolation "deepspeed==0.19.8"
$PY -m pip install --quiet -e ".[dev]"
# the C++ kernels (sparse linear, SparseGPT column loop), built now (a minute or so) so that
# their first use does not wait for the compiler; without a compiler one warning line says
# so, and a later use builds them
$PY -c "from losa_zero.kernels import kernel_available; kernel_available()"
$PY -c "import losa_zero, torch, deepspeed, transformers; print('losa-zero', losa_zero.__version__, '| torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
