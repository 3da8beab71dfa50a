"""Invertible flow layers shared by f_vaes.py (and any Glow-style model).

Each layer: `y, logdet = layer(x)`, `x = layer.inverse(y)`; logdet is +log|det J| per
example. See `layers/flow.py` for the formulas.
"""

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

__all__ = ["ActNorm", "CondActNorm", "ConcatChannels", "CoupleWrapper", "FlowLayer", "InvConv",
           "Permute", "Reshape", "SplitChannels", "Squeeze", "UnSqueeze"]
