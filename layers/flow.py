"""Invertible layers for normalising flows (Glow / f-VAEs), as Keras 3 layers.

Every layer here follows one contract:

    y, logdet = layer(x)                   # forward
    x, logdet_inv = layer(y, inverse=True)  # inverse, with the same weights
    x = layer.inverse(y)                    # the same, output only

`logdet` is **+log|det dy/dx|** of the map just applied, one value per example (shape
`(batch,)`), so a flow's negative log-likelihood is `prior(z) - sum(logdets)`. (The
author's Keras 2 code adds the *negative* log-determinant to the loss instead; the value
is the same up to that sign.) The inverse direction returns the log-determinant of the
inverse map, i.e. minus the forward one at the same point.

Images are channels-last `(batch, height, width, channels)`.
"""

import numpy as np
import tensorflow as tf
import keras
from keras import ops

from speedups import SameConv2D  # Conv2D(padding="same"), faster on 1x1 and 2x2 maps

_PACKAGE = "flow_layers"


def _per_example(value, x):
    """Broadcast a scalar log-determinant to one value per example of `x`."""
    batch = ops.shape(x)[0]
    return ops.ones((batch,), dtype=x.dtype) * ops.cast(value, x.dtype)


def _zeros_per_example(x):
    return ops.zeros((ops.shape(x)[0],), dtype=x.dtype)


def _spatial_size(x):
    """h*w of an image tensor (the product of all axes between batch and channels)."""
    size = 1
    for axis, d in enumerate(x.shape[1:-1], start=1):
        size = size * (d if d is not None else ops.shape(x)[axis])
    return size


def _require_image(shape, layer, what="input"):
    if len(shape) != 4:
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}': {what} must be an image tensor of rank 4 "
            f"(batch, height, width, channels), got shape {tuple(shape)}")


def _seed_or_draw(seed):
    """A fixed integer seed, drawn now if none is given, so that it can go into the config."""
    return int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)


