"""Training on several devices or machines (`tf.distribute`).

The strategy of `--distribute`, who writes the run folder (the chief), what every worker
must agree on, each replica's share of the loss and of the random draws, the logs Keras
can average, and the batch-norm statistics averaged over replicas before a save. On one
device every function here is the identity or does nothing.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf
import keras

from common import UsageError


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


def replica_sum(value):
    """The sum of `value` over the replicas (all-reduced in a replica context of several
    replicas): a statistic of the global batch, the same on every replica. On one device it is
    `value` itself."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


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

