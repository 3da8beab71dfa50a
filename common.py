"""Shared plumbing for f_vaes.py and infomax.py.

Nothing model-specific lives here: finding and decoding image files into a `tf.data`
pipeline, tiling pictures into a PNG grid, spreading training over several devices or
machines (`tf.distribute`), checking the run folder, and saving a run so that the same
command resumes it (weights + optimiser state + epoch, written atomically).
"""

import atexit
import csv
import json
import math
import os
import shutil
import sys
import tempfile
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
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)  # the global batch (several devices)
    return shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


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


# --------------------------------------------------------------------------- several devices

DISTRIBUTE = ("none", "mirrored", "multiworker")


def make_strategy(name, devices=None):
    """The `tf.distribute` strategy of `--distribute`. Call it at program start, before any other
    TensorFlow op: MultiWorkerMirroredStrategy (and splitting a CPU) must come before
    TensorFlow starts its devices.

    none: TensorFlow's default strategy, one device, nothing changes. mirrored: one replica per
    local GPU, or per name in `devices` (["GPU:0", "GPU:1"]); naming more CPU devices than there
    are splits the CPU into that many logical devices (to try it without GPUs). multiworker:
    one process per machine, each started with the same command and its own `TF_CONFIG`.
    """
    if devices and name != "mirrored":
        raise UsageError(f"--devices: only with --distribute mirrored (not {name})")
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        cpus = [int(d.split(":")[-1]) for d in devices or ()
                if d.upper().lstrip("/").startswith("CPU:")]
        if cpus and max(cpus) > 0:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0],
                [tf.config.LogicalDeviceConfiguration()] * (max(cpus) + 1))
        strategy = tf.distribute.MirroredStrategy(devices or None)
    elif name == "multiworker":
        try:
            cluster = json.loads(os.environ.get("TF_CONFIG", ""))["cluster"]
        except (ValueError, KeyError, TypeError):
            raise UsageError("--distribute multiworker: TF_CONFIG must hold this machine's JSON "
                             'cluster and task, e.g. {"cluster": {"worker": ["host1:12345", '
                             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}') from None
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        print(f"cluster {cluster}, this task {strategy.cluster_resolver.task_type} "
              f"{strategy.cluster_resolver.task_id}", file=sys.stderr)
    else:
        raise UsageError(f"--distribute {name!r}: expected one of {', '.join(DISTRIBUTE)}")
    print(f"--distribute {name}: {strategy.num_replicas_in_sync} replica(s) "
          f"({', '.join(strategy.extended.worker_devices)} here)", file=sys.stderr)
    return strategy


def device_list(text):
    """`--devices GPU:0,GPU:1` -> ["GPU:0", "GPU:1"]."""
    return [d.strip() for d in text.split(",") if d.strip()]


