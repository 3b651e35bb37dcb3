"""TIR compute definitions (``compute``) and per-target schedules (``llvm``) of the FlexiQ
layer kernels.  Importable on its own: nothing here imports the rest of ``flexiq_tvm``."""

from .compute import (  # noqa: F401
    KERNEL_ATTR,
    choose_conv_layout,
    choose_ob,
    conv2d_int8,
    conv_out_shape,
    conv_weight_layout_shape,
    dense_int8,
    dense_weight_layout_shape,
    lower_weight,
    prepack_weight,
    quantize_act,
)
