"""nncore: a small NumPy neural-network library (layers, losses, optimizers, solver)."""
from nncore.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError"]
