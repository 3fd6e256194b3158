"""Where LoSA's dense reconstruction targets live on the single-process path."""
from __future__ import annotations

import torch

from losa_zero.runtime import Runtime


def test_dense_targets_are_kept_on_the_host_when_computing_on_an_accelerator():
    """keep_activation moves a target off the compute device (a fake CUDA tensor stands in
    for a GPU), and leaves a host tensor where it is (no copy)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    runtime = Runtime("cuda")
    with FakeTensorMode():
        on_gpu = torch.empty(4, 16, 8, device="cuda")
        kept = runtime.keep_activation(0, on_gpu)
        assert on_gpu.device.type == "cuda" and kept.device.type == "cpu"
    host = torch.randn(2, 3)
    assert Runtime("cpu").keep_activation(0, host) is host