class FlowLayer(keras.layers.Layer):
    """Base class: `call(inputs, inverse=False) -> (outputs, logdet)`; `inverse(y) -> x`.

    A flow layer computes in the dtype of the weights, float32, also under a mixed global
    policy (a `dtype` argument overrides it; under a float64 policy, float64): its state path
    and log-determinant decide the likelihood and the inverse, which low precision breaks.
    Networks inside it (a coupling's `nn`) keep the policy they were built with, and their
    outputs are cast back to the layer's dtype.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", keras.config.dtype_policy().variable_dtype)
        super().__init__(**kwargs)

    def inverse(self, outputs):
        return self(outputs, inverse=True)[0]


# --------------------------------------------------------------------------- squeeze

@keras.saving.register_keras_serializable(package=_PACKAGE)
class Squeeze(FlowLayer):
    """Space-to-depth: (b, h, w, c) -> (b, h/f, w/f, c*f*f); log-determinant 0.

    Channel order is that of `tf.nn.space_to_depth`: output channel `(i*f + j)*c + k` holds
    input pixel `(f*y + i, f*x + j)`, channel `k`. `UnSqueeze` is the exact inverse.
    """

    def __init__(self, factor=2, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def build(self, input_shape):
        pass  # no weights; shapes are checked in call (forward and inverse differ)

    def _squeeze(self, x):
        _require_image(x.shape, self)
        f = self.factor
        h, w, c = x.shape[1:]
        if (h is not None and h % f) or (w is not None and w % f):
            raise ValueError(f"{self.__class__.__name__} '{self.name}': height and width must be "
                             f"divisible by factor {f}, got shape {tuple(x.shape)}")
        return tf.nn.space_to_depth(x, f)  # one op, where reshape-transpose-reshape is three

    def _unsqueeze(self, x):
        _require_image(x.shape, self)
        f = self.factor
        c = x.shape[-1]
        if c % (f * f):
            raise ValueError(f"{self.__class__.__name__} '{self.name}': channels must be divisible "
                             f"by factor**2 = {f * f}, got shape {tuple(x.shape)}")
        return tf.nn.depth_to_space(x, f)

    def call(self, inputs, inverse=False):
        y = self._unsqueeze(inputs) if inverse else self._squeeze(inputs)
        return y, _zeros_per_example(inputs)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class UnSqueeze(Squeeze):
    """Depth-to-space: (b, h, w, c) -> (b, h*f, w*f, c/f^2); the exact inverse of `Squeeze`."""

    def call(self, inputs, inverse=False):
        y = self._squeeze(inputs) if inverse else self._unsqueeze(inputs)
        return y, _zeros_per_example(inputs)


# --------------------------------------------------------------------------- normalisation

@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActNorm(FlowLayer):
    """y = exp(log_scale) * x + shift, per channel, both zero-initialised (identity at start).

    log-determinant: h * w * sum(log_scale) (the product of all non-batch, non-channel axes).
    Not data-initialised, as in f-VAEs.
    """

    def __init__(self, use_shift=True, **kwargs):
        super().__init__(**kwargs)
        self.use_shift = bool(use_shift)

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"ActNorm '{self.name}': input needs a channel axis, got {input_shape}")
        c = input_shape[-1]
        self.log_scale = self.add_weight(shape=(c,), initializer="zeros", name="log_scale")
        self.shift = (self.add_weight(shape=(c,), initializer="zeros", name="shift")
                      if self.use_shift else None)

    def call(self, inputs, inverse=False):
        logdet = _spatial_size(inputs) * ops.sum(self.log_scale)
        if not inverse:
            y = inputs * ops.exp(self.log_scale)
            if self.shift is not None:
                y = y + self.shift
            return y, _per_example(logdet, inputs)
        x = inputs - self.shift if self.shift is not None else inputs
        return x * ops.exp(-self.log_scale), _per_example(-logdet, inputs)

    def get_config(self):
        return {**super().get_config(), "use_shift": self.use_shift}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CondActNorm(FlowLayer):
    """Conditional ActNorm: `layer([x, cond])`, with `log_scale, shift = Conv3x3(cond)`.

    y = exp(log_scale) * x + shift, where the 3x3 convolution (padding same) gives 2*C_x
    channels, the first half log_scale and the second shift; kernel and bias are
    zero-initialised, so the layer starts as the identity. `cond` passes through unchanged
    and is not returned. log-determinant: sum of log_scale over h, w and channels, per example.
    In f-VAEs, `x` is the half factored out at the end of a level and `cond` the half kept.
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2
                and isinstance(input_shape[0], (list, tuple))):
            raise ValueError(f"CondActNorm '{self.name}' takes two inputs [x, cond], got {input_shape}")
        x_shape, cond_shape = input_shape
        _require_image(x_shape, self, "x")
        _require_image(cond_shape, self, "cond")
        self.conv = SameConv2D(2 * x_shape[-1], self.kernel_size, kernel_initializer="zeros",
                               bias_initializer="zeros", dtype=self.dtype_policy,
                               name="scale_shift")  # its log-scales are a log-determinant
        self.conv.build(tuple(cond_shape))

    def call(self, inputs, inverse=False):
        x, cond = inputs
        log_scale, shift = ops.split(self.conv(cond), 2, axis=-1)
        logdet = ops.sum(log_scale, axis=(1, 2, 3))
        if not inverse:
            return ops.exp(log_scale) * x + shift, logdet
        return (x - shift) * ops.exp(-log_scale), -logdet

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


# --------------------------------------------------------------------------- channel mixing

