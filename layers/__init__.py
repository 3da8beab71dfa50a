"""Invertible flow layers shared by f_vaes.py (and any Glow-style model).

Each layer: `y, logdet = layer(x)`, `x = layer.inverse(y)`; logdet is +log|det J| per
example. See `layers/flow.py` for the formulas. Also two drop-in faster versions of Keras
layers the models use: `SameConv2D` (Conv2D) and `BatchNormalization`.
"""

from layers.conv import SameConv2D
from layers.norm import BatchNormalization
from layers.flow import (
    ActNorm,
    CondActNorm,
    ConcatChannels,
    CoupleWrapper,
    FlowLayer,
    InvConv,
    Permute,
    Reshape,
    SplitChannels,
    Squeeze,
    UnSqueeze,
)

__all__ = ["ActNorm", "BatchNormalization", "CondActNorm", "ConcatChannels", "CoupleWrapper",
           "FlowLayer", "InvConv", "Permute", "Reshape", "SameConv2D", "SplitChannels", "Squeeze",
           "UnSqueeze"]
