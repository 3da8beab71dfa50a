"""The README's pictures of the 64x64 f-VAE trained long, from its run folder and copies of its
weights at chosen steps. Model samples only: no real face appears in any of them.

    python experiments/fvae64_pictures.py runs/fvae64 \\
        --checkpoints runs/fvae64-step2000 runs/fvae64-step5000 runs/fvae64 \\
        --precision-switch-step 2046 --out-dir docs

A checkpoint is a run folder or a copy of one (config.json, latest.weights.h5, state.json;
evaluate.json if `evaluate` scored it); its step is the optimiser's step count saved in the
weights. Each is loaded once, oldest first (by state.json); the newest draws the
temperature and interpolation pictures. In --out-dir:

    fvae64_temperatures.png    one row per noise eps, one column per temperature: z = T * eps
                               (the code of `f_vaes.py sweep`), temperatures labelled above
    fvae64_interpolate_2.png   per row, 9 steps linear in z between two samples z ~ N(0, T^2 I)
    fvae64_interpolate_4.png   9 x 9, bilinear in z between four such samples at the corners
                               (the code of `f_vaes.py interpolate --between samples`)
    fvae64_checkpoints.png     the same z (8 samples at T = 0.8) decoded by every checkpoint,
                               one row each, labelled with its step
    fvae64_learning_curve.png  the run's training bits/dim per epoch (log.csv) against steps,
                               the held-out bits/dim of each checkpoint with an evaluate.json
                               newer than its weights, and the step where the run changed
                               precision (--precision-switch-step)
    fvae64_epochs.md           a table, one line per epoch of log.csv: the epoch's mean loss
                               (nats per image) and bits/dim, the held-out bound logged after
                               it, and `evaluate`'s bound of a checkpoint at that step

A picture whose PNG would take more than --max-kb (300 kB) is stored in 256 colours (median
cut: about 38 dB PSNR on 9x9 grids of these samples); the script says which.
"""

import argparse
import csv
import gc
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import keras  # noqa: E402
from PIL import Image  # noqa: E402

import face_runs  # noqa: E402
import pictures  # noqa: E402
from f_vaes import FVAE  # noqa: E402

ARTICLE_TEMPERATURES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def saved_step(folder):
    """The step of a checkpoint folder's latest weights, as its state.json says."""
    with open(os.path.join(folder, "config.json")) as f:
        per_epoch = json.load(f)["steps_per_epoch"]
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    return state["epochs_done"] * per_epoch + state.get("steps_done", 0)


def load_checkpoint(folder, weights):
    """The model of a checkpoint folder and its step, as its weights record it (the
    optimiser's iterations), checked against state.json's for the latest weights."""
    model = FVAE.from_run(folder, weights)
    step = int(model.optimizer.iterations.numpy())
    if weights == "latest" and step != saved_step(folder):
        print(f"{folder}: state.json says step {saved_step(folder)}, the weights {step} "
              f"(copied while the trainer was saving?); using {step}", file=sys.stderr)
    return model, step


def newest_pictures(model, args):
    """The temperature and interpolation pictures, uint8: {name: picture}."""
    temperatures = args.temperatures
    sweep = face_runs.sweep_images(model, args.rows, temperatures, args.seed)
    ends = face_runs.sample_latents(model, 2 * args.rows, args.temperature, args.seed)
    pairs = face_runs.decode_rows(model, face_runs.linear_paths(ends[0::2], ends[1::2], args.steps))
    corners = face_runs.sample_latents(model, 4, args.temperature, args.seed + 1)
    grid = face_runs.decode_rows(model, face_runs.bilinear_grid(corners, args.steps, args.steps))
    return {"temperatures": pictures.with_labels(
                pictures.image_grid(sweep, args.rows, len(temperatures)), model.img_size,
                column_labels=[f"T = {t:g}" for t in temperatures]),
            "interpolate_2": pictures.image_grid(pairs, args.rows, args.steps),
            "interpolate_4": pictures.image_grid(grid, args.steps, args.steps)}


def held_out_bits(folder, weights):
    """bits/dim of the checkpoint's evaluate.json, or None when there is none or it is older
    than the weights (it scored other weights). evaluate.json does not say which weights it
    scored: run `evaluate --weights` with the same choice as here."""
    path = os.path.join(folder, "evaluate.json")
    if not os.path.exists(path):
        return None
    if os.path.getmtime(path) < os.path.getmtime(os.path.join(folder, f"{weights}.weights.h5")):
        print(f"{path}: older than the weights, left out", file=sys.stderr)
        return None
    with open(path) as f:
        return json.load(f)["bits_per_dim"]


