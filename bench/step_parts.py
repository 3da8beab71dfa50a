"""Where an f-VAE training step spends its time, per precision: the encoder and decoder
(forward and backward), the flow (forward and backward), the Adam update, and the whole step,
each timed alone on the same model and batch (medians of --repeats).

    python bench/step_parts.py --img-size 64 --precision float32 mixed_bfloat16
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_setup  # noqa: E402,F401 (first: oneDNN on)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import f_vaes  # noqa: E402
from training.precision import to_float32  # noqa: E402


def median_seconds(function, repeats):
    for _ in range(2):
        float(function())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(function())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_parts(img_size, precision, batch_size, repeats):
    config = f_vaes.Config(img_size=img_size, batch_size=batch_size, seed=0,
                           precision=precision, jit_compile=False)
    model = f_vaes.build_model(config)
    rng = np.random.RandomState(0)
    x = tf.constant(rng.uniform(-1, 1, (batch_size, img_size, img_size, 3)).astype("float32"))
    v = tf.constant(rng.randn(batch_size, *model.encoder.output.shape[1:]).astype("float32"))
    networks = model.encoder.trainable_variables + model.decoder.trainable_variables

    @tf.function
    def encoder_decoder():
        with tf.GradientTape() as tape:
            y = to_float32(model.decoder(to_float32(model.encoder(x, training=True)),
                                         training=True))
            loss = tf.reduce_sum(y * y)
        return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, networks)])

    @tf.function
    def flow():
        with tf.GradientTape() as tape:
            z, logdet = model.flow(v)
            loss = tf.reduce_sum(z * z) - tf.reduce_sum(logdet)
        gradients = tape.gradient(loss, model.flow.trainable_variables)
        return tf.add_n([tf.reduce_sum(g) for g in gradients])

    zeros = [tf.zeros_like(w) for w in model.trainable_variables]

    @tf.function
    def adam():
        model.optimizer.apply(zeros, model.trainable_variables)
        return tf.reduce_sum(model.encoder.trainable_variables[0])

    whole = tf.function(model.train_step)
    return {"encoder + decoder, forward and backward": median_seconds(encoder_decoder, repeats),
            "flow, forward and backward": median_seconds(flow, repeats),
            "Adam update": median_seconds(adam, repeats),
            "the whole step": median_seconds(lambda: whole(x)["loss"], repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {p: step_parts(args.img_size, p, args.batch_size, args.repeats)
               for p in args.precision}
    print(json.dumps(results, indent=2))
    first = args.precision[0]
    print("\n| part of the step | " + " | ".join(f"{p} s" for p in args.precision)
          + " | " + " | ".join(f"{first} / {p}" for p in args.precision[1:]) + " |")
    for part in results[first]:
        times = [results[p][part] for p in args.precision]
        print(f"| {part} | " + " | ".join(f"{t:.3f}" for t in times) + " | "
              + " | ".join(f"{times[0] / t:.2f}x" for t in times[1:]) + " |")


if __name__ == "__main__":
    main()
