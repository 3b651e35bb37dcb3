"""The compiled artifact: ratio switching, calling, export and loading."""
from .compiled import CompiledModel, load_artifact

__all__ = ["CompiledModel", "load_artifact"]
