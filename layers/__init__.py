"""Invertible convolution layers behind one interface, with a plugin registry.

>>> import layers
>>> layers.available()
['butterfly', 'cinc', 'convexp', 'emerging', 'finc', 'glow-1x1', 'inverse-flow', 'macow', 'mintnet', 'snf', 'woodbury']
>>> layer = layers.create("inverse-flow", channels=12, kernel_size=3)
>>> z, logdet = layer(x)          # density direction
>>> x_again = layer.inverse(z)    # sampling direction
"""

from .base import (
    InvertibleLayer,
    LayerError,
    LayerInfo,
    LayerUnavailableError,
    Paper,
    UnknownLayerError,
    UnsupportedError,
)
from .registry import (
    ENTRY_POINT_GROUP,
    available,
    check_options,
    create,
    info,
    register,
    unavailable,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "InvertibleLayer",
    "LayerError",
    "LayerInfo",
    "LayerUnavailableError",
    "Paper",
    "UnknownLayerError",
    "UnsupportedError",
    "available",
    "check_options",
    "create",
    "info",
    "register",
    "unavailable",
    "unregister",
]
