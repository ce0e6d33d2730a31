"""Fused multi-axis RoPE: Triton kernels (``kernel.py``) and their host side (``ops.py``).

``multi_axis_rope`` rotates q and k by per-token integer positions on 1 to 4 axes;
``qk_norm_rope`` applies per-head RMSNorm to q and k first, in the same launch. Both dispatch: CUDA
tensors run the kernels, CPU tensors the PyTorch reference (``reference.py``) unless
``TRITON_INTERPRET=1``. See docs/kernels.md.
"""

from .ops import (
    RopeInplaceFunction,
    check_rope_args,
    interpreter_enabled,
    kernel_enabled,
    kernel_module,
    multi_axis_rope,
    qk_norm_rope,
    qk_norm_rope_backward_launch,
    rope_launch,
)

__all__ = [
    "RopeInplaceFunction",
    "check_rope_args",
    "interpreter_enabled",
    "kernel_enabled",
    "kernel_module",
    "multi_axis_rope",
    "qk_norm_rope",
    "qk_norm_rope_backward_launch",
    "rope_launch",
]
