"""The run of a training script, in the order that matters: `prepare_run` (devices, the
workers' agreement, the run folder, XLA, the global batch), then `fit_run` (the saved
configuration checked, the model built on every replica, the last save restored, and
`model.fit` with the guards and the checkpoint, resumable and interruptible).

Both scripts call these two; `RunSettings` holds the flags they share.
"""

import contextlib
import dataclasses
import math
import os
import shlex
import signal
import socket
import sys
import time

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

import tensorflow as tf

import tf_setup

from common import Interrupted, UsageError, ensure_writable_dir
from cli import option
from training.checkpoint import RunCheckpoint, check_run_config
from training.distribute import (DISTRIBUTE, AverageReplicaStatistics, check_global_batch,
                                 check_workers_agree, device_list, make_strategy,
                                 writable_run_dir, xla_allowed)
from training import monitor
from training.guards import NonFiniteRollback
from training.precision import PRECISIONS, describe as describe_precision


@dataclasses.dataclass
class RunSettings:
    """How a run trains and protects itself; the same flags in both scripts."""
    jit_compile: bool = option(None, "compile the training step with XLA (default: only when a "
                               "GPU is visible; on a CPU TensorFlow's oneDNN kernels are "
                               "faster; never with --distribute)", type=bool, aliases=("--jit",))
    precision: str = option("float32", "float32; mixed_bfloat16 or mixed_float16: the networks' "
                            "convolutions and matmuls in that precision, everything that decides "
                            "the likelihood, the inverse and the loss in float32, the weights "
                            "float32 (a run resumes in another precision); auto: mixed_bfloat16 "
                            "where the hardware runs it natively (a CPU with AMX or AVX512-BF16, "
                            "a GPU of compute capability 8.0+), else float32",
                            choices=PRECISIONS)
    distribute: str = option("none", "train on one device, on all local GPUs (mirrored) or on "
                             "the machines of TF_CONFIG (multiworker); --batch-size stays the "
                             "global batch", choices=DISTRIBUTE)
    devices: list = option(None, "mirrored: the devices to use, e.g. GPU:0,GPU:1 (default: all "
                           "GPUs)", type=device_list)
    sync_bn: bool = option(False, "batch-norm statistics over the global batch, not each "
                           "replica's part")
    nan_patience: int = option(20, "non-finite (skipped) steps in a row before rolling back to "
                               "the best weights and dividing the learning rate by 10 (0: only "
                               "skip them)")
    log_every: int = option(100, "every N steps: the running means to TensorBoard and, when the "
                            "output is not a terminal, as a line of text (0: off)", metavar="N")
    deterministic: bool = option(False, "TensorFlow op determinism: the same seed and flags give "
                                 "the same weights, also across an interruption and resume "
                                 "(slower on a GPU)")


@dataclasses.dataclass
class Run:
    """Where a run trains: `dir` is `--out` on the chief, a temporary folder on other workers;
    `lr_before` is the --lr of the previous command on this run (None if none); `data` what
    `prepare_run`'s `load_data` returned; `lock` the chief's hold on `out`; `config` the
    config given to `prepare_run` with what it decided (`jit_compile`), as saved in
    config.json: build the model from it. Use it as `with prepare_run(...) as run:`, which
    lets go of the folder at the end."""
    out: str
    dir: str
    strategy: tf.distribute.Strategy
    lr_before: float = None
    data: object = None
    lock: "RunFolderLock" = None
    config: object = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()


