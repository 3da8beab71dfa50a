"""Does bfloat16 keep the posterior's noise? The decoder G sees v = h + exp(s_u) * u, h = E(x);
with mixed_bfloat16 its convolutions take v rounded to bfloat16 (8 significant bits), so where
exp(s_u) * u is below half a bfloat16 step of h, G sees h itself: the noise is gone for that
number. For trained f-VAE weights this prints, on held-out faces with a seeded u, the share
of v's numbers where bfloat16(h + exp(s_u) u) == bfloat16(h), at the weights' own s_u and at
smaller noise scales (where s_u would be after longer training), and how large |h| is.

    python experiments/bf16_noise.py RUN [WEIGHTS ...] [--images 256] [--json OUT.json]

RUN: a run folder of f_vaes.py (its config, held-out files); WEIGHTS: weights files of that
run (default: RUN/latest.weights.h5), e.g. the checkpoints `compare.py` keeps. The
measurement does not depend on the CPU: it rounds float32 numbers the way bfloat16 does.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_setup  # noqa: F401,E402 - first: TensorFlow's environment
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

import f_vaes  # noqa: E402
import face_runs  # noqa: E402
import image_files  # noqa: E402
from training.checkpoint import load_weights  # noqa: E402

NOISE_SCALES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def bfloat16(x):
    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()


def lost_share(h, noise, scale):
    """The share of numbers where bfloat16(h + scale * noise) == bfloat16(h)."""
    return float(np.mean(bfloat16(h + scale * noise) == bfloat16(h)))


def measure(model, x, seed=0):
    h = ops.convert_to_numpy(model.encoder(x, training=False)).astype(np.float32)
    noise = np.random.RandomState(seed).randn(*h.shape).astype(np.float32)
    own = float(np.exp(ops.convert_to_numpy(model.log_noise_scale)))
    return {"step": int(model.optimizer.iterations.numpy()), "noise_scale": own,
            "lost_at_own_scale": lost_share(h, noise, own),
            "lost_at": {str(s): lost_share(h, noise, s) for s in NOISE_SCALES},
            "median_abs_h": float(np.median(np.abs(h))),
            "p99_abs_h": float(np.percentile(np.abs(h), 99))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("weights", nargs="*")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    config, model = face_runs.load_run(f_vaes.FVAE_RUNS, args.run, "latest")
    held_out = face_runs.split_files(image_files.list_image_files(config.data_dir),
                                     config.holdout)[1][:args.images]
    x = face_runs.scale_pixels(face_runs.uint8_images(held_out, config.img_size).astype(np.float32))
    rows = []
    for path in args.weights or [os.path.join(args.run, "latest.weights.h5")]:
        load_weights(model, path)
        rows.append({"weights": path, **measure(model, x)})
        row = rows[-1]
        print(f"step {row['step']}: exp(s_u) {row['noise_scale']:.3f}, noise lost in "
              f"{100 * row['lost_at_own_scale']:.2f} % of v's numbers; at exp(s_u) = "
              + ", ".join(f"{s}: {100 * v:.1f} %" for s, v in row["lost_at"].items())
              + f"; |h| median {row['median_abs_h']:.3f}, 99th percentile {row['p99_abs_h']:.3f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
