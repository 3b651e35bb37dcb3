"""flexiq-tvm: FlexiQ adaptive mixed-precision quantization as a TVM (Relax) plugin.

    import flexiq_tvm as fq
    model = fq.load_model("model.onnx")
    plan = fq.quantize(model, "calib.npz")
    cm = fq.compile(model, plan, target="llvm")
    cm.set_ratio(0.5); y = cm(x)
"""
from ._version import __version__  # noqa: E402
from .api import compile, compile_float, quantize, tune  # noqa: E402,A001
from .errors import DataError, FlexiQError, ModelError  # noqa: E402
from .frontend import FloatModel, load_model  # noqa: E402
from .search.finetune import FinetuneConfig  # noqa: E402
from .quant import LayerSpec, Plan, PlanError  # noqa: E402
from .runtime import CompiledModel, load_artifact  # noqa: E402
from .transform import get_pipeline  # noqa: E402

__all__ = ["load_model", "quantize", "compile", "tune", "compile_float", "load_artifact", "Plan", "PlanError",
           "CompiledModel", "get_pipeline", "FinetuneConfig", "FloatModel", "LayerSpec", "FlexiQError", "ModelError", "DataError", "__version__"]