def learning_curve(run, held_out, switch_step):
    """A plot (uint8 picture) of the training bits/dim per epoch of `run` against steps, the
    held-out bound of the epochs whose log.csv line has it, held-out {step: bits/dim} of
    `evaluate` as points and a dashed line at the step where the precision
    changed (None: no line)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["epoch"]) * config["steps_per_epoch"] for r in rows]
    figure, axis = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, [float(r["bits_per_dim"]) for r in rows], marker="." if len(rows) < 30 else None,
              label="training loss (mean of each epoch)")
    logged = [(step, float(r["held_out_bits_per_dim"])) for step, r in zip(steps, rows)
              if r.get("held_out_bits_per_dim")]
    if logged:
        axis.plot(*zip(*logged), marker=".", color="C2",
                  label="held-out bound after each epoch (log.csv, one draw)")
    if held_out:
        axis.plot(sorted(held_out), [held_out[s] for s in sorted(held_out)], "s", color="C3",
                  label="held-out bound (evaluate, dequantised)")
    if switch_step is not None:
        axis.axvline(switch_step, color="grey", linestyle="--", linewidth=1,
                     label=f"float32 until step {switch_step}, then "
                           f"{config.get('precision', 'float32')}")
    axis.set_xlim(0, max(steps + list(held_out) + [switch_step or 0]) * 1.05)
    axis.set_xlabel(f"training step (batches of {config['batch_size']} images)")
    axis.set_ylabel("bits/dim")
    axis.set_title(f"f-VAE, {config['img_size']}x{config['img_size']}: the loss in bits/dim",
                   fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.canvas.draw()
    picture = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    pyplot.close(figure)
    return picture


def epoch_table(run, held_out, command):
    """Markdown: one line per epoch of the run's log.csv (its mean training loss in nats per
    image and in bits/dim, the held-out bound logged after it) and the held-out {step:
    bits/dim} of `evaluate` at the epoch's last step, under a line saying how it was made."""
    with open(os.path.join(run, "config.json")) as f:
        per_epoch = json.load(f)["steps_per_epoch"]
    with open(os.path.join(run, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [f"Written by `{command}` on {time.strftime('%Y-%m-%d')} from the run's log.csv.",
             "",
             "| epoch | step | training loss, epoch mean (nats per image) | training bits/dim | "
             "held-out bits/dim after the epoch (log.csv, one draw) | held-out bits/dim "
             "(`evaluate`) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        step = int(row["epoch"]) * per_epoch
        logged = row.get("held_out_bits_per_dim")
        lines.append(f"| {row['epoch']} | {step:,} | {float(row['loss']):,.0f} | "
                     f"{float(row['bits_per_dim']):.3f} | "
                     f"{f'{float(logged):.3f}' if logged else ''} | "
                     f"{f'{held_out[step]:.3f}' if step in held_out else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="the run folder (its log.csv and config.json)")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="FOLDER",
                        help="copies of the run at chosen steps (copy a run still training "
                             "first: its trainer replaces the files)")
    parser.add_argument("--weights", choices=("latest", "best"), default="latest",
                        help="which weights of each checkpoint")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--prefix", default="fvae64", help="of the file names")
    parser.add_argument("--temperatures", type=face_runs.temperature_list,
                        default=ARTICLE_TEMPERATURES,
                        help="the columns of the temperature picture (the article's)")
    parser.add_argument("--temperature", type=face_runs.temperature, default=0.8,
                        help="T of the samples interpolated between and of the checkpoint rows")
    parser.add_argument("--rows", type=int, default=8,
                        help="noise draws of the temperature picture, pairs interpolated")
    parser.add_argument("--steps", type=int, default=9, help="steps of each interpolation")
    parser.add_argument("--samples", type=int, default=8, help="per checkpoint row")
    parser.add_argument("--seed", type=int, default=0, help="of every noise draw")
    parser.add_argument("--precision-switch-step", type=int, default=None,
                        help="the step after which the run trained in its config's precision "
                             "(float32 before); none: no mark")
    parser.add_argument("--max-kb", type=int, default=300,
                        help="a picture whose PNG would be larger is stored in 256 colours")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)

    def write(name, picture):
        path = pictures.write_png(os.path.join(args.out_dir, f"{args.prefix}_{name}.png"),
                                  picture, max_bytes=args.max_kb * 1000)
        colours = ", 256 colours" if Image.open(path).mode == "P" else ""
        print(f"{path} ({picture.shape[1]}x{picture.shape[0]}, "
              f"{os.path.getsize(path) / 1000:.0f} kB{colours})")

    started = time.time()
    rows, held_out, newest = [], {}, None
    checkpoints = sorted(args.checkpoints, key=saved_step)  # oldest first
    for folder in checkpoints:
        began = time.time()
        model, step = load_checkpoint(folder, args.weights)
        images = face_runs.sample_images(model, args.samples, args.temperature, args.seed)
        rows.append((step, pictures.image_grid(images, 1, args.samples)))
        bits = held_out_bits(folder, args.weights)
        if bits is not None:
            held_out[step] = bits
        if folder == checkpoints[-1]:
            newest = (step, newest_pictures(model, args))
        del model
        keras.backend.clear_session()
        gc.collect()
        print(f"{folder}: step {step}, {time.time() - began:.0f} s", flush=True)

    for name, picture in newest[1].items():
        write(name, picture)
    write("checkpoints", pictures.with_labels(np.concatenate([grid for _, grid in rows]),
                                              rows[0][1].shape[0],
                                              row_labels=[f"step {step}" for step, _ in rows]))
    write("learning_curve", learning_curve(args.run, held_out, args.precision_switch_step))
    table = os.path.join(args.out_dir, f"{args.prefix}_epochs.md")
    with open(table, "w") as f:
        f.write(epoch_table(args.run, held_out,  # a command the docs' test can parse
                            "python experiments/fvae64_pictures.py RUN --checkpoints COPY ..."))
    print(table)
    if held_out:
        print("held-out bits/dim: " + ", ".join(f"{bits:.4f} at step {step}"
                                                 for step, bits in sorted(held_out.items())))
    print(f"pictures of step {newest[0]}, checkpoint rows of steps "
          f"{', '.join(str(step) for step, _ in rows)}: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
