"""Shared plumbing for f_vaes.py and infomax.py.

Nothing model-specific lives here: finding and decoding image files into a `tf.data`
pipeline, tiling pictures into a PNG grid, checking the run folder, and saving a run so
that the same command resumes it (weights + optimiser state + epoch, written atomically).
"""

import csv
import json
import math
import os
import sys
import warnings

import numpy as np
import tensorflow as tf
import keras
import h5py
import imageio.v3 as iio

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class UsageError(ValueError):
    """Bad flag, path or data detected before any work is done (the scripts exit with 2)."""


def fail(message):
    """Print a one-line error naming the flag or path and exit with status 2 (argparse's code)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------- optimiser

@keras.saving.register_keras_serializable(package="common")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`: the same update, hyperparameters and saved state (m and v),
    with each variable updated by TensorFlow's fused Adam kernel in one pass over var, m and
    v instead of Keras' nine element-wise ops. For the f-VAE's 96M parameters that is about
    a third of the time of Keras' update (bench/README.md). The kernel computes Keras' formula:
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= lr sqrt(1 - b2^t) / (1 - b1^t) m /
    (sqrt(v) + eps). Sparse gradients and amsgrad take Keras' own path.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices) or not hasattr(variable, "handle"):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


# --------------------------------------------------------------------------- image files

def list_image_files(folder, flag="--data-dir"):
    """Every PNG/JPEG under `folder`, recursively, any case of extension, sorted."""
    if not folder or not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder!r}: no such folder (expected a folder of PNG/JPEG images)")
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names)
                     if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not files:
        raise UsageError(f"{flag} {folder!r}: no .png/.jpg/.jpeg files found (searched recursively)")
    return files


def _decode_rgb(path):
    """File → uint8 (h, w, 3). Greyscale and RGBA become RGB; 16-bit PNGs are scaled to 8 bits."""
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    return image


def centre_square(image):
    """The centred square of an (h, w, c) image: rows (h-w)/2 .. (h-w)/2+w when taller than wide
    (SPEC.md, f-VAE data), and the same for columns when wider than tall."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def load_image(path, img_size, crop=True):
    """Decode one file to float32 (img_size, img_size, 3) with values in [0, 255]."""
    image = _decode_rgb(path)
    if crop:
        image = centre_square(image)
    image = tf.image.resize(tf.cast(image, tf.float32), (img_size, img_size), method="area",
                            antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def find_readable_images(files, img_size=None, verbose=True):
    """Split `files` into (readable, unreadable) by decoding each once, in parallel.

    An unreadable file (empty, truncated, not an image, a text file named .png) is reported
    with a warning naming it and a count at the end, and is left out of training, so a
    bad file can never stop a run in the middle of an epoch.
    """
    files = list(files)
    if not files:
        return [], []
    indices = tf.data.Dataset.range(len(files))
    paths = tf.data.Dataset.from_tensor_slices(files)

    def check(index, path):
        image = _decode_rgb(path)
        if img_size is not None:  # run the same resize as training so it cannot fail later
            image = tf.image.resize(centre_square(image), (img_size, img_size))
        return index, tf.reduce_max(image)  # a value, not a shape: the decode cannot be folded away

    ok = tf.data.Dataset.zip((indices, paths)).map(check, num_parallel_calls=tf.data.AUTOTUNE)
    ok = ok.ignore_errors()
    good_index = sorted(int(i) for i, _ in ok.as_numpy_iterator())
    good_set = set(good_index)
    readable = [files[i] for i in good_index]
    unreadable = [f for i, f in enumerate(files) if i not in good_set]
    if verbose:
        for f in unreadable:
            warnings.warn(f"skipping unreadable image {f}", stacklevel=2)
        if unreadable:
            print(f"skipped {len(unreadable)} unreadable image file(s) of {len(files)}", file=sys.stderr)
    return readable, unreadable


def scan_image_folder(folder, img_size=None, flag="--data-dir"):
    """The readable images of a folder (recursively), or a clear UsageError before any training:
    unreadable files are skipped with a warning naming each, and a folder with none left is
    an error naming the folder."""
    files = list_image_files(folder, flag)
    readable, unreadable = find_readable_images(files, img_size)
    if not readable:
        raise UsageError(f"{flag} {folder!r}: none of its {len(files)} image file(s) could be read "
                         f"(first: {unreadable[0]})")
    return readable


def image_dataset(files, img_size, batch_size, scale, shuffle=True, repeat=True, seed=None,
                  drop_remainder=True, labels=None):
    """A batched, prefetched `tf.data.Dataset` of images (and labels, if given).

    `scale` maps float pixels in [0, 255] to the model's range, e.g. `lambda x: x / 255 * 2 - 1`.
    With `shuffle`, the file list is reshuffled on every pass (as the author's stream did).
    Decoding runs in parallel and the next batches are prefetched, off the training step.
    """
    items = (files,) if labels is None else (files, np.asarray(labels))
    ds = tf.data.Dataset.from_tensor_slices(items)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def decode(path, *label):
        image = scale(load_image(path, img_size))
        return (image, *label) if label else image

    # Order follows the file list unless it is shuffled without a seed (then any order will do).
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=not shuffle or seed is not None)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- pictures

