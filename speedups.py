"""Faster drop-ins for three Keras pieces the models use, each equal to Keras' own:

- `SameConv2D` equals `keras.layers.Conv2D(padding="same")`: the same function, keeping only
  the kernel taps that can touch data (the centre on a 1x1 map), computed as a matmul on tiny
  feature maps and for 1x1 kernels;
- `BatchNormalization` equals `keras.layers.BatchNormalization`: the same variables, outputs
  and moving statistics, with TensorFlow's fused kernel in training steps;
- `FusedAdam` equals `keras.optimizers.Adam`: the same update and saved state, with
  TensorFlow's fused kernel per variable.

Each equality is tested in tests/test_speed.py (losses, gradients, updates) and
tests/test_layers.py (outputs, moving statistics); docs/benchmark.md says what each buys.
The registered names are those the weights files were written with.
"""

import numpy as np
import tensorflow as tf
import keras
from keras import ops


def live_kernel_size(kernel_size, map_size):
    """The taps of a stride-1 "same" convolution that can ever touch data: on a map of h
    pixels an output pixel sees inputs at offsets -(h-1)..h-1, so at most 2h-1 taps per axis
    (a 3x3 kernel keeps only its centre on a 1x1 map, all of it from 2x2 up). `map_size`
    (h, w) may hold None (unknown): then the whole kernel."""
    return tuple(k if m is None else min(k, 2 * m - 1) for k, m in zip(kernel_size, map_size))


def centre_taps(array, shape):
    """The centre `shape[:2]` taps of a saved (kh, kw, c_in, c_out) kernel, or of its Adam
    moments: how a kernel saved whole loads into a layer that keeps only its live taps. An
    array of the layer's own shape, or of another, is returned as it is."""
    array = np.asarray(array)
    if array.shape == tuple(shape) or array.ndim != 4 or len(shape) != 4:
        return array
    (kh, kw), (lh, lw) = array.shape[:2], tuple(shape[:2])
    if array.shape[2:] != tuple(shape[2:]) or kh < lh or kw < lw or (kh - lh) % 2 or (kw - lw) % 2:
        return array
    top, left = (kh - lh) // 2, (kw - lw) // 2
    return array[top:top + lh, left:left + lw]


def cut_to(store, variables):
    """A Keras weights store ({"0": array, ...}, in the order of `variables`) with each array
    cut to its variable's live taps (`centre_taps`), for `load_own_variables`."""
    return {key: centre_taps(store[key], variables[int(key)].shape)
            if key.isdigit() and int(key) < len(variables) else store[key] for key in store.keys()}


def dead_taps(model):
    """How many kernel numbers `model`'s SameConv2D layers leave out, against the whole
    kernels of the same model built with keras.layers.Conv2D (as the author's code does)."""
    count = 0
    for layer in model._flatten_layers():
        if isinstance(layer, SameConv2D) and layer.built:
            whole = int(np.prod(layer.kernel_size)) * int(np.prod(layer.kernel.shape[2:]))
            count += whole - int(np.prod(layer.kernel.shape))
    return count


class _CentreOfFullKernel:
    """Initialises live taps as the centre of the whole kernel `initializer` draws: a model
    built from a seed holds the same numbers in the taps it keeps as the whole kernel held."""

    def __init__(self, initializer, full_shape):
        self.initializer, self.full_shape = initializer, tuple(full_shape)

    def __call__(self, shape, dtype=None):
        return ops.convert_to_tensor(centre_taps(ops.convert_to_numpy(
            self.initializer(self.full_shape, dtype=dtype)), shape), dtype=dtype)