class RunFolderLock:
    """One training command per run folder: an exclusive `flock` on `trainer.lock` in it, held
    until `release()` or the process's end, with the holder's pid, host, start time and command
    written inside. A second trainer on the folder is a UsageError naming that process. The
    kernel drops the lock of a process that dies, so the file a killed trainer leaves behind
    blocks nothing; a released lock's file is removed. Commands that only read a run (sample,
    evaluate, search) do not lock: every file they read is replaced by a rename."""

    NAME = "trainer.lock"

    def __init__(self, run_dir, flag="--out"):
        self.path, self.file = os.path.join(run_dir, self.NAME), None
        if fcntl is None:
            return
        try:
            while self.file is None:
                f = open(self.path, "a+")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    holder = " ".join(f.read().split()) or "it has not written its name yet"
                    f.close()
                    raise UsageError(f"{flag} {run_dir!r}: another training command is running "
                                     f"on this run folder ({holder}); wait for it to end or "
                                     f"stop it (the same command then resumes), or use another "
                                     f"{flag}") from None
                if self._is_still_in_the_folder(f):
                    self.file = f
                else:  # its holder removed it as we opened it: lock the one now there
                    f.close()
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
                            f"{shlex.join([os.path.basename(sys.executable), *sys.argv])}\n")
            self.file.flush()
        except OSError as e:
            self.release()
            raise UsageError(f"{flag} {run_dir!r}: cannot write there ({e.strerror or e})") from None

    def _is_still_in_the_folder(self, f):
        try:
            return os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self):
        """Remove the file while still holding it (so that no one locks a removed file), then
        let go."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.file.close()
            self.file = None


def prepare_run(config, out, model_keys, per_replica_minimum=1, load_data=None):
    """Everything before the model, in the order it must happen: op determinism, the strategy
    (before any other TensorFlow op), every worker on the same seed, XLA decided
    (in `run.config`; `config` itself is left as it is), the run folder (the chief's `out`)
    writable, the global batch split over the replicas, `load_data()` if given, and last config.json written, or a
    resumed run checked against it (`model_keys` must match). Bad values are UsageErrors
    raised before anything in `out` changes. The chief locks `out` first (`RunFolderLock`,
    released when the `with` block of the returned Run ends): a second trainer on the same
    folder stops there, before it reads any data."""
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(config.distribute, config.devices)
    check_workers_agree(strategy, config.seed, "--seed", "give every worker the same --seed")
    wanted = (bool(tf_setup.visible_gpus()) if config.jit_compile is None
              else config.jit_compile)
    config = dataclasses.replace(
        config, jit_compile=xla_allowed(wanted, config.distribute, "--jit-compile"))
    run_dir = writable_run_dir(out, strategy)  # --out on the chief only
    ensure_writable_dir(run_dir, "--out" if run_dir == out else "TMPDIR")
    lock = RunFolderLock(out) if run_dir == out else None
    try:
        check_global_batch(config.batch_size, strategy, per_replica_minimum)
        data = load_data() if load_data else None
        before = check_run_config(run_dir, dataclasses.asdict(config), must_match=model_keys,
                                  added=getattr(config, "ADDED_KEYS", ()),
                                  assumed=getattr(config, "ASSUMED_BEFORE", None))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    print(f"precision: {describe_precision(config.precision)}", file=sys.stderr)
    return Run(out, run_dir, strategy, before.get("lr"), data, lock, config)


def fit_run(run, config, model_keys, build_model, stream, steps_per_epoch, monitors=(),
            callbacks=()):
    """Train (or resume) the run to `config.epochs`; returns the model.

    `build_model()` runs in the strategy's scope, the newest readable save is restored (a
    save of another model, by `model_keys`, is refused), and `model.fit` runs on
    `stream(images_seen)` (the data from that position on) with, in this order: the
    replicas' batch-norm statistics averaged, the `monitors` (callbacks that add numbers to
    the epoch's logs, so that they reach log.csv), the checkpoint, the rollback after
    non-finite steps, then `callbacks`.
    """
    with run.strategy.scope():  # variables, optimiser slots and metrics on every replica
        model = build_model()
    checkpoint = RunCheckpoint(run.dir, batch_size=config.batch_size,
                               steps_per_epoch=steps_per_epoch,
                               model_config={k: getattr(config, k) for k in model_keys})
    restore_run(model, checkpoint, run.strategy, config.lr, run.lr_before)
    if checkpoint.epochs_done >= config.epochs:
        print(f"{run.out} has already trained {checkpoint.epochs_done} of --epochs "
              f"{config.epochs}", file=sys.stderr)
        return model
    callbacks = [AverageReplicaStatistics(), *monitors, checkpoint,
                 NonFiniteRollback(checkpoint, config.nan_patience),
                 *monitor.callbacks(run.dir, config.log_every), *callbacks]
    fit_resumable(model, stream, checkpoint, config.epochs, steps_per_epoch, callbacks)
    return model


def restore_run(model, checkpoint, strategy, lr, lr_before):
    """`checkpoint.restore(model)`, then make sure every worker resumes from the same place,
    and keep a learning rate a rollback lowered unless `--lr` changed (`lr_before`: the --lr
    of the previous command on this run, None if there was none)."""
    checkpoint.restore(model)  # weights, Adam state, noise streams, position in the data
    check_workers_agree(strategy, (checkpoint.epochs_done, checkpoint.steps_done),
                        "the position to resume from (epochs, steps)")
    if checkpoint.resumed_from:
        resume_learning_rate(model, checkpoint, lr, lr_before)


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
    # a progress bar on a terminal; in a file (nohup, a scheduler) a line per epoch, and the
    # StepScalars lines in between, instead of a bar redrawn into one endless line
    fit_kwargs.setdefault("verbose", 1 if monitor.interactive() else 2)
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