def check_global_batch(batch_size, strategy, per_replica_minimum=1):
    """`--batch-size` is the global batch: it must split evenly over the replicas (so that every
    replica's mean weighs the same in the global mean)."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas or batch_size // replicas < per_replica_minimum:
        raise UsageError(f"--batch-size {batch_size}: the global batch must split into {replicas} "
                         f"equal parts (one per replica) of at least {per_replica_minimum}")


def xla_allowed(wanted, distribute, flag):
    """`wanted`, except under `--distribute`: Keras 3 compiles the whole distributed step, the
    replicas' cross-device reductions included, as one XLA computation, which cannot reach
    variables on several devices ("Trying to access resource ... located in device CPU:1").
    The step then runs as an ordinary TensorFlow graph."""
    if wanted and distribute != "none":
        print(f"{flag}: off with --distribute {distribute} (Keras 3 would compile the step of "
              "all replicas as one XLA computation, which cannot span devices)", file=sys.stderr)
        return False
    return wanted


def is_chief(strategy):
    """True for the process that writes `--out`: always without a cluster; in a cluster, the task
    of type "chief", or worker 0 when there is none (the rule of TensorFlow's guide)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def writable_run_dir(out, strategy):
    """Where this process writes its run: `out` for the chief; for every other worker a temporary
    folder, removed at exit (as in TensorFlow's multi-worker guide: all workers save, since
    saving may read distributed variables, but only the chief's files are kept).

    A worker's folder starts with copies of `out`'s config, state and log and a link to its
    latest weights, so that it checks the flags and resumes from the chief's checkpoint
    without ever writing into `out` (new files replace the link, never the target). For a
    resume, `out` must therefore be readable by every worker: a shared filesystem.
    """
    if is_chief(strategy):
        return out
    resolver = strategy.cluster_resolver
    folder = tempfile.mkdtemp(prefix=f"{resolver.task_type}{resolver.task_id}_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    print(f"{resolver.task_type} {resolver.task_id} is not the chief: it writes to {folder} "
          "(removed at exit); only the chief writes to --out", file=sys.stderr)
    for name in ("config.json", "state.json", "log.csv"):
        if os.path.isfile(os.path.join(out, name)):
            shutil.copy2(os.path.join(out, name), folder)
    latest = os.path.join(out, "latest.weights.h5")
    if os.path.isfile(latest):
        os.symlink(os.path.abspath(latest), os.path.join(folder, "latest.weights.h5"))
    return folder


def check_workers_agree(strategy, value, what):
    """Stop with a clear error, on every worker at once, unless all workers of a multi-worker run
    hold the same number `value` (e.g. the epoch a resumed run starts from). A collective
    operation: every worker must call it. Does nothing without a cluster."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    total = sum_over_replicas(strategy, tf.constant([value, value ** 2], tf.float64))
    if strategy.num_replicas_in_sync * total[1] != total[0] ** 2:  # all equal iff no variance
        raise UsageError(f"the workers disagree on {what} (this one: {value}); every worker must "
                         "read the same --out, i.e. a folder on a filesystem they share")


def wait_for_all_workers(strategy):
    """Return once every worker of a multi-worker run has called this (at once otherwise). Other
    workers wait here while the chief finishes alone (evaluation, pictures): a worker that
    leaves early is reported by TensorFlow as crashed, and the cluster's collectives abort."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        sum_over_replicas(strategy, tf.ones(()))


def sum_over_replicas(strategy, value):
    """The sum over all replicas, on all workers, of `value` (this worker's number, given to each
    of its replicas), as numpy. A collective: every worker must call it."""
    @tf.function(autograph=False)
    def total():
        return strategy.reduce("SUM", strategy.run(tf.identity, args=(value,)), axis=None)
    return total().numpy()


def replica_share(batch_mean):
    """This replica's part of a mean over the global batch: the mean over its own examples divided
    by the number of replicas. The optimiser sums the replicas' gradients (tf.distribute), so
    the parts add up to the mean over the whole global batch, exactly as on one device (Keras'
    own `scale_loss_for_distribution` does the same for compiled losses). On one device it is
    `batch_mean` itself. Metrics are given the unscaled values."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return batch_mean / replicas if replicas > 1 else batch_mean


def replica_draw(draw, shape):
    """Random numbers for this replica's part of the batch, cut from one draw for the global batch.

    A model's `keras.random.SeedGenerator` is one variable mirrored on all replicas, so a plain
    `draw(shape)` would give every replica the same numbers: the same noise for different
    images. Instead every replica draws for the whole global batch (`draw((replicas * rows,
    ...))`, same seed everywhere) and keeps its own rows: the replicas' numbers differ, and
    together they are exactly what one device draws for the same global batch.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    if replicas == 1:
        return draw(shape)
    rows = shape[0]
    start = context.replica_id_in_sync_group * rows
    return draw((replicas * rows, *shape[1:]))[start:start + rows]


def step_logs(values):
    """A `train_step`'s dict of metric values, as `model.fit` can take them. With several workers
    Keras 3 averages each value over the replicas with `strategy.reduce(MEAN, axis=0)`, which
    fails on scalars (tensorflow/tensorflow#72388); one-element vectors give the same averages."""
    strategy = tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode()):  # the test Keras itself makes
        return {name: tf.reshape(value, (1,)) for name, value in values.items()}
    return values


def shard_by_data(dataset):
    """Under MultiWorkerMirroredStrategy every worker runs the same pipeline and keeps its own
    replicas' rows of each global batch (AutoShardPolicy.DATA; set here so that TensorFlow
    does not first look for files to split). Every worker must therefore produce the same
    batches in the same order: seeded shuffles, deterministic maps. No effect elsewhere."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


class AverageReplicaStatistics(keras.callbacks.Callback):
    """At the end of every epoch, set every replica's batch-norm moving mean and variance to their
    average over all replicas (and workers). Without `synchronized=True` each replica
    normalises with its own part of the batch and keeps its own moving statistics (Keras 3
    updates each copy of such a variable on its own device); averaging them before the
    checkpoint makes every replica, every worker and the saved weights hold the same numbers.
    A collective: it runs on every worker. Does nothing on one replica or with synchronised
    statistics, which are the same everywhere already."""

    def on_epoch_end(self, epoch, logs=None):
        strategy = self.model.distribute_strategy
        norms = [layer for layer in self.model._flatten_layers()
                 if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized]
        statistics = [v for layer in norms for v in (layer.moving_mean, layer.moving_variance)]
        if strategy.num_replicas_in_sync == 1 or not statistics:
            return

        @tf.function
        def average():
            def on_replica():
                context = tf.distribute.get_replica_context()
                means = context.all_reduce("MEAN", [tf.identity(v.value) for v in statistics])
                for variable, mean in zip(statistics, means):
                    variable.assign(mean)  # each replica sets its own copy
            strategy.run(on_replica)
        average()


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
