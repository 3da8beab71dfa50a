"""Does a lower precision train the same model? The same short run of a script, from the same
seed, in float32 and in another precision, compared: the mean training loss of every 200
steps (from the running means the run logs every 100 steps to TensorBoard), then held-out
bits/dim (f-VAE, `evaluate`) or k-NN and probe accuracies of mu (InfoMax, on the whole test
split), and both curves in one plot.

    python experiments/precision_fidelity.py fvae64 --out runs/fidelity-fvae64
    python experiments/precision_fidelity.py infomax_cifar10 --data-dir data/cifar10 \\
        --out runs/fidelity-infomax

The runs are the scripts' own commands (printed as they start), so each can be resumed or
looked at like any run; a finished run is not trained again. `--reference RUN` takes the
float32 side from a run already trained with the same seed and flags (its weights at
`--steps`, e.g. a copy of a long run's save at that step) instead of training it again.
The targets of the comparison: every 200-step mean loss within 1 % of float32's, bits/dim
within 0.02, k-NN within 1 point.

`--noise-floor` also trains float32 a second time, the same command and seed with TensorFlow's
own (Eigen) kernels instead of oneDNN's (`TF_ENABLE_ONEDNN_OPTS=0`, in `OUT/float32_eigen`):
another valid float32 summation order, so its gaps to the first float32 run are what round-off
alone does to the curve. They are printed and drawn next to the other precision's gaps.
"""

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tf_setup  # noqa: E402  first: TensorFlow without its start-up lines
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS_PER_LINE = 200  # the curve's points: mean losses of blocks of this many steps
LOG_EVERY = 100
MODELS = {
    "fvae64": ("f_vaes.py", ["--img-size", "64"]),
    "infomax_cifar10": ("infomax.py", ["--dataset", "cifar10", "--monitor-knn", "0",
                                       "--no-baseline"]),
}
# --noise-floor: the float32 run again, with TensorFlow's own kernels (tf_setup.py turns oneDNN on
# unless the environment already says otherwise)
NOISE_FLOOR = "float32_eigen"
NOISE_FLOOR_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0"}
LABELS = {NOISE_FLOOR: "float32, TensorFlow's own kernels (not oneDNN)"}


