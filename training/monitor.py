"""What a run shows while it trains, besides log.csv: Keras' TensorBoard logs (scalars per
epoch), the running means every N steps (to TensorBoard, and as a line of text when the
output is not a terminal, where Keras' progress bar would write one endless line), the
run's pictures in TensorBoard, loss_curves.png redrawn from log.csv after every epoch, and
the parameter counts printed when it starts."""

import csv
import os
import sys
import time

import numpy as np
import tensorflow as tf
import keras

from pictures import write_png


def count_parameters(weights):
    """The numbers in a list of weights (the parameter counts printed at the start of a run)."""
    return sum(int(np.prod(w.shape)) for w in weights)


def tensorboard_dir(run_dir):
    return os.path.join(run_dir, "tensorboard")


def interactive():
    """True when stdout is a terminal (Keras' progress bar), False when it is a file or pipe."""
    return sys.stdout.isatty()


def callbacks(run_dir, every):
    """The monitors of a training run, in the order they must run (after the checkpoint)."""
    return [FirstStep(),
            keras.callbacks.TensorBoard(tensorboard_dir(run_dir), update_freq="epoch",
                                        write_graph=False, profile_batch=0),
            StepScalars(run_dir, every), LossCurves(run_dir)]


def since_start():
    """Seconds since this process started (Linux; since this module was imported elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def progress(doing):
    """One line on stderr saying what the run does now, and when (before the first step)."""
    print(f"{doing} ({since_start():.0f} s after the command started) ...", file=sys.stderr,
          flush=True)


class FirstStep(keras.callbacks.Callback):
    """Says what the wait before the first step is (TensorFlow tracing and compiling the
    training step, a minute or more for the 64x64 f-VAE on a CPU) and when it is over."""

    def __init__(self):
        super().__init__()
        self.done = False  # one callback for both fits of a resumed, cut-short epoch

    def on_train_begin(self, logs=None):
        if not self.done:
            progress("tracing and compiling the training step (the first step waits for it)")

    def on_train_batch_end(self, batch, logs=None):
        if not self.done:
            self.done = True
            print(f"first step done, {since_start():.0f} s after the command started",
                  file=sys.stderr, flush=True)


class StepScalars(keras.callbacks.Callback):
    """Every `every` steps: the epoch's running means as TensorBoard scalars at the run's step
    count (the optimiser's, so resumed runs continue the curves), and, when the output is
    not a terminal, as one line of text."""

    def __init__(self, run_dir, every=100):
        super().__init__()
        self.every = every
        self.writer = tf.summary.create_file_writer(os.path.join(tensorboard_dir(run_dir), "steps"))
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.every or (batch + 1) % self.every:
            return
        step = int(self.model.optimizer.iterations.numpy())
        scalars = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        if not interactive():
            print(f"epoch {self.epoch + 1} step {batch + 1} (run step {step}): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items())), flush=True)


_picture_writers = {}


def log_picture(run_dir, name, picture, step):
    """A uint8 picture (h, w, 3) as a TensorBoard image `name` at `step` (one event file per run
    folder and process)."""
    folder = os.path.join(tensorboard_dir(run_dir), "pictures")
    if folder not in _picture_writers:
        _picture_writers[folder] = tf.summary.create_file_writer(folder)
    writer = _picture_writers[folder]
    with writer.as_default(step=int(step)):
        tf.summary.image(name, np.asarray(picture, np.uint8)[None])
    writer.flush()


class LossCurves(keras.callbacks.Callback):
    """After every epoch: loss_curves.png, one panel per column of log.csv against the epoch."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir

    def on_epoch_end(self, epoch, logs=None):
        plot_log(os.path.join(self.run_dir, "log.csv"),
                 os.path.join(self.run_dir, "loss_curves.png"))


def plot_log(csv_path, png_path):
    """Draw every numeric column of a log.csv against its epoch column (matplotlib, no display)."""
    if not os.path.exists(csv_path):
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c != "epoch"]
    if not columns:
        return None
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(columns))
    rows_of_panels = -(-len(columns) // cols)
    figure, axes = pyplot.subplots(rows_of_panels, cols, figsize=(3.2 * cols, 2.4 * rows_of_panels),
                                   squeeze=False)
    epochs = [int(r["epoch"]) for r in rows]
    for axis, column in zip(axes.flat, columns):
        values = [float(r[column]) if r[column] not in ("", None) else np.nan for r in rows]
        axis.plot(epochs, values, marker="." if len(epochs) < 30 else None)
        axis.set_title(column, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in list(axes.flat)[len(columns):]:
        axis.axis("off")
    figure.tight_layout()
    figure.canvas.draw()
    picture = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    pyplot.close(figure)
    return write_png(png_path, picture)
