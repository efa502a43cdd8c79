"""Fast matmul kernels for quantized Linears, chosen per layer at load time.

    quantkit.load(path, kernel="auto")         # fastest accepting kernel per layer, else reference
    apply_kernels(model, "cpu-int4")           # force one; fails with one line if a layer is refused
    kernels_used(model) -> {"cpu-int4": 210}   # what served the model (for `info` / `eval`)
"""

from quantkit.kernels.base import KernelError, KernelLinear, LayerSpec, spec_of
from quantkit.kernels.registry import (
    AUTO,
    KERNELS,
    REFERENCE,
    apply_kernels,
    check_kernel_name,
    kernel_names,
    kernels_used,
    select_kernel,
)

__all__ = ["AUTO", "KERNELS", "REFERENCE", "KernelError", "KernelLinear", "LayerSpec", "apply_kernels",
           "check_kernel_name", "kernel_names", "kernels_used", "select_kernel", "spec_of"]