def train(model, precision, args, name=None, env=None):
    """The run of `precision` in `OUT/name` (default: the precision), with `env` added to the
    environment; a run already trained and measured is left as it is."""
    script, flags = MODELS[model]
    out = os.path.join(args.out, name or precision)
    epochs = args.steps // args.steps_per_epoch
    argv = [sys.executable, os.path.join(ROOT, script), *flags, "--precision", precision,
            "--seed", str(args.seed), "--steps-per-epoch", str(args.steps_per_epoch),
            "--epochs", str(epochs), "--log-every", str(LOG_EVERY), "--out", out]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    print(" ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *argv[1:]]), flush=True)
    if finished(model, out, epochs):
        print(f"{out}: trained and measured already", flush=True)
    else:
        subprocess.run(argv, check=True, cwd=ROOT, env={**os.environ, **(env or {})})
    return out


def finished(model, run_dir, epochs):
    """Whether the run has trained `epochs` and, for InfoMax, measured its encoder since (the
    script would measure it again, minutes of k-NN and probes)."""
    state, weights = (os.path.join(run_dir, name) for name in ("state.json", "latest.weights.h5"))
    if not (os.path.exists(state) and os.path.exists(weights)):
        return False
    with open(state) as f:
        if json.load(f).get("epochs_done", 0) < epochs:
            return False
    if model == "infomax_cifar10":
        metrics = os.path.join(run_dir, "metrics.json")
        return os.path.exists(metrics) and os.path.getmtime(metrics) > os.path.getmtime(weights)
    return True


def evaluate(model, run_dir):
    """Held-out bits/dim of an f-VAE run's latest weights (once: an evaluate.json newer than
    the weights is kept)."""
    done = os.path.join(run_dir, "evaluate.json")
    if os.path.exists(done) and os.path.getmtime(done) > os.path.getmtime(
            os.path.join(run_dir, "latest.weights.h5")):
        return
    if model == "fvae64":
        subprocess.run([sys.executable, os.path.join(ROOT, MODELS[model][0]), "evaluate",
                        "--out", run_dir, "--weights", "latest", "--seed", "0"],
                       check=True, cwd=ROOT)


def losses(run_dir, steps):
    """The mean loss of each block of STEPS_PER_LINE steps up to `steps`, from the running
    means of the epoch so far that the run logged every LOG_EVERY steps (the step's running
    sum is the mean times the steps since the epoch began)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        per_epoch = json.load(f)["steps_per_epoch"]
    if per_epoch % STEPS_PER_LINE:
        raise SystemExit(f"{run_dir}: steps_per_epoch {per_epoch} is not a multiple of "
                         f"{STEPS_PER_LINE}")
    running = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "steps", "*"))):
        events = EventAccumulator(path, size_guidance={"tensors": 0})
        events.Reload()
        if "loss" not in events.Tags()["tensors"]:  # a file just begun
            continue
        for event in events.Tensors("loss"):
            running[event.step] = float(tf.make_ndarray(event.tensor_proto))
    sums = {step: mean * ((step - 1) % per_epoch + 1) for step, mean in running.items()}
    blocks = []
    for end in range(STEPS_PER_LINE, steps + 1, STEPS_PER_LINE):
        start = end - STEPS_PER_LINE
        before = 0.0 if start % per_epoch == 0 else sums[start]
        blocks.append((sums[end] - before) / STEPS_PER_LINE)
    return blocks


def final_numbers(model, run_dir):
    if model == "fvae64":
        with open(os.path.join(run_dir, "evaluate.json")) as f:
            return {"held-out bits/dim": json.load(f)["bits_per_dim"]}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        mu = json.load(f)["trained"]["mu"]
    return {f"mu {name} %": 100 * mu[name] for name in
            ("knn_k1", "knn_k200_weighted", "linear_probe", "mlp_probe")}


def relative_gaps(reference, other):
    """(other - reference) / |reference| of each block's mean loss."""
    return [(b - a) / abs(a) for a, b in zip(reference, other)]


def plot(model, curves, gaps, path):
    """The loss curves; with a noise floor, below them each run's gap to float32 in %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if NOISE_FLOOR in gaps:
        figure, (axis, gap_axis) = plt.subplots(2, 1, figsize=(6, 5.5), dpi=100, sharex=True,
                                                gridspec_kw={"height_ratios": (3, 2)})
    else:
        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, values in curves.items():
        steps = STEPS_PER_LINE * np.arange(1, len(values) + 1)
        axis.plot(steps, values, marker="o", markersize=3, label=LABELS.get(name, name))
    axis.set_ylabel("mean training loss of the 200 steps")
    axis.set_title(f"{model}: the same seed in each precision")
    axis.legend()
    axis.grid(alpha=0.3)
    if NOISE_FLOOR in gaps:
        colours = dict(zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for name, values in gaps.items():
            steps = STEPS_PER_LINE * np.arange(1, len(values) + 1)
            gap_axis.plot(steps, 100 * np.array(values), marker="o", markersize=3,
                          color=colours[name])
        gap_axis.axhline(0, color="black", linewidth=0.8)
        gap_axis.set_ylabel("gap to float32, %")
        gap_axis.set_title("each curve's gap to float32's, in % of float32's loss",
                           fontsize="medium")
        gap_axis.grid(alpha=0.3)
        axis = gap_axis
    axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--precision", default="mixed_bfloat16",
                        choices=("mixed_bfloat16", "mixed_float16"),
                        help="the precision compared with float32")
    parser.add_argument("--steps", type=int, default=2000,
                        help="a multiple of --steps-per-epoch")
    parser.add_argument("--steps-per-epoch", type=int, default=1000, help="a multiple of 200")
    parser.add_argument("--reference", default=None, metavar="RUN",
                        help="a float32 run of the same seed and flags, saved at --steps, "
                             "instead of training one")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", default=None, help="the picture (default: in --out)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also train float32 with TensorFlow's own kernels instead of "
                             "oneDNN's, and report its gaps to the first float32 run")
    args = parser.parse_args(argv)
    if args.steps_per_epoch % STEPS_PER_LINE or args.steps % args.steps_per_epoch:
        parser.error(f"--steps {args.steps}, --steps-per-epoch {args.steps_per_epoch}: expected "
                     f"multiples of {args.steps_per_epoch} and {STEPS_PER_LINE}")
    runs = {"float32": args.reference or train(args.model, "float32", args),
            args.precision: train(args.model, args.precision, args)}
    if args.noise_floor:
        runs[NOISE_FLOOR] = train(args.model, "float32", args, NOISE_FLOOR, NOISE_FLOOR_ENV)
    for run in runs.values():
        evaluate(args.model, run)
    curves = {name: losses(run, args.steps) for name, run in runs.items()}
    gaps = {name: relative_gaps(curves["float32"], curve)
            for name, curve in curves.items() if name != "float32"}
    largest = {name: max(abs(g) for g in values) for name, values in gaps.items()}
    numbers = {name: final_numbers(args.model, run) for name, run in runs.items()}
    result = {"model": args.model, "steps": args.steps, "seed": args.seed, "losses": curves,
              "relative loss gaps": gaps, "largest relative loss gap": largest[args.precision],
              "final": numbers}
    if args.noise_floor:
        result["largest relative loss gap, noise floor"] = largest[NOISE_FLOOR]
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=2)
    others = list(gaps)
    print(f"\nmean loss per {STEPS_PER_LINE} steps, and the gap to float32's "
          f"(float32 | " + " | ".join(f"{name} | gap" for name in others) + "):")
    for i, reference in enumerate(curves["float32"]):
        print(f"  step {STEPS_PER_LINE * (i + 1):5d}: {reference:12.5g} | " + " | ".join(
            f"{curves[name][i]:12.5g} | {100 * gaps[name][i]:+.3f} %" for name in others))
    for name in numbers["float32"]:
        reference = numbers["float32"][name]
        print(f"{name}: float32 {reference:.4f}, " + ", ".join(
            f"{other} {numbers[other][name]:.4f} ({numbers[other][name] - reference:+.4f})"
            for other in others))
    path = plot(args.model, curves, gaps, args.plot or os.path.join(args.out, "fidelity.png"))
    print("largest loss gap: " + ", ".join(f"{name} {100 * largest[name]:.3f} %"
                                           for name in others) + f"; wrote {path}")

if __name__ == "__main__":
    main()
