"""Invertible flow layers shared by f_vaes.py and glow.py, and the multi-scale flow built of them.

Each layer: `y, logdet = layer(x)`, `x = layer.inverse(y)`; logdet is +log|det J| per
example. See `layers/flow.py` for the formulas, `layers/multiscale.py` for the composition
(flow step, factor-out, multi-scale flow).
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
from layers.multiscale import FactorOut, FlowStep, MultiScaleFlow, coupling_net

__all__ = ["ActNorm", "CondActNorm", "ConcatChannels", "CoupleWrapper", "FlowLayer", "InvConv",
           "Permute", "Reshape", "SplitChannels", "Squeeze", "UnSqueeze",
           "FactorOut", "FlowStep", "MultiScaleFlow", "coupling_net"]