def to_uint8(images, value_range=(-1.0, 1.0)):
    """Map model pixels to 0..255: for [-1, 1] this is `(x+1)/2*255`, clipped (SPEC.md)."""
    lo, hi = value_range
    images = (np.asarray(images, dtype=np.float32) - lo) / (hi - lo) * 255.0
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def image_grid(images, rows, cols, value_range=(-1.0, 1.0)):
    """Tile (rows*cols, h, w, 3) images, row by row, into one (rows*h, cols*w, 3) uint8 picture."""
    images = to_uint8(images, value_range)
    n, h, w, c = images.shape
    if n < rows * cols:
        images = np.concatenate([images, np.zeros((rows * cols - n, h, w, c), np.uint8)])
    images = images[:rows * cols].reshape(rows, cols, h, w, c)
    return images.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_grid(path, images, rows=None, cols=None, value_range=(-1.0, 1.0)):
    """Write images as one PNG grid (atomically: a half-written PNG never replaces a good one)."""
    n = len(images)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = rows or int(math.ceil(n / cols))
    grid = image_grid(images, rows, cols, value_range)
    tmp = path + ".tmp.png"
    iio.imwrite(tmp, grid)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- run folders

def ensure_writable_dir(path, flag="--out"):
    """Create `path` if needed and check that a file can be written there, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path!r}: cannot write there ({e.strerror or e})") from None
    return path


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_run_config(run_dir, config, must_match, flag_of=lambda k: "--" + k.replace("_", "-")):
    """Save the run's configuration beside its weights, or check a resumed run against it.

    `must_match` lists the keys that change the model (a resumed run must use the same).
    """
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        try:
            saved = read_json(path)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: unreadable run configuration ({e})") from None
        diffs = [f"saved with {flag_of(k)} {saved.get(k)!r}, asked for {config.get(k)!r}"
                 for k in must_match if saved.get(k) != config.get(k)]
        if diffs:
            raise UsageError(f"{run_dir} holds a different model: " + "; ".join(diffs)
                             + " (use another --out, or the same flags)")
    write_json(path, config)


def atomic_save_weights(model, path, **attrs):
    """`model.save_weights` (weights and optimiser state) through a temporary file + rename.

    `attrs` (e.g. epochs_done=3) are stored inside the same HDF5 file, so that the weights
    and the count they belong to are committed by one rename and can never disagree.
    """
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp, overwrite=True)
    if attrs:
        with h5py.File(tmp, "a") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
    os.replace(tmp, path)


def weights_attrs(path):
    """The attributes `atomic_save_weights` stored in a weights file ({} if none)."""
    with h5py.File(path, "r") as f:
        return {k: (v.item() if np.ndim(v) == 0 and hasattr(v, "item") else v)
                for k, v in f.attrs.items()}


def seed_generators(model):
    """Every `keras.random.SeedGenerator` of the model and its layers, in a fixed order.
    Their states are not part of `save_weights`, so `RunCheckpoint` stores them itself."""
    return [g for layer in model._flatten_layers() for g in getattr(layer, "_seed_generators", [])]


def seed_states(model):
    return {f"seed_state_{i}": np.asarray(g.state.numpy())
            for i, g in enumerate(seed_generators(model))}


class RunCheckpoint(keras.callbacks.Callback):
    """Save a run after every epoch so that the same command resumes it.

    Writes, in `run_dir`: `latest.weights.h5` (weights + optimiser state + the number of
    epochs done + the states of the model's random seed generators, in one file), `best.weights.h5` (lowest `monitor` so far), `state.json`
    (epochs done, best value, for reading) and one line per epoch in `log.csv`. Every file
    is written to a temporary name and renamed, and the CSV is cut back to the saved epoch
    on resume, so an interrupted run never has a half-written checkpoint, weights that
    disagree with the epoch count, or duplicated lines. Call `restore()` before `fit` and pass its result as
    `initial_epoch`. The model and its optimiser must be built first.
    """

    def __init__(self, run_dir, monitor="loss", csv_name="log.csv"):
        super().__init__()
        self.run_dir = run_dir
        self.monitor = monitor
        self.latest = os.path.join(run_dir, "latest.weights.h5")
        self.best = os.path.join(run_dir, "best.weights.h5")
        self.state_path = os.path.join(run_dir, "state.json")
        self.csv_path = os.path.join(run_dir, csv_name)
        self.state = {"epochs_done": 0, "best": None}

    def restore(self, model):
        """Load the last completed epoch, if any; returns the epoch to start from."""
        if not os.path.exists(self.latest):
            return 0
        try:
            # The epoch count stored inside the weights file is the one that goes with them
            # (state.json could be one save behind if a run was killed between the two).
            saved = weights_attrs(self.latest)
            model.load_weights(self.latest)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise UsageError(f"{self.latest}: cannot resume from this checkpoint ({e})") from None
        for i, generator in enumerate(seed_generators(model)):
            if f"seed_state_{i}" in saved:  # continue the noise stream, not replay epoch 1's
                generator.state.assign(np.asarray(saved[f"seed_state_{i}"]).astype(
                    generator.state.dtype))
        if "epochs_done" not in saved and os.path.exists(self.state_path):
            saved = read_json(self.state_path)  # written by an older version
        self.state = {"epochs_done": int(saved.get("epochs_done", 0)),
                      "best": None if saved.get("best") in (None, "") else float(saved["best"])}
        self._trim_csv(self.state["epochs_done"])
        print(f"resuming {self.run_dir} after epoch {self.state['epochs_done']}", file=sys.stderr)
        return self.state["epochs_done"]

    def _trim_csv(self, epochs_done):
        if not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        rows = rows[: 1 + epochs_done]
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        os.replace(tmp, self.csv_path)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        value = logs.get(self.monitor)
        if value is not None and np.isfinite(value) and (
                self.state["best"] is None or value < self.state["best"]):
            self.state["best"] = float(value)
            atomic_save_weights(self.model, self.best, epochs_done=epoch + 1, best=self.state["best"])
        self.state["epochs_done"] = epoch + 1
        atomic_save_weights(self.model, self.latest, epochs_done=epoch + 1,
                            best=self.state["best"] if self.state["best"] is not None else "",
                            **seed_states(self.model))
        self._append_csv(epoch + 1, logs)  # cut back to epochs_done on resume if this is lost
        write_json(self.state_path, self.state)  # for people and tools; resume reads the weights

    def _append_csv(self, epoch, logs):
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        if new:
            keys = sorted(k for k in logs if np.ndim(logs[k]) == 0)
        else:  # keep the columns of the first epoch
            with open(self.csv_path, newline="") as f:
                keys = next(csv.reader(f))[1:]
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch"] + keys)
            writer.writerow([epoch] + [f"{float(logs[k]):.6g}" if k in logs else "" for k in keys])
