"""A "same" convolution that skips the zero padding on tiny feature maps."""

import numpy as np
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="flow_layers")
class SameConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D(filters, kernel_size, padding="same")`, the same weights and the
    same function, computed as one matmul when the feature map is at most (k+1)//2 pixels
    high and wide (1x1 and 2x2 for a 3x3 kernel).

    On such a map every output pixel sees every input pixel, through the kernel tap at their
    offset, and the rest of the kernel only ever multiplies zero padding. The whole layer is
    then `y = x.reshape(b, h*w*c_in) @ K_big`, where block (p, i) of K_big is the tap
    `kernel[p - i + k//2]`; on a 1x1 map K_big is the centre tap. TensorFlow's CPU
    convolution is slow on such maps (forward and backward 4-15x slower than the matmul),
    and in f-VAEs the last flow levels and their factor-outs run on 2x2 and 1x1 maps.
    Larger maps use the ordinary convolution, except with a 1x1 kernel, which is always a
    matmul on the channel axis (15-30% faster forward and backward than TensorFlow's CPU
    convolution).
    """

    def __init__(self, filters, kernel_size=3, **kwargs):
        kwargs.setdefault("padding", "same")
        super().__init__(filters, kernel_size, **kwargs)
        if (self.padding != "same" or tuple(self.strides) != (1, 1)
                or tuple(self.dilation_rate) != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"
                or any(k % 2 == 0 for k in self.kernel_size)):
            raise ValueError("SameConv2D needs padding='same', strides 1, dilation 1, groups 1, "
                             f"channels_last and an odd kernel size, got {self.get_config()}")

    def convolution_op(self, inputs, kernel):
        h, w = inputs.shape[1:3]
        kh, kw = self.kernel_size
        if kh == kw == 1:  # a 1x1 convolution is a matmul on the channel axis, at any size
            return ops.matmul(inputs, kernel[0, 0])
        if h is None or w is None or h > (kh + 1) // 2 or w > (kw + 1) // 2:
            return super().convolution_op(inputs, kernel)
        c_in, c_out = kernel.shape[2], kernel.shape[3]
        if h == 1 and w == 1:
            dense = kernel[kh // 2, kw // 2]
        else:
            # taps[p, i]: the kernel tap linking input pixel p to output pixel i (row-major)
            pixels = [(r, c) for r in range(h) for c in range(w)]
            taps = np.array([[(pr - ir + kh // 2) * kw + (pc - ic + kw // 2) for ir, ic in pixels]
                             for pr, pc in pixels], dtype="int32")
            blocks = ops.take(ops.reshape(kernel, (kh * kw, c_in, c_out)), taps, axis=0)
            dense = ops.reshape(ops.transpose(blocks, (0, 2, 1, 3)), (h * w * c_in, h * w * c_out))
        outputs = ops.matmul(ops.reshape(inputs, (-1, h * w * c_in)), dense)
        return ops.reshape(outputs, (-1, h, w, c_out))