class _PermutationInit(keras.initializers.Initializer):
    def __init__(self, mode, seed):
        self.mode, self.seed = mode, seed

    def __call__(self, shape, dtype=None):
        (c,) = shape
        perm = (np.arange(c)[::-1] if self.mode == "reverse"
                else np.random.RandomState(self.seed).permutation(c))
        return ops.convert_to_tensor(perm.astype("int32"), dtype="int32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Permute(FlowLayer):
    """y[..., i] = x[..., perm[i]]: a fixed permutation of channels; log-determinant 0.

    `mode="random"` draws the permutation once at build time from `seed` (drawn at
    construction if not given, and kept in the config) and stores it as a non-trainable
    int32 weight, so it is saved and reloaded with the model; `mode="reverse"` reverses.
    Implemented as one gather on the channel axis, and its gradient as another.
    """

    def __init__(self, mode="random", seed=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("random", "reverse"):
            raise ValueError(f"Permute mode must be 'random' or 'reverse', got {mode!r}")
        self.mode = mode
        self.seed = _seed_or_draw(seed)

    def build(self, input_shape):
        self.permutation = self.add_weight(
            shape=(input_shape[-1],), dtype="int32", trainable=False, name="permutation",
            initializer=_PermutationInit(self.mode, self.seed))

    def call(self, inputs, inverse=False):
        perm = ops.convert_to_tensor(self.permutation)
        undo = ops.argsort(perm)
        if inverse:
            perm, undo = undo, perm
        return _permute_channels(inputs, perm, undo), _zeros_per_example(inputs)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "seed": self.seed}


def _permute_channels(x, perm, undo):
    """x[..., perm], whose gradient is the upstream gradient gathered with the inverse
    permutation `undo`: one gather, where the gradient of a gather on the channel axis
    scatters (transposes and a segment sum), several times dearer in an f-VAE step."""
    @ops.custom_gradient
    def permute(x):
        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return ops.take(upstream, undo, axis=-1)
        return ops.take(x, perm, axis=-1), grad
    return permute(x)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class InvConv(FlowLayer):
    """Invertible 1x1 convolution (Glow), LU-parametrised: y = x @ W on the channel axis.

    W = P L (U + diag(sign * exp(log_abs_s))), initialised from the LU decomposition (with
    partial pivoting) of a random orthogonal matrix drawn from `seed`. P and sign are fixed;
    L (unit lower-triangular), U (strictly upper-triangular) and log_abs_s are trained.
    log-determinant: h * w * sum(log_abs_s). The inverse multiplies by W^-1.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = _seed_or_draw(seed)

    def build(self, input_shape):
        c = int(input_shape[-1])
        q, _ = np.linalg.qr(np.random.RandomState(self.seed).randn(c, c))
        p, lower, upper = _lu(q)
        s = np.diag(upper)
        const = lambda value: (lambda shape, dtype=None: ops.convert_to_tensor(value, dtype))  # noqa: E731
        self.w_p = self.add_weight(shape=(c, c), trainable=False, name="p",
                                   initializer=const(p.astype("float32")))
        self.sign_s = self.add_weight(shape=(c,), trainable=False, name="sign_s",
                                      initializer=const(np.sign(s).astype("float32")))
        self.w_l = self.add_weight(shape=(c, c), name="l", initializer=const(lower.astype("float32")))
        self.w_u = self.add_weight(shape=(c, c), name="u",
                                   initializer=const(np.triu(upper, 1).astype("float32")))
        self.log_abs_s = self.add_weight(shape=(c,), name="log_abs_s",
                                         initializer=const(np.log(np.abs(s)).astype("float32")))
        self._upper_mask = np.triu(np.ones((c, c), "float32"), 1)
        self._eye = np.eye(c, dtype="float32")

    def kernel(self):
        lower = self.w_l * self._upper_mask.T + self._eye
        upper = self.w_u * self._upper_mask + ops.diag(self.sign_s * ops.exp(self.log_abs_s))
        return ops.matmul(self.w_p, ops.matmul(lower, upper))

    def call(self, inputs, inverse=False):
        logdet = _spatial_size(inputs) * ops.sum(self.log_abs_s)
        w = self.kernel()
        if not inverse:
            return ops.matmul(inputs, w), _per_example(logdet, inputs)
        return ops.matmul(inputs, ops.inv(w)), _per_example(-logdet, inputs)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def _lu(a):
    """a = P L U with partial pivoting (L unit lower-triangular); numpy only, build time."""
    n = a.shape[0]
    u = a.astype("float64").copy()
    lower = np.eye(n)
    perm = np.arange(n)
    for k in range(n - 1):
        pivot = k + int(np.argmax(np.abs(u[k:, k])))
        if pivot != k:
            u[[k, pivot]] = u[[pivot, k]]
            lower[[k, pivot], :k] = lower[[pivot, k], :k]
            perm[[k, pivot]] = perm[[pivot, k]]
        factors = u[k + 1:, k] / u[k, k]
        lower[k + 1:, k] = factors
        u[k + 1:] -= factors[:, None] * u[k]
    p = np.eye(n)[perm].T  # rows were taken in the order perm: a = P @ L @ U
    return p, lower, np.triu(u)


# --------------------------------------------------------------------------- split / reshape

@keras.saving.register_keras_serializable(package=_PACKAGE)
class SplitChannels(FlowLayer):
    """x -> [x1, x2], the first `c // 2` channels and the rest; inverse concatenates."""

    def call(self, inputs, inverse=False):
        if inverse:
            x1, x2 = inputs
            return ops.concatenate([x1, x2], axis=-1), _zeros_per_example(x1)
        c = inputs.shape[-1]  # ops.split, not slicing: its gradient is one concatenation
        return ops.split(inputs, [c // 2], axis=-1), _zeros_per_example(inputs)

@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConcatChannels(SplitChannels):
    """[x1, x2] -> x on the channel axis; inverse splits at `split` channels (default: half)."""

    def __init__(self, split=None, **kwargs):
        super().__init__(**kwargs)
        self.split = split

    def build(self, input_shape):
        if self.split is None and isinstance(input_shape, (list, tuple)) and len(input_shape) == 2:
            self.split = int(input_shape[0][-1])

    def call(self, inputs, inverse=False):
        if not inverse:
            x1, x2 = inputs
            return ops.concatenate([x1, x2], axis=-1), _zeros_per_example(x1)
        k = self.split if self.split is not None else inputs.shape[-1] // 2
        return ops.split(inputs, [k], axis=-1), _zeros_per_example(inputs)

    def get_config(self):
        return {**super().get_config(), "split": self.split}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Reshape(FlowLayer):
    """Reshape each example to `target_shape` (-1 allowed); inverse restores `source_shape`.

    `source_shape` (per example, without batch) is recorded when the layer is built on its
    forward input and kept in the config, so a reloaded layer can invert without a forward
    pass. `Reshape((-1,))` flattens. log-determinant 0.
    """

    def __init__(self, target_shape=(-1,), source_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.target_shape = tuple(int(d) for d in target_shape)
        self.source_shape = None if source_shape is None else tuple(int(d) for d in source_shape)

    def build(self, input_shape):
        pass  # the source shape is recorded on the first forward call

    def call(self, inputs, inverse=False):
        if inverse:
            if self.source_shape is None:
                raise ValueError(f"Reshape '{self.name}': inverse called before any forward pass; "
                                 "pass source_shape=(h, w, c) to the constructor")
            return ops.reshape(inputs, (-1, *self.source_shape)), _zeros_per_example(inputs)
        if self.source_shape is None:
            self.source_shape = tuple(int(d) for d in inputs.shape[1:])
        target = self.target_shape
        if -1 in target:  # resolve it, so that the output keeps a static shape
            known = int(np.prod([d for d in target if d != -1]))
            target = tuple(int(np.prod(self.source_shape)) // known if d == -1 else d for d in target)
        return ops.reshape(inputs, (-1, *target)), _zeros_per_example(inputs)

    def get_config(self):
        return {**super().get_config(), "target_shape": self.target_shape,
                "source_shape": self.source_shape}


# --------------------------------------------------------------------------- coupling

@keras.saving.register_keras_serializable(package=_PACKAGE)
class CoupleWrapper(FlowLayer):
    """Coupling layer around any Keras model `nn` (RealNVP / Glow).

    x1, x2 = the first c//2 channels and the rest; out = nn(x1);
      - additive, when out has as many channels as x2:  y2 = x2 + out,  log-determinant 0;
      - affine, when out has twice as many: log_scale, shift = split(out) (log_scale first),
        y2 = exp(log_scale) * x2 + shift,  log-determinant sum(log_scale) per example.
    y = concat(x1, y2). The inverse runs the same `nn` on x1 (unchanged) and undoes y2.
    """

    def __init__(self, nn, **kwargs):
        super().__init__(**kwargs)
        if isinstance(nn, dict):
            nn = keras.saving.deserialize_keras_object(nn)
        self.nn = nn

    def build(self, input_shape):
        c = input_shape[-1]
        half = (*input_shape[:-1], c // 2)
        if not self.nn.built:
            self.nn.build(half)
        out_c = self.nn.compute_output_shape(half)[-1]
        if out_c == c - c // 2:
            self.affine = False
        elif out_c == 2 * (c - c // 2):
            self.affine = True
        else:
            raise ValueError(f"CoupleWrapper '{self.name}': nn must give {c - c // 2} channels "
                             f"(additive) or {2 * (c - c // 2)} (affine) for input shape "
                             f"{tuple(input_shape)}, it gives {out_c}")

    def call(self, inputs, inverse=False):
        x1, x2 = ops.split(inputs, [inputs.shape[-1] // 2], axis=-1)
        out = ops.cast(self.nn(x1), x2.dtype)  # nn may compute in low precision, x2 does not
        if self.affine:
            log_scale, shift = ops.split(out, 2, axis=-1)
            logdet = ops.sum(ops.reshape(log_scale, (ops.shape(log_scale)[0], -1)), axis=1)
            if not inverse:
                y2 = ops.exp(log_scale) * x2 + shift
            else:
                y2, logdet = (x2 - shift) * ops.exp(-log_scale), -logdet
        else:
            y2 = x2 - out if inverse else x2 + out
            logdet = _zeros_per_example(inputs)
        return ops.concatenate([x1, y2], axis=-1), logdet

    def get_config(self):
        return {**super().get_config(), "nn": keras.saving.serialize_keras_object(self.nn)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["nn"] = keras.saving.deserialize_keras_object(config["nn"])
        return cls(**config)
