"""Model import and layer discovery: knows TVM's frontends, nothing about FlexiQ's math."""
from .model import FloatModel, load_model

__all__ = ["FloatModel", "load_model"]