@keras.saving.register_keras_serializable(package="flow_layers")
class SameConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D(filters, kernel_size, padding="same")`, the same function, with
    only the kernel taps that can touch data stored and trained, computed as one matmul when
    the feature map is at most (k+1)//2 pixels high and wide (1x1 and 2x2 for a 3x3 kernel).

    Live taps. On a 1x1 map only the centre tap of a 3x3 kernel ever multiplies data; the
    other eight multiply zero padding, get zero gradients and would stay at their initial
    values forever, yet cost optimiser updates, memory and checkpoint space. Built on a map
    of known size, the layer keeps `live_kernel_size` taps (its config still says the whole
    `kernel_size`, the model's definition), initialised as the centre of the whole kernel the
    initializer draws, so a seed gives the same numbers as a whole kernel would in every
    live tap. A weights file saved with whole kernels loads its centre taps (the weights and
    the Adam moments, `FusedAdam`).

    Small maps. On a map at most (k+1)//2 pixels wide every output pixel sees every input
    pixel, through the tap at their offset, and the rest of the kernel only ever multiplies
    zero padding. The whole layer is then `y = x.reshape(b, h*w*c_in) @ K_big`, where block
    (p, i) of K_big is the tap `kernel[p - i + k//2]`; on a 1x1 map K_big is the centre tap.
    TensorFlow's CPU convolution is slow on such maps (forward and backward 4-15x slower than
    the matmul), and in f-VAEs the last flow levels and their factor-outs run on 2x2 and 1x1
    maps. Larger maps use the ordinary convolution. A 1x1 kernel is a matmul on the channel
    axis up to 4x4 maps (where it is as fast as the convolution or faster) and the
    convolution above (oneDNN's 1x1 convolution is about 8 % faster forward and backward on
    8x8 to 32x32 maps of 512 channels, the Glow baseline's largest layers).
    """

    MATMUL_MAX_PIXELS = 16  # 1x1 kernels: a matmul on maps of at most this many pixels

    def __init__(self, filters, kernel_size=3, **kwargs):
        kwargs.setdefault("padding", "same")
        super().__init__(filters, kernel_size, **kwargs)
        if (self.padding != "same" or tuple(self.strides) != (1, 1)
                or tuple(self.dilation_rate) != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"
                or any(k % 2 == 0 for k in self.kernel_size)):
            raise ValueError("SameConv2D needs padding='same', strides 1, dilation 1, groups 1, "
                             f"channels_last and an odd kernel size, got {self.get_config()}")

    def build(self, input_shape):
        full_size, initializer = self.kernel_size, self.kernel_initializer
        live_size = live_kernel_size(full_size, input_shape[1:3])
        if live_size != full_size:  # Keras' build, given the live size and the centre's values
            self.kernel_size = live_size
            self.kernel_initializer = _CentreOfFullKernel(
                initializer, (*full_size, input_shape[-1], self.filters))
        try:
            super().build(input_shape)
        finally:
            self.kernel_size, self.kernel_initializer = full_size, initializer

    def load_own_variables(self, store):
        variables = self._trainable_variables + self._non_trainable_variables
        super().load_own_variables(cut_to(store, variables))

    def convolution_op(self, inputs, kernel):
        h, w = inputs.shape[1:3]
        kh, kw = kernel.shape[:2]  # the live taps
        if kh == kw == 1 and h is not None and w is not None and h * w <= self.MATMUL_MAX_PIXELS:
            # a 1x1 convolution on a small map: one 2-D matmul over all pixels (a 4-D input
            # would make it a broadcast batch matmul, whose kernel gradient sums per-image
            # products)
            c_in, c_out = kernel.shape[2], kernel.shape[3]
            outputs = ops.matmul(ops.reshape(inputs, (-1, c_in)), kernel[0, 0])
            return ops.reshape(outputs, (-1, h, w, c_out))
        if h is None or w is None or h > (kh + 1) // 2 or w > (kw + 1) // 2:
            return super().convolution_op(inputs, kernel)
        c_in, c_out = kernel.shape[2], kernel.shape[3]
        # taps[p, i]: the kernel tap linking input pixel p to output pixel i (row-major)
        pixels = [(r, c) for r in range(h) for c in range(w)]
        taps = np.array([[(pr - ir + kh // 2) * kw + (pc - ic + kw // 2) for ir, ic in pixels]
                         for pr, pc in pixels], dtype="int32")
        blocks = ops.take(ops.reshape(kernel, (kh * kw, c_in, c_out)), taps, axis=0)
        dense = ops.reshape(ops.transpose(blocks, (0, 2, 1, 3)), (h * w * c_in, h * w * c_out))
        outputs = ops.matmul(ops.reshape(inputs, (-1, h * w * c_in)), dense)
        return ops.reshape(outputs, (-1, h, w, c_out))


# Below this many channels a bfloat16/float16 batch is normalised in float32 (measured, see
# BatchNormalization).
FLOAT32_BELOW_CHANNELS = 16


@keras.saving.register_keras_serializable(package="flow_layers")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization`, the same variables, outputs and moving statistics,
    whose training-mode forward and backward pass on an NHWC image batch is one fused
    TensorFlow op each (`FusedBatchNormV3` and its gradient) instead of Keras 3's ten or so
    element-wise ops and reductions. That is 10-15% of a Deep InfoMax training step on a CPU.

    The fused kernel normalises with the biased batch variance, as Keras does, but returns
    the unbiased one (times n/(n-1)); it is scaled back so that the moving variance follows
    Keras 3's rule. Under a mixed policy the kernel takes the bfloat16 or float16 batch as it
    is, with float32 scale, offset and statistics (Keras casts the batch to float32 and back
    around ten ops), except a batch of fewer than FLOAT32_BELOW_CHANNELS channels, which is
    normalised in float32 and cast back: oneDNN's bfloat16 kernel is several times slower than
    its float32 one on such narrow maps (the f-VAE's 12-channel blocks at 32x32: 12.4 against
    1.45 ms a layer, forward and backward; docs/precision.md). Anything else (inference, masks,
    `synchronized=True` across replicas, renorm, other ranks or dtypes, other backends) takes
    Keras' own path. The class keeps Keras' name so that weights files are interchangeable
    with `keras.layers.BatchNormalization`.
    """

    def _fused_applies(self, inputs, training, mask):
        return (training is True and self.trainable and mask is None and not self.synchronized
                and not self.renorm and self.center and self.scale
                and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and inputs.dtype in ("float32", "bfloat16", "float16")
                and keras.backend.backend() == "tensorflow")

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        if inputs.dtype != "float32" and inputs.shape[-1] < FLOAT32_BELOW_CHANNELS:
            return tf.cast(self._fused(tf.cast(inputs, "float32")), inputs.dtype)
        return self._fused(inputs)

    def _fused(self, inputs):
        outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC",
            is_training=True)[:3]
        shape = tf.shape(inputs)
        count = tf.cast(shape[0] * shape[1] * shape[2], unbiased_variance.dtype)
        variance = unbiased_variance * tf.maximum(count - 1.0, 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


@keras.saving.register_keras_serializable(package="common")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`: the same update, hyperparameters and saved state (m and v),
    with each variable updated by TensorFlow's fused Adam kernel in one pass over var, m and
    v instead of Keras' nine element-wise ops (about a third of the time of Keras' update for
    the f-VAE's parameters, docs/benchmark.md); a kernel's moments saved whole load into the
    live taps of a `SameConv2D` kernel. The kernel computes Keras' formula:
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= lr sqrt(1 - b2^t) / (1 - b1^t) m /
    (sqrt(v) + eps). Sparse gradients and amsgrad take Keras' own path. Under tf.distribute
    Keras calls `update_step` once per device inside `distribution.extended.update`, where
    `variable.handle` is that device's copy: each copy gets its own fused update
    (tests/test_distribute.py compares the Adam moments with one device's).
    """

    def load_own_variables(self, store):
        """Keras' loading, with the moments of a kernel saved whole cut to the taps its
        layer keeps (`SameConv2D`)."""
        super().load_own_variables(cut_to(store, self.variables))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Keras' loop over the variables, with the step's scalars (Adam's bias corrections,
        the learning rate, epsilon) made once per dtype and device instead of once per
        variable: the same numbers, and about 8 fewer ops per variable in the traced step (the
        f-VAE 64 has 826 variables; docs/benchmark.md, "Start-up")."""
        self._step_scalars = {}
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._step_scalars = None

    def _scalars(self, dtype, device, learning_rate):
        """beta1^t, beta2^t, lr, beta1, beta2, epsilon in `dtype`, t = the step being taken."""
        key = (str(dtype), device)
        cache = getattr(self, "_step_scalars", None)
        if cache is not None and key in cache:
            return cache[key]
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        scalars = dict(beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                       lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                       epsilon=tf.cast(self.epsilon, dtype))
        if cache is not None:
            cache[key] = scalars
        return scalars

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices) or not hasattr(variable, "handle"):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            grad=tf.cast(gradient, dtype),
            **self._scalars(dtype, variable.device, learning_rate))
