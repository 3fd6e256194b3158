"""RMI: LoSA's layer-wise sparsity from representation mutual information (method
sections 2-3): linear CKA between the layers' inputs on the first ``--cka-nsamples``
calibration sequences gives each layer an importance; the rates are the exact LP solution
within +- delta of the target."""
from __future__ import annotations

from ..allocation import rmi_importance, solve_layer_rates
from ..blockwise import layer_input_grams
from .base import Allocation, Allocator


class RmiAllocator(Allocator):
    name = "rmi"
    mixed_nm = True

    @property
    def beta(self) -> float:
        """The temperature: ``--beta``, else the released 1 with Wanda and 100 with SparseGPT."""
        if self.cfg.beta is not None:
            return self.cfg.beta
        return 100.0 if self.pruner == "sparsegpt" else 1.0

    def importance(self, model, calib, runtime):
        cfg = self.cfg
        n = min(cfg.cka_nsamples, calib.total)
        grams = layer_input_grams(model, calib.capture(n), runtime, cfg.calib_batch_size, n)
        importance, redundancy = rmi_importance(grams, self.beta)
        return [float(x) for x in importance], [float(x) for x in redundancy]

    def allocate(self, model, calib, runtime, target, delta) -> Allocation:
        importance, redundancy = self.importance(model, calib, runtime)
        return Allocation(solve_layer_rates(importance, target, delta), importance, redundancy)
