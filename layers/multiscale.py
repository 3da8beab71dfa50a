"""The multi-scale flow of the f-VAE and Glow papers, composed of the layers of
`layers/flow.py`: a step (ActNorm -> Permute -> additive coupling), the factor-out that ends a
level, and the stack of levels. Every part returns `(output, logdet)` and knows its
`inverse`, so the generator walks the same layers backwards.

The layer names (`level{i}_step{k}`, `level{i}_factor_out`, `final_actnorm`, ...) are the
paths of the weights in saved .weights.h5 files: keep them.
"""

import numpy as np
import keras
from keras import ops

from layers.flow import (ActNorm, CondActNorm, CoupleWrapper, FlowLayer, Permute, Reshape,
                         SplitChannels, Squeeze)
from speedups import SameConv2D


def coupling_net(channels_out, width):
    """NN of the additive coupling: Conv3x3(width) -> ReLU -> Conv1x1(width) -> ReLU ->
    Conv3x3(C/2) with a zero kernel, so that every coupling starts as the identity.
    `SameConv2D` is Conv2D(padding="same") computed without the zero padding on the 2x2 and
    1x1 maps of the last levels (the same weights, the same function)."""
    return keras.Sequential([
        SameConv2D(width, 3, activation="relu"),
        SameConv2D(width, 1, activation="relu"),
        SameConv2D(channels_out, 3, kernel_initializer="zeros"),
    ])


class FlowStep(FlowLayer):
    """ActNorm -> Permute (fixed random) -> additive coupling x2 += NN(x1); log-det of ActNorm."""

    def __init__(self, channels, width, seed, **kwargs):
        super().__init__(**kwargs)
        self.parts = [ActNorm(name="actnorm"), Permute("random", seed=seed, name="permute"),
                      CoupleWrapper(coupling_net(channels - channels // 2, width), name="coupling")]

    def call(self, x, inverse=False):
        logdet = 0.0
        for part in (reversed(self.parts) if inverse else self.parts):
            x, part_logdet = part(x, inverse=inverse)
            logdet = logdet + part_logdet
        return x, logdet


class FactorOut(FlowLayer):
    """End of a level: split (x1, x2); x2 -> CondActNorm conditioned on x1 -> flattened and set
    aside; x1 -> Squeeze, to the next level. `(next_x, set_aside), logdet = factor_out(x)`, the
    flow layers' `(y, logdet)` with y a pair (as SplitChannels'); `inverse((next_x, set_aside))`
    undoes it."""

    def __init__(self, shape, squeeze=True, **kwargs):
        super().__init__(**kwargs)
        h, w, c = shape
        self.split = SplitChannels(name="split")
        self.cond_norm = CondActNorm(name="cond_actnorm")
        self.flatten = Reshape((-1,), source_shape=(h, w, c - c // 2), name="flatten")
        self.squeeze = Squeeze(2, name="squeeze") if squeeze else None  # Glow: at level starts

    def call(self, x):
        (x1, x2), _ = self.split(x)
        x2, logdet = self.cond_norm([x2, x1])
        set_aside, _ = self.flatten(x2)
        x = self.squeeze(x1)[0] if self.squeeze else x1
        return (x, set_aside), logdet

    def inverse(self, y):
        x, set_aside = y
        x1 = self.squeeze.inverse(x) if self.squeeze else x
        x2 = self.cond_norm.inverse([self.flatten.inverse(set_aside), x1])
        return self.split.inverse([x1, x2])


class MultiScaleFlow(FlowLayer):
    """F: x (H x W x C) -> z (d = H * W * C numbers), `levels` x `depth` FlowSteps with a
    FactorOut between levels, a final ActNorm, and all parts concatenated (set-aside first).
    With `squeeze_first` False (the f-VAE) the squeeze ends a level, inside its FactorOut;
    with it True (Glow, as in the author's glow.py) each level starts with one and the
    FactorOut has none.

    `z, logdet = flow(x)` with logdet = +log|det dz/dx| per example; `flow.inverse(z)` walks
    the same layers backwards.
    """

    def __init__(self, shape, level, depth, width, seed, squeeze_first=False, **kwargs):
        super().__init__(**kwargs)
        seeds = iter(np.random.RandomState(seed).randint(0, 2**31 - 1, size=level * depth))
        h, w, c = shape
        self.steps, self.factor_outs, self.part_sizes, self.squeezes = [], [], [], []
        for i in range(level):
            if squeeze_first:
                self.squeezes.append(Squeeze(2, name=f"level{i}_squeeze"))
                h, w, c = h // 2, w // 2, 4 * c
            self.steps += [FlowStep(c, width, int(next(seeds)), name=f"level{i}_step{k}")
                           for k in range(depth)]
            if i < level - 1:
                self.factor_outs.append(FactorOut((h, w, c), squeeze=not squeeze_first,
                                                  name=f"level{i}_factor_out"))
                self.part_sizes.append(h * w * (c - c // 2))
                h, w, c = (h, w, c // 2) if squeeze_first else (h // 2, w // 2, 4 * (c // 2))
        self.depth = depth
        self.final_norm = ActNorm(name="final_actnorm")
        self.final_flatten = Reshape((-1,), source_shape=(h, w, c), name="final_flatten")
        self.part_sizes.append(h * w * c)

    def levels(self):
        """(its Squeeze or None, steps of level i, its FactorOut or None), in forward order."""
        for i in range(len(self.factor_outs) + 1):
            steps = self.steps[i * self.depth:(i + 1) * self.depth]
            yield (self.squeezes[i] if self.squeezes else None, steps,
                   self.factor_outs[i] if i < len(self.factor_outs) else None)

    def call(self, x):
        logdet, set_aside = 0.0, []
        for squeeze, steps, factor_out in self.levels():
            if squeeze is not None:
                x, _ = squeeze(x)
            for step in steps:
                x, step_logdet = step(x)
                logdet = logdet + step_logdet
            if factor_out is not None:
                (x, part), part_logdet = factor_out(x)
                set_aside.append(part)
                logdet = logdet + part_logdet
        x, norm_logdet = self.final_norm(x)
        set_aside.append(self.final_flatten(x)[0])
        return ops.concatenate(set_aside, axis=-1), logdet + norm_logdet

    def inverse(self, z):
        parts = ops.split(z, np.cumsum(self.part_sizes)[:-1].tolist(), axis=-1)
        x = self.final_norm.inverse(self.final_flatten.inverse(parts[-1]))
        for (squeeze, steps, factor_out), part in zip(reversed(list(self.levels())),
                                                      [None] + parts[-2::-1]):
            if factor_out is not None:
                x = factor_out.inverse((x, part))
            for step in reversed(steps):
                x = step.inverse(x)
            if squeeze is not None:
                x = squeeze.inverse(x)
        return x
