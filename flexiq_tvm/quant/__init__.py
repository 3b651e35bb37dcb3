"""The FlexiQ math: INT8 quantization, bit extraction, ranking, ratio schedules, plan files and the
integer reference executor. numpy only: importable and testable without TVM."""
from .bitextract import bitlen, four_bit_code, lower, rounding_shift, shift_for_magnitude
from .build import build_plan, plan_layer
from .calibrators import CALIBRATORS, TensorStats, clip_value
from .int8 import dequant_scale, quantize_activation, quantize_weight, quantize_weight_with_scale
from .layer import LayerSpec
from .plan import LayerPlan, Plan, PlanError, model_fingerprint
from .reference import LayerReference, conv2d_int, dense_int
from .schedule import STANDARD_LEVELS, check_ratio

__all__ = ["bitlen", "four_bit_code", "lower", "rounding_shift", "shift_for_magnitude", "build_plan", "plan_layer",
           "CALIBRATORS", "TensorStats", "clip_value", "dequant_scale", "quantize_activation", "quantize_weight",
           "quantize_weight_with_scale", "LayerSpec", "LayerPlan", "Plan", "PlanError", "model_fingerprint",
           "LayerReference", "conv2d_int", "dense_int", "STANDARD_LEVELS", "check_ratio"]
