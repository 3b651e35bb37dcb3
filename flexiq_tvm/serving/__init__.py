"""Adaptive serving (METHOD section 6): the ratio controller, the batching loop, the KServe v2 server.

`RatioController` and the simulator (`sim`) are pure Python over measured numbers; `ServingLoop`
wraps one `CompiledModel`; `InferenceServer` speaks the Open Inference Protocol over HTTP
(`flexiq serve model.so --slo-ms 50`).
"""
from .controller import ControllerError, RateMeter, RatioController, ServiceTimes
from .loop import ServingLoop
from .sim import poisson_trace, simulate, summarize, swing_trace

__all__ = ["ControllerError", "RateMeter", "RatioController", "ServiceTimes", "ServingLoop", "InferenceServer",
           "poisson_trace", "simulate", "summarize", "swing_trace"]


def __getattr__(name):
    if name == "InferenceServer":
        from .server import InferenceServer

        return InferenceServer
    raise AttributeError(name)
