"""Does a lower precision train the same model? The same short run of a script, from the same
seed, in float32 and in another precision, compared: the mean loss of every 200 steps (the
run's log.csv, one line per 200-step epoch), then held-out bits/dim (f-VAE, `evaluate`) or
k-NN and probe accuracies (InfoMax, on the whole test split), and both curves in one plot.

    python experiments/precision_fidelity.py fvae64 --out /work/runs/fidelity-fvae64
    python experiments/precision_fidelity.py infomax_cifar10 --data-dir data/cifar10 \\
        --out /work/runs/fidelity-infomax

The runs are the scripts' own commands (printed as they start), so each can be resumed or
looked at like any run; a finished run is not trained again. The targets of the comparison:
every 200-step mean loss within 1 % of float32's, bits/dim within 0.02, k-NN within 1 point.
"""

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS_PER_LINE = 200
MODELS = {
    "fvae64": ("f_vaes.py", ["--img-size", "64"]),
    "infomax_cifar10": ("infomax.py", ["--dataset", "cifar10", "--monitor-knn", "0",
                                       "--no-baseline"]),
}


def train(model, precision, args):
    script, flags = MODELS[model]
    out = os.path.join(args.out, precision)
    argv = [sys.executable, os.path.join(ROOT, script), *flags, "--precision", precision,
            "--seed", str(args.seed), "--steps-per-epoch", str(STEPS_PER_LINE),
            "--epochs", str(args.steps // STEPS_PER_LINE), "--out", out]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    print(" ".join(argv[1:]), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)
    if model == "fvae64":
        subprocess.run([sys.executable, os.path.join(ROOT, script), "evaluate", "--out", out,
                        "--weights", "latest", "--seed", "0"], check=True, cwd=ROOT)
    return out


def losses(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def final_numbers(model, run_dir):
    if model == "fvae64":
        with open(os.path.join(run_dir, "evaluate.json")) as f:
            return {"held-out bits/dim": json.load(f)["bits_per_dim"]}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        mu = json.load(f)["trained"]["mu"]
    return {f"mu {name} %": 100 * mu[name] for name in
            ("knn_k1", "knn_k200_weighted", "linear_probe", "mlp_probe")}


def plot(model, curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for precision, values in curves.items():
        steps = STEPS_PER_LINE * np.arange(1, len(values) + 1)
        axis.plot(steps, values, marker="o", markersize=3, label=precision)
    axis.set_xlabel("step")
    axis.set_ylabel("mean training loss of the 200 steps")
    axis.set_title(f"{model}: the same seed in each precision")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--precision", default="mixed_bfloat16",
                        choices=("mixed_bfloat16", "mixed_float16"),
                        help="the precision compared with float32")
    parser.add_argument("--steps", type=int, default=2000, help="a multiple of 200")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", default=None, help="the picture (default: in --out)")
    args = parser.parse_args(argv)
    if args.steps < STEPS_PER_LINE or args.steps % STEPS_PER_LINE:
        parser.error(f"--steps {args.steps}: expected a positive multiple of {STEPS_PER_LINE}")
    runs = {p: train(args.model, p, args) for p in ("float32", args.precision)}
    curves = {p: losses(run) for p, run in runs.items()}
    reference, other = curves["float32"], curves[args.precision]
    gaps = [abs(b - a) / abs(a) for a, b in zip(reference, other)]
    numbers = {p: final_numbers(args.model, run) for p, run in runs.items()}
    result = {"model": args.model, "steps": args.steps, "seed": args.seed, "losses": curves,
              "largest relative loss gap": max(gaps), "final": numbers}
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nmean loss per {STEPS_PER_LINE} steps (float32 | {args.precision} | gap):")
    for i, (a, b, gap) in enumerate(zip(reference, other, gaps), start=1):
        print(f"  step {STEPS_PER_LINE * i:5d}: {a:12.5g} | {b:12.5g} | {100 * gap:.3f} %")
    for name in numbers["float32"]:
        a, b = numbers["float32"][name], numbers[args.precision][name]
        print(f"{name}: float32 {a:.4f}, {args.precision} {b:.4f}, difference {b - a:+.4f}")
    print(f"largest loss gap {100 * max(gaps):.3f} %; "
          f"wrote {plot(args.model, curves, args.plot or os.path.join(args.out, 'fidelity.png'))}")


if __name__ == "__main__":
    main()
