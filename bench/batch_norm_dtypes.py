"""The fused batch norm of the f-VAE's residual steps, forward and backward, on the batch
shapes of its encoder and decoder (batch 32 of 32x32x12, 16x16x48 and 8x8x192 maps), in three
ways: a float32 batch; a bfloat16 batch as `speedups.BatchNormalization` takes it under
`mixed_bfloat16`; and that bfloat16 batch cast to float32 before the kernel and back after it.
Medians of --repeats calls, milliseconds per call; each shape occurs 24 times in a training
step (12 residual steps in the encoder, 12 in the decoder).

    python bench/batch_norm_dtypes.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_setup  # noqa: E402,F401 (first: oneDNN on, as the scripts run)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from step_parts import median_seconds  # noqa: E402 (bench/, beside this file)

SHAPES = ((32, 32, 32, 12), (32, 16, 16, 48), (32, 8, 8, 192))
PER_STEP = 24


def batch_norm_step(x, gamma, beta, upstream, via_float32):
    """Forward and backward of one training-mode fused batch norm, the gradient coming from
    above being `upstream`; returns a number that depends on every gradient."""
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        inputs = tf.cast(x, tf.float32) if via_float32 else x
        y = tf.compat.v1.nn.fused_batch_norm(inputs, gamma, beta, data_format="NHWC",
                                             is_training=True)[0]
        y = tf.cast(y, x.dtype) if via_float32 else y
    dx, dgamma, dbeta = tape.gradient(y, [x, gamma, beta], output_gradients=upstream)
    return tf.cast(dx[0, 0, 0, 0], tf.float32) + dgamma[0] + dbeta[0]


def median_ms(function, repeats):
    return 1e3 * median_seconds(function, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.RandomState(0)
    print("| batch of maps | float32 ms | bfloat16 ms | bfloat16 via float32 ms |\n"
          "| --- | --- | --- | --- |")
    totals = np.zeros(3)
    for shape in SHAPES:
        x32 = tf.constant(rng.randn(*shape).astype("float32"))
        gamma, beta = tf.ones(shape[-1:]), tf.zeros(shape[-1:])
        upstream32 = tf.constant(rng.randn(*shape).astype("float32"))
        x16, upstream16 = tf.cast(x32, tf.bfloat16), tf.cast(upstream32, tf.bfloat16)
        ways = ((x32, upstream32, False), (x16, upstream16, False), (x16, upstream16, True))
        times = [median_ms(tf.function(lambda x=x, up=up, via=via: batch_norm_step(
            x, gamma, beta, up, via)), args.repeats) for x, up, via in ways]
        totals += PER_STEP * np.array(times)
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
    print(f"| x{PER_STEP} each, per training step | "
          + " | ".join(f"{t:.0f}" for t in totals) + " |")


if __name__ == "__main__":
    main()
