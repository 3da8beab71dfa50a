"""Shared plumbing for f_vaes.py and infomax.py.

Nothing model-specific lives here: finding and decoding image files into a `tf.data`
pipeline, tiling pictures into a PNG grid, spreading training over several devices or
machines (`tf.distribute`), checking the run folder, saving a run so that the same command
resumes it (weights + optimiser state + position, written atomically), and the guards a long
run needs: non-finite steps are not applied, repeated ones roll back, Ctrl-C saves before
stopping.
"""

import argparse
import atexit
import contextlib
import csv
import glob
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings

import numpy as np
import tensorflow as tf
import keras
from keras import ops
import h5py
import imageio.v3 as iio

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class UsageError(ValueError):
    """Bad flag, path or data detected before any work is done (the scripts exit with 2)."""


class TrainingStopped(RuntimeError):
    """A run that cannot go on safely (weights not finite, rollbacks that do not help, a save
    that cannot be written); its last checkpoint is intact. The scripts exit with 1."""
    exit_code = 1


class Interrupted(TrainingStopped):
    """Ctrl-C or SIGTERM during training, after the run was saved; exit 128 + signal number."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def fail(message):
    """Print a one-line error naming the flag or path and exit with status 2 (argparse's code)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def stop(error):
    """Print why a run stopped (one line, after what Keras printed) and exit with its code."""
    print(f"\n{'stopped' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr)
    sys.exit(error.exit_code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: argument --epochs: ...`) and exit status 2: the
    usage block is one `--help` away and would push the reason off a short terminal."""

    def error(self, message):
        fail(f"{message} (see --help)")


def add_run_flags(parser, nan_patience=20):
    """The flags both training scripts share: where to train (tf.distribute) and how a run
    protects itself (non-finite steps, determinism)."""
    parser.add_argument("--distribute", choices=DISTRIBUTE, default="none",
                        help="train on one device, on all local GPUs (mirrored) or on the "
                             "machines of TF_CONFIG (multiworker); --batch-size stays the "
                             "global batch")
    parser.add_argument("--devices", type=device_list, default=None,
                        help="mirrored: the devices to use, e.g. GPU:0,GPU:1 (default: all GPUs)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="batch-norm statistics over the global batch, not each replica's part")
    parser.add_argument("--nan-patience", type=int, default=nan_patience,
                        help="non-finite (skipped) steps in a row before rolling back to the best "
                             "weights and dividing the learning rate by 10 (0: only skip them)")
    parser.add_argument("--deterministic", action="store_true",
                        help="TensorFlow op determinism: the same seed and flags give the same "
                             "weights, also across an interruption and resume (slower on a GPU)")


# --------------------------------------------------------------------------- optimiser

@keras.saving.register_keras_serializable(package="common")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`: the same update, hyperparameters and saved state (m and v),
    with each variable updated by TensorFlow's fused Adam kernel in one pass over var, m and
    v instead of Keras' nine element-wise ops. For the f-VAE's 96M parameters that is about
    a third of the time of Keras' update (README.md, Benchmark). The kernel computes Keras' formula:
    m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= lr sqrt(1 - b2^t) / (1 - b1^t) m /
    (sqrt(v) + eps). Sparse gradients and amsgrad take Keras' own path. Under tf.distribute
    Keras calls `update_step` once per device inside `distribution.extended.update`, where
    `variable.handle` is that device's copy: each copy gets its own fused update
    (tests/test_distribute.py compares the Adam moments with one device's).
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
        # the very function training uses, so that a file that passes cannot fail mid-epoch
        image = _decode_rgb(path) if img_size is None else load_image(path, img_size)
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


# --------------------------------------------------------------------------- training streams

def stream_order(count, seed, start=0):
    """Indices 0..count-1, pass after pass, each pass a fresh permutation that depends only on
    (seed, pass number), from position `start` (the number of items training has used).

    The stream is a function of its position, not of the process: a run resumed after
    `start` items sees exactly what an uninterrupted run saw next, and getting there costs
    one permutation, not a replay of every earlier pass.
    """
    first_pass, offset = divmod(int(start), int(count))
    seed = tf.constant(int(seed), tf.int64)

    def one_pass(number):
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64),
                                                         seed=tf.stack([seed, number]))
        return tf.data.Dataset.from_tensor_slices(order)

    return tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass).skip(offset)


def image_stream(files, img_size, batch_size, scale, seed, start=0):
    """Training batches of image files in `stream_order` (reshuffled every pass, as the
    author's stream), decoded in parallel in a fixed order, from image number `start`."""
    paths = tf.constant(files)
    ds = stream_order(len(files), seed, start)
    ds = ds.map(lambda i: scale(load_image(tf.gather(paths, i), img_size)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return finish_stream(ds, first_step=int(start) // batch_size)


# Test-only fault injection: comma-separated step numbers (1 = the run's first training step,
# counted across resumes at a fixed batch size) whose batch is made all-NaN in the input
# pipeline, so the real step sees a non-finite loss, gradients and batch statistics.
NAN_STEPS_ENV = "TEST_NAN_AT_STEPS"


def finish_stream(ds, first_step=0):
    """Prefetch; with TEST_NAN_AT_STEPS set, poison those steps' batches first (in the graph,
    no host round trip, so the step under test is the real compiled one). `ds` yields global
    batches, the same on every worker of a cluster: each keeps its part (`shard_by_data`)."""
    steps = [int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()]
    if steps:
        poisoned = tf.constant(steps, tf.int64)

        def poison(index, batch):
            hit = tf.reduce_any(tf.equal(index + 1, poisoned))
            return tf.where(hit, batch * float("nan"), batch)

        ds = ds.enumerate(int(first_step)).map(poison)
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

    A worker's folder starts with copies of `out`'s config, state and log and links to its
    weights files (latest, previous, best), so that it checks the flags, resumes from the
    chief's checkpoint (or falls back as the chief does) and rolls back to the same best
    weights, without ever writing into `out` (new files replace a link, never its target).
    For a resume, `out` must therefore be readable by every worker: a shared filesystem.
    In a cluster every worker then waits for all the others, so that the chief changes
    nothing in `out` (config.json, the CSV, damaged files set aside) before all have copied it.
    """
    if is_chief(strategy):
        wait_for_all_workers(strategy)
        return out
    resolver = strategy.cluster_resolver
    folder = tempfile.mkdtemp(prefix=f"{resolver.task_type}{resolver.task_id}_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    print(f"{resolver.task_type} {resolver.task_id} is not the chief: it writes to {folder} "
          "(removed at exit); only the chief writes to --out", file=sys.stderr)
    for name in ("config.json", "state.json", "log.csv"):
        if os.path.isfile(os.path.join(out, name)):
            shutil.copy2(os.path.join(out, name), folder)
    for name in ("latest", "previous", "best"):
        weights = os.path.join(out, f"{name}.weights.h5")
        if os.path.isfile(weights):
            os.symlink(os.path.abspath(weights), os.path.join(folder, f"{name}.weights.h5"))
    wait_for_all_workers(strategy)
    return folder


def check_workers_agree(strategy, value, what,
                        hint="every worker must read the same --out, i.e. a folder on a "
                             "filesystem they share"):
    """Stop with a clear error, on every worker at once, unless all workers of a multi-worker run
    hold the same number, or tuple of numbers, `value` (e.g. the position a resumed run starts
    from, the seed). Integers up to 2**31 are compared exactly. A collective operation: every
    worker must call it. Does nothing without a cluster."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    values = np.atleast_1d(np.asarray(value, np.float64))
    mean = sum_over_replicas(strategy, tf.constant(values)) / strategy.num_replicas_in_sync
    spread = sum_over_replicas(strategy, tf.constant(np.abs(values - mean)))
    if np.any(spread > 0):  # exact: a sum of equal integers is exact, and so is its mean
        raise UsageError(f"the workers disagree on {what} (this one: {value}); {hint}")


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
    if in_cluster():
        return {name: tf.reshape(value, (1,)) for name, value in values.items()}
    return values


def in_cluster(strategy=None):
    """True under a MultiWorkerMirroredStrategy with several workers (the test Keras itself
    makes); `strategy` defaults to the current one."""
    strategy = strategy or tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


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


def flag_name(key):
    """The command-line flag of a configuration key: img_size -> --img-size."""
    return "--" + key.replace("_", "-")


def config_differences(saved, config, keys, flag_of=flag_name):
    """'saved with --img-size 128, asked for 64' for each of `keys` whose value differs."""
    return [f"saved with {flag_of(k)} {saved.get(k)!r}, asked for {config.get(k)!r}"
            for k in keys if saved.get(k) != config.get(k)]


def check_run_config(run_dir, config, must_match, flag_of=flag_name):
    """Save the run's configuration beside its weights, or check a resumed run against it,
    before anything is written: against config.json, or, if that is gone, against the model
    configuration stored inside the run's weights files.

    `must_match` lists the keys that change the model (a resumed run must use the same).
    Returns what the previous command saved in config.json ({} if none).
    """
    path = os.path.join(run_dir, "config.json")
    source, saved = path, {}
    if os.path.exists(path):
        try:
            saved = read_json(path)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: unreadable run configuration ({e})") from None
    else:
        source, saved = saved_model_config(run_dir)
    diffs = config_differences(saved, config, [k for k in must_match if k in saved], flag_of)
    if diffs:
        raise UsageError(f"{source} holds another model: " + "; ".join(diffs)
                         + " (use another --out, or the same flags)")
    write_json(path, config)
    return saved if source == path else {}


def saved_model_config(run_dir):
    """(file, model configuration) from the first run weights file that records one."""
    for name in ("latest", "previous", "best"):
        path = os.path.join(run_dir, f"{name}.weights.h5")
        with contextlib.suppress(Exception):
            return path, json.loads(weights_attrs(path)["config"])
    return None, {}


# --------------------------------------------------------------------------- checkpoints

# Test-only: "EPOCH:SECONDS" pauses the saves at the end of that epoch between writing the
# temporary file and renaming it, so that a test can kill the process in the middle of one.
PAUSE_ENV = "TEST_PAUSE_IN_SAVE"


def atomic_save_weights(model, path, previous=None, **attrs):
    """`model.save_weights` (weights and optimiser state) through a temporary file + rename.

    `attrs` (e.g. epochs_done=3) are stored inside the same HDF5 file, so that the weights
    and the count they belong to are committed by one rename and can never disagree. The
    file is synced to disk before the rename. With `previous`, the file being replaced is
    kept under that name. A save that cannot be written (a full disk) removes its temporary
    file, leaves the old one as it was and raises TrainingStopped.
    """
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    try:
        model.save_weights(tmp, overwrite=True)
        if attrs:
            with h5py.File(tmp, "a") as f:
                for key, value in attrs.items():
                    f.attrs[key] = value
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise TrainingStopped(f"cannot write {path} ({e.strerror or e}); the previous save is "
                              "intact: free some space and run the same command again") from None
    pause = os.environ.get(PAUSE_ENV, "")
    if pause and attrs.get("epochs_done") == int(pause.split(":")[0]) and not attrs.get("steps_done"):
        print(f"pausing before renaming {tmp}", file=sys.stderr, flush=True)
        time.sleep(float(pause.split(":")[1]))
    if previous and os.path.exists(path):
        os.replace(path, previous)
    os.replace(tmp, path)


def weights_attrs(path):
    """The attributes `atomic_save_weights` stored in a weights file ({} if none)."""
    with h5py.File(path, "r") as f:
        return {k: (v.item() if np.ndim(v) == 0 and hasattr(v, "item") else v)
                for k, v in f.attrs.items()}


def weights_are_finite(model):
    """True when every float weight of the model and of its optimiser is finite (one reduction
    on the device, one number back)."""
    variables = list(model.weights) + list(getattr(model.optimizer, "variables", []) or [])
    checks = [tf.reduce_all(tf.math.is_finite(v)) for v in variables if "float" in str(v.dtype)]
    return bool(tf.reduce_all(tf.stack(checks))) if checks else True


def seed_generators(model):
    """Every `keras.random.SeedGenerator` of the model and its layers, in a fixed order.
    Their states are not part of `save_weights`, so `RunCheckpoint` stores them itself."""
    return [g for layer in model._flatten_layers() for g in getattr(layer, "_seed_generators", [])]


def seed_states(model):
    return {f"seed_state_{i}": np.asarray(g.state.numpy())
            for i, g in enumerate(seed_generators(model))}


def metric_states(model):
    """The running sums of the model's metrics (what an epoch cut short has averaged so far)."""
    return {f"metric_state_{i}_{j}": np.asarray(v.numpy())
            for i, m in enumerate(model.metrics) for j, v in enumerate(m.variables)}


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class RunCheckpoint(keras.callbacks.Callback):
    """Save a run so that the same command resumes it where it stopped.

    Writes, in `run_dir`:
    - `latest.weights.h5`: weights + optimiser state (its learning rate included) + where the
      run is (`epochs_done`, `steps_done` into the next epoch, `images_seen` of the data
      stream) + the states of the model's random seed generators + the model configuration,
      in one HDF5 file, after every epoch and when Ctrl-C/SIGTERM stops a run;
      `previous.weights.h5`: the save before it, to fall back on if the latest is damaged;
    - `best.weights.h5`: the same at the end of the epoch with the lowest `monitor` so far;
    - `log.csv`, one line per finished epoch (a copy of the line travels in the weights
      file, so that a kill between the two loses no line); `state.json`, where the run is,
      for people and tools; `events.log`: resumes, fallbacks, rollbacks, interruptions.
    Every file is written to a temporary name and renamed, temporaries left by a killed save
    are removed on resume, and the CSV is cut back to the saved epoch, so an interrupted run
    never has a half-written checkpoint, weights that disagree with their position, or
    duplicated lines. Weights that are not finite are never saved (TrainingStopped).
    Call `restore()` before training and train with `fit_resumable`. The model and its
    optimiser must be built first.
    """

    def __init__(self, run_dir, monitor="loss", batch_size=1, steps_per_epoch=None,
                 model_config=None, flag_of=flag_name, csv_name="log.csv"):
        super().__init__()
        self.run_dir = run_dir
        self.monitor = monitor
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.model_config = dict(model_config or {})
        self.flag_of = flag_of
        self.latest = os.path.join(run_dir, "latest.weights.h5")
        self.previous = os.path.join(run_dir, "previous.weights.h5")
        self.best = os.path.join(run_dir, "best.weights.h5")
        self.state_path = os.path.join(run_dir, "state.json")
        self.csv_path = os.path.join(run_dir, csv_name)
        self.events_path = os.path.join(run_dir, "events.log")
        self.epochs_done, self.steps_done, self.images_seen, self.best_value = 0, 0, 0, None
        self.resumed_from = None       # the file `restore` loaded
        self.interrupt = None          # the number of a signal asking the run to save and stop
        self._resumed_metrics = None   # running sums of an epoch cut short, until it goes on
        self._epoch_images = self._epoch_step_offset = 0

    @property
    def state(self):
        return {"epochs_done": self.epochs_done, "steps_done": self.steps_done,
                "images_seen": self.images_seen, "best": self.best_value}

    # ----------------------------------------------------------------------- resuming

    def restore(self, model):
        """Load the newest save that can be read; returns the number of finished epochs.

        A damaged file (empty, truncated, not finite) is skipped for the previous save, then
        the best one, saying so and setting it aside as `*.damaged`; a file saved by another
        model configuration, or no readable file at all, is a UsageError naming the files.
        """
        self._remove_temporaries()
        candidates = [p for p in (self.latest, self.previous, self.best) if os.path.exists(p)]
        problems = []
        for path in candidates:
            try:
                saved = self._load(model, path)
                break
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 - every unreadable file is reported the same way
                problems.append((path, first_line(e)))
        else:
            if problems:
                raise UsageError(f"{self.run_dir}: no checkpoint can be read ("
                                 + "; ".join(f"{p}: {why}" for p, why in problems)
                                 + "): damaged, or saved by another model; move them away "
                                 "to start this run again")
            return 0
        if path != self.latest:
            for damaged, _ in problems:
                os.replace(damaged, damaged + ".damaged")
            why = "; ".join(f"{os.path.basename(p)} is damaged ({why}), set aside as "
                            f"{os.path.basename(p)}.damaged" for p, why in problems)
            self.log_event(f"{why or 'latest.weights.h5 is missing (a save was cut short)'}; "
                           f"falling back to {path}")
        self.resumed_from = path
        self.epochs_done = int(saved.get("epochs_done", 0))
        self.steps_done = int(saved.get("steps_done", 0))
        self.images_seen = int(saved.get("images_seen", self.epochs_done * (self.steps_per_epoch or 0)
                                         * self.batch_size))
        self.best_value = self._best_value(saved)
        if self.steps_done:
            self._resumed_metrics = {k: v for k, v in saved.items() if k.startswith("metric_state_")}
        for i, generator in enumerate(seed_generators(model)):
            if f"seed_state_{i}" in saved:  # continue the noise stream, not replay epoch 1's
                generator.state.assign(np.asarray(saved[f"seed_state_{i}"]).astype(
                    generator.state.dtype))
        self._trim_csv(self.epochs_done, saved.get("log_row"))
        where = f"epoch {self.epochs_done}" + (
            f" and step {self.steps_done} of epoch {self.epochs_done + 1}" if self.steps_done else "")
        self.log_event(f"resuming {self.run_dir} after {where} (from {os.path.basename(path)})")
        return self.epochs_done

    def _load(self, model, path):
        saved = weights_attrs(path)
        if self.model_config and "config" in saved:
            diffs = config_differences(json.loads(saved["config"]), self.model_config,
                                       sorted(self.model_config), self.flag_of)
            if diffs:
                raise UsageError(f"{path} holds another model: " + "; ".join(diffs))
        model.load_weights(path)
        if not weights_are_finite(model):
            raise ValueError("its weights are not finite")
        if "epochs_done" not in saved and os.path.exists(self.state_path):
            saved = {**read_json(self.state_path), **saved}  # written by an older version
        return saved

    def _best_value(self, saved):
        """The lowest monitored value so far: best.weights.h5 may be one save ahead of latest."""
        values = [saved.get("best")]
        with contextlib.suppress(Exception):
            values.append(weights_attrs(self.best).get("best"))
        values = [float(v) for v in values if v not in (None, "")]
        return min(values) if values else None

    def _remove_temporaries(self):
        """Temporary files of a save that was killed: never taken for a checkpoint."""
        patterns = ("*.tmp.weights.h5", "*.tmp", "*.tmp.png", os.path.join("samples", "*.tmp.png"))
        for path in sorted({p for pattern in patterns
                            for p in glob.glob(os.path.join(glob.escape(self.run_dir), pattern))}):
            os.remove(path)
            print(f"removed {path}, left by an interrupted save", file=sys.stderr)

    def _trim_csv(self, epochs_done, saved_logs=None):
        """Make log.csv one whole line per epoch 1..epochs_done: lines of epochs after the save
        (and any broken line) go; the saved epoch's own line, if a kill came between the
        weights and the CSV, is written again from the copy inside the weights file."""
        rows = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
        header, lines = (rows[0], []) if rows else (None, [])
        for row in rows[1:]:
            if len(row) == len(header) and row[0] == str(len(lines) + 1) and len(lines) < epochs_done:
                lines.append(row)
        if header is not None:
            tmp = self.csv_path + ".tmp"
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([header] + lines)
            os.replace(tmp, self.csv_path)
        if saved_logs and epochs_done and len(lines) == epochs_done - 1:
            self._append_csv(epochs_done, json.loads(saved_logs))

    # ----------------------------------------------------------------------- during training

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_images, self._epoch_step_offset = self.images_seen, self.steps_done
        if self._resumed_metrics:  # the epoch a Ctrl-C cut short: its running means go on
            for i, metric in enumerate(self.model.metrics):
                for j, variable in enumerate(metric.variables):
                    if f"metric_state_{i}_{j}" in self._resumed_metrics:
                        variable.assign(self._resumed_metrics[f"metric_state_{i}_{j}"])
            self._resumed_metrics = None

    def saves_mid_epoch(self):
        """Whether Ctrl-C/SIGTERM saves after the step in flight (else at the epoch's end). Not
        in a cluster: there the save reads the metrics' running sums, an all-reduce over the
        workers, which a worker the signal did not reach (or reached one step later) would
        never join; the epoch's end is a point that every worker reaches."""
        return not in_cluster(self.model.distribute_strategy if self.model else None)

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done = self._epoch_step_offset + batch + 1
        self.images_seen = self._epoch_images + (batch + 1) * self.batch_size
        if (self.interrupt is not None and batch + 1 < (self.params or {}).get("steps", batch + 2)
                and self.saves_mid_epoch()):
            self.save_and_stop()  # at an epoch's last step, the epoch's own save is the one

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if getattr(self.model.optimizer, "learning_rate", None) is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())
        self.epochs_done, self.steps_done = epoch + 1, 0
        self._refuse_non_finite(f"the end of epoch {epoch + 1}")
        value = logs.get(self.monitor)
        row = json.dumps({k: float(v) for k, v in logs.items() if np.ndim(v) == 0})
        if value is not None and np.isfinite(value) and (
                self.best_value is None or value < self.best_value):
            self.best_value = float(value)
            atomic_save_weights(self.model, self.best, **self._attrs(), log_row=row)
        atomic_save_weights(self.model, self.latest, previous=self.previous, **self._attrs(),
                            log_row=row)
        self._append_csv(epoch + 1, logs)  # cut back to epochs_done on resume if this is lost
        write_json(self.state_path, self.state)  # for people and tools; resume reads the weights
        if self.interrupt is not None:  # Ctrl-C during the epoch's last step or its save
            self.model.stop_training = True

    def save_and_stop(self):
        """Save where the run is, in the middle of an epoch, and stop it (Ctrl-C, SIGTERM)."""
        signum, self.interrupt = self.interrupt, None
        self._refuse_non_finite("the interruption")
        atomic_save_weights(self.model, self.latest, previous=self.previous,
                            **self._attrs(), **metric_states(self.model))
        write_json(self.state_path, self.state)
        message = (f"{signal.Signals(signum).name}: saved {self.latest} after step "
                   f"{self.steps_done} of epoch {self.epochs_done + 1}; the same command "
                   "continues from there")
        self.log_event(message, echo=False)
        raise Interrupted(message, signum)

    def _attrs(self):
        return {**self.state, "best": "" if self.best_value is None else self.best_value,
                "config": json.dumps(self.model_config, sort_keys=True), **seed_states(self.model)}

    def _refuse_non_finite(self, when):
        if not weights_are_finite(self.model):
            message = (f"the weights are not finite at {when}: not saved, the last good save "
                       f"({self.latest}) is kept")
            self.log_event(message, echo=False)
            raise TrainingStopped(message)

    def log_event(self, message, echo=True):
        """One line on stderr and, with the time, in events.log (appended, never cut back)."""
        if echo:
            print(message, file=sys.stderr, flush=True)
        with open(self.events_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

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


# --------------------------------------------------------------------------- non-finite steps

def all_finite(tensors):
    """One boolean tensor: every value of every tensor (None skipped) is finite."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors if t is not None]))


def snapshot(variables):
    """(variable, value now) for the float variables a forward pass changes by itself (batch-norm
    statistics), read before that pass, so that a skipped step can put them back."""
    return [(v, tf.identity(v.value)) for v in variables if "float" in str(v.dtype)]


def apply_if_finite(optimizer, loss, gradients, variables, restore=()):
    """`optimizer.apply(gradients, variables)` only if the loss and every gradient are finite
    on every replica; otherwise nothing changes: not the weights, not the optimiser state
    (its step count included), and the `restore` pairs of `snapshot` are put back.
    Returns the decision as a boolean tensor, the same on every replica.

    Under tf.distribute the non-finite count is all-reduced first, so every replica (and
    worker) takes the same branch. A `cond` in a replica context cannot hold a merge_call
    (which `optimizer.apply` makes), so where the strategy needs merge_call the cond runs in
    cross-replica context, as in Keras' LossScaleOptimizer._tf_apply. No host round trip:
    the step runs unchanged on a GPU and under XLA.
    """
    restore = list(restore)
    finite = all_finite([loss, *gradients])
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        non_finite = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                        1.0 - ops.cast(finite, "float32"))
        finite = ops.equal(non_finite, 0.0)

    def apply(gradients):
        optimizer.apply(gradients, variables)

    def undo(values):
        for (variable, _), value in zip(restore, values):
            variable.assign(value)

    values = [value for _, value in restore]
    if context is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
        ops.cond(finite, lambda: apply(gradients), lambda: undo(values))
    else:
        def cross_replica(distribution, finite, gradients, values):
            decision = distribution.experimental_local_results(finite)[0]  # equal on all
            ops.cond(decision,
                     lambda: distribution.extended.call_for_each_replica(apply, args=(gradients,)),
                     lambda: distribution.extended.call_for_each_replica(undo, args=(values,)))

        context.merge_call(cross_replica, args=(finite, gradients, values))
    return finite


class AppliedMean(keras.metrics.Mean):
    """The epoch mean of a logged value over the steps that were applied; NaN while none was.
    A skipped step's NaN does not poison the epoch's number, and an epoch of skipped steps
    does not look like a loss of 0 (which would make it the best)."""

    def update_state(self, values, applied=True):
        values = ops.cast(values, self.dtype)
        weights = ops.cast(applied, self.dtype) * ops.ones_like(values)
        super().update_state(ops.where(applied, values, ops.zeros_like(values)),
                             sample_weight=weights)

    def result(self):
        return ops.where(self.count > 0, ops.divide_no_nan(self.total, self.count), float("nan"))


class SkippedSteps(keras.metrics.Metric):
    """Steps of the epoch whose update was skipped (non-finite loss or gradients). Every
    replica takes the same decision and counts it; a read across replicas takes the first
    replica's count (not the sum), so each skipped step counts once under tf.distribute."""

    def __init__(self, name="skipped_steps", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total",
                                       aggregation="only_first_replica")

    def update_state(self, applied):
        self.total.assign_add(1.0 - ops.cast(applied, self.dtype))

    def reset_state(self):
        self.total.assign(0.0)

    def result(self):
        return ops.convert_to_tensor(self.total)


class NonFiniteRollback(keras.callbacks.Callback):
    """After `patience` non-finite (skipped) steps in a row, reload the best weights (else the
    latest save) with their optimiser state, divide the learning rate by `factor`, and log it
    (stderr, events.log; RunCheckpoint's CSV has a `learning_rate` column). The author's Glow did this
    by hand. The lowered rate is in the optimiser state, so it survives a resume. After
    `max_rollbacks` rollbacks with no new best epoch in between, the run stops
    (TrainingStopped): lowering the rate again would not help. `patience` 0: only skip.
    """

    def __init__(self, checkpoint, patience=20, factor=10.0, max_rollbacks=3):
        super().__init__()
        self.checkpoint, self.patience, self.factor = checkpoint, patience, factor
        self.max_rollbacks = max_rollbacks
        self.streak, self.rollbacks, self._best_at_rollback = 0, 0, None
        self._skipped_before = self._last_batch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._skipped_before, self._last_batch = 0.0, -1

    def on_train_batch_end(self, batch, logs=None):
        skipped = float((logs or {}).get("skipped_steps", 0.0))
        steps = batch - self._last_batch  # more than 1 with steps_per_execution > 1
        self.streak = self.streak + steps if skipped > self._skipped_before else 0
        self._skipped_before, self._last_batch = skipped, batch
        if self.patience and self.streak >= self.patience:
            self.roll_back()

    def roll_back(self):
        if self.checkpoint.best_value != self._best_at_rollback:
            self.rollbacks = 0  # a new best since the last rollback: that one helped
        if self.rollbacks >= self.max_rollbacks:
            message = (f"{self.streak} non-finite steps in a row again after {self.rollbacks} "
                       f"rollbacks without a better epoch; stopping (the saves are intact)")
            self.checkpoint.log_event(message, echo=False)
            raise TrainingStopped(message)
        learning_rate = self.model.optimizer.learning_rate
        before = float(learning_rate.numpy())
        source = None
        for path in (self.checkpoint.best, self.checkpoint.latest):
            try:
                self.model.load_weights(path)  # weights, batch-norm statistics, Adam moments
                source = path
                break
            except Exception:  # noqa: BLE001 - missing or unreadable: try the next one
                continue
        learning_rate.assign(before / self.factor)
        self.rollbacks += 1
        self._best_at_rollback = self.checkpoint.best_value
        self.checkpoint.log_event(
            f"{self.streak} non-finite steps in a row (epoch {self.checkpoint.epochs_done + 1}, "
            f"step {self.checkpoint.steps_done}): "
            + (f"rolled back to {source}" if source else "no readable save yet, kept the weights "
               "(no step was applied since the first non-finite one)")
            + f", learning rate {before:.3g} -> {before / self.factor:.3g}")
        self.streak = 0


def resume_learning_rate(model, checkpoint, asked, asked_before):
    """After a resume, keep the saved learning rate (a rollback may have lowered it) unless this
    command asks for a different `--lr` than the previous one did; say which it is."""
    variable = model.optimizer.learning_rate
    saved = float(variable.numpy())
    if asked_before is not None and not math.isclose(asked, asked_before):
        variable.assign(asked)
        checkpoint.log_event(f"learning rate {asked:.3g} (--lr changed from {asked_before:.3g}; "
                             f"the checkpoint had {saved:.3g})")
    elif not math.isclose(saved, asked, rel_tol=1e-6):
        checkpoint.log_event(f"keeping the saved learning rate {saved:.3g} (lowered from --lr "
                             f"{asked:.3g} after non-finite steps; pass another --lr to change it)")


# --------------------------------------------------------------------------- training

def restore_run(model, checkpoint, strategy, lr, lr_before):
    """`checkpoint.restore(model)`, then make sure every worker resumes from the same place,
    and keep a learning rate a rollback lowered unless `--lr` changed (`lr_before`: the --lr
    of the previous command on this run, None if there was none)."""
    checkpoint.restore(model)  # weights, Adam state, noise streams, position in the data
    check_workers_agree(strategy, (checkpoint.epochs_done, checkpoint.steps_done),
                        "the position to resume from (epochs, steps)")
    if checkpoint.resumed_from:
        resume_learning_rate(model, checkpoint, lr, lr_before)


def guarded_callbacks(checkpoint, nan_patience):
    """The callbacks every training run starts with, in the order they must run: replicas'
    batch-norm statistics averaged before the save, the save, then the rollback that reads it."""
    return [AverageReplicaStatistics(), checkpoint, NonFiniteRollback(checkpoint, nan_patience)]


@contextlib.contextmanager
def save_on_signals(checkpoint, signals=(signal.SIGINT, signal.SIGTERM)):
    """While training: Ctrl-C (or SIGTERM, what schedulers send before SIGKILL) lets the step
    in flight finish, then `checkpoint` saves and stops the run (in a cluster: at the end of
    the epoch, see `RunCheckpoint.saves_mid_epoch`). A second Ctrl-C quits at once, without
    saving."""
    def request(signum, frame):
        if checkpoint.interrupt is not None:
            raise KeyboardInterrupt
        checkpoint.interrupt = signum
        when = "after this step" if checkpoint.saves_mid_epoch() else "at the end of this epoch"
        print(f"\n{signal.Signals(signum).name}: saving {when} "
              "(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    try:
        previous = {s: signal.signal(s, request) for s in signals}
    except ValueError:  # not the main thread: signals stay as they are
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fit_resumable(model, stream, checkpoint, epochs, steps_per_epoch, callbacks, **fit_kwargs):
    """`model.fit` from where `checkpoint.restore` left the run, to `epochs`.

    `stream(images_seen)` gives the training batches from that position of the data stream,
    so a resumed run sees exactly the batches an uninterrupted one would. An epoch cut
    short by Ctrl-C is finished first (its remaining steps, its running means restored),
    then the rest of the run. `checkpoint` must be among `callbacks`, before any callback
    that reads its position.
    """
    fit_kwargs.setdefault("shuffle", False)  # the stream shuffles itself
    with save_on_signals(checkpoint):
        if checkpoint.steps_done and checkpoint.epochs_done < epochs:
            epoch = checkpoint.epochs_done
            model.fit(stream(checkpoint.images_seen), initial_epoch=epoch, epochs=epoch + 1,
                      steps_per_epoch=max(steps_per_epoch - checkpoint.steps_done, 1),
                      callbacks=callbacks, **fit_kwargs)
        if checkpoint.interrupt is None and checkpoint.epochs_done < epochs:
            model.fit(stream(checkpoint.images_seen), initial_epoch=checkpoint.epochs_done,
                      epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                      **fit_kwargs)
    if checkpoint.interrupt is not None:  # it came at an epoch's end: that save is the one
        message = (f"{signal.Signals(checkpoint.interrupt).name}: saved {checkpoint.latest} at "
                   f"the end of epoch {checkpoint.epochs_done}; the same command continues "
                   "from there")
        checkpoint.log_event(message, echo=False)
        raise Interrupted(message, checkpoint.interrupt)
