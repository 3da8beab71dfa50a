"""Saving a run so that the same command resumes it where it stopped.

`RunCheckpoint` writes the weights, the optimiser state, the position in the data stream and
the noise streams' states into one HDF5 file, atomically, after every epoch and on Ctrl-C;
it falls back on the previous or best save when the latest is damaged, and keeps `log.csv`
one whole line per saved epoch. A full disk stops the run with one line and leaves every
earlier save and `log.csv` as they were. `check_run_config` keeps a resumed run from mixing models.
"""

import contextlib
import csv
import gc
import glob
import io
import json
import os
import signal
import sys
import time
import traceback

import numpy as np
import tensorflow as tf
import keras
import h5py

from common import CannotWrite, Interrupted, TrainingStopped, UsageError, append_text, cannot_write, read_run_json, remove_quietly, write_json, write_text
from cli import flag_name
from training import distribute


def config_differences(saved, config, keys):
    """'saved with --img-size 128, asked for 64' for each of `keys` whose value differs."""
    return [f"saved with {flag_name(k)} {saved.get(k)!r}, asked for {config.get(k)!r}"
            for k in keys if saved.get(k) != config.get(k)]


def check_run_config(run_dir, config, must_match, added=(), assumed=None):
    """Save the run's configuration beside its weights, or check a resumed run against it,
    before anything is written: against config.json, or, if that is gone, against the model
    configuration stored inside the run's weights files. A damaged or hand-edited config.json
    or state.json is a UsageError naming the file and the key, and stays as it is.

    `must_match` lists the keys that change the model (a resumed run must use the same);
    those in `added` may be absent from runs saved before they existed, and are then compared
    as the values of `assumed` ({key: what runs saved before the key had}) where it names them.
    Returns what the previous command saved in config.json ({} if none).
    """
    path = os.path.join(run_dir, "config.json")
    source, saved = path, {}
    if os.path.exists(path):  # a damaged or hand-edited one is an error, never overwritten
        kinds = {k: (type(v), True) for k, v in config.items() if v is not None}
        saved = read_run_json(path, kinds, required=[k for k in must_match if k not in added])
    else:
        source, saved = saved_model_config(run_dir)
    if os.path.exists(os.path.join(run_dir, "state.json")):
        read_state(os.path.join(run_dir, "state.json"))
    compared = {**(assumed or {}), **saved} if saved else saved
    diffs = config_differences(compared, config, [k for k in must_match if k in compared])
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


STATE_KINDS = {"epochs_done": (int, False), "steps_done": (int, False),
               "images_seen": (int, False), "best": (float, True)}


def read_state(path):
    """A run's state.json (where it is, for people and tools), checked by `read_run_json`."""
    return read_run_json(path, STATE_KINDS, required=("epochs_done",),
                         fix="repair or delete it (the weights files hold where the run is)")


def atomic_save_weights(model, path, previous=None, kept=None, **attrs):
    """`model.save_weights` (weights and optimiser state) through a temporary file + rename.

    `attrs` (e.g. epochs_done=3) are stored inside the same HDF5 file, so that the weights
    and the count they belong to are committed by one rename and can never disagree. The
    file is synced to disk before the rename. With `previous`, the file being replaced is
    kept under that name. A save that cannot be written (a full disk) removes its temporary
    file, leaves the old one as it was and raises CannotWrite, with about how much space a
    save needs (`kept`: what is safe, for its message; default: the previous save).
    """
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    failure = None
    with h5py_failures_contained(tmp) as contain:
        try:
            model.save_weights(tmp, overwrite=True)
            if attrs:
                with h5py.File(tmp, "a") as f:
                    for key, value in attrs.items():
                        f.attrs[key] = value
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            contain()
            failure = OSError(e.errno, os.strerror(e.errno) if e.errno else first_line(e))
    if failure is None:
        try:
            commit(tmp, path, previous, attrs)
            return
        except OSError as e:
            failure = e
    remove_quietly(tmp)
    needed = max([weights_file_size(model)]
                 + [os.path.getsize(p) for p in (path, previous) if p and os.path.exists(p)])
    raise cannot_write(path, failure, needed, kept or "the previous save is intact") from None


def load_weights(model, path):
    """`model.load_weights(path)`, also across precisions: a run saved in mixed_float16 (whose
    optimiser is Keras' LossScaleOptimizer, the Adam state one level down in the file) resumes
    in float32 or bfloat16 with the same Adam state, and the other way round. (Keras alone
    skips the optimiser's state there, with a warning, and the moments start again at zero.)
    The loss scale of a float16 run that starts from another precision's save starts afresh."""
    import warnings
    optimizer = getattr(model, "optimizer", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)
    if optimizer is None:
        return
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    with h5py.File(path, "r") as f:
        saved_scaled = "optimizer/inner_optimizer/vars" in f
        if scaled == saved_scaled or "optimizer/vars" not in f:
            return
        adam = optimizer.inner_optimizer if scaled else optimizer
        group = f["optimizer/vars" if scaled else "optimizer/inner_optimizer/vars"]
        adam.load_own_variables({key: np.asarray(group[key]) for key in group})


def weights_file_size(model):
    """About the size of the model's weights file: its weights and optimiser state."""
    variables = list(model.weights) + list(getattr(model.optimizer, "variables", None) or [])
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


@contextlib.contextmanager
def h5py_failures_contained(path):
    """Around the writing of the HDF5 file `path`, which a full disk can make fail. h5py
    reports each flush that fails as it drops the file's objects (a traceback through
    sys.excepthook, 'Exception ignored' through sys.unraisablehook), after the OSError that
    matters: those reports are kept off the screen. Call the yielded function on failure,
    before the objects go: HDF5 keeps a file it could not flush open and flushes it again at
    exit, where the full disk makes the process crash (SIGSEGV); on Linux its descriptor is
    pointed at an anonymous memory file instead, so that those writes succeed, nowhere."""
    def from_h5py(tb):
        return any("h5py" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb))

    def excepthook(kind, value, tb):
        if not from_h5py(tb):
            hooks[0](kind, value, tb)

    def unraisablehook(unraisable):
        if "h5py" not in str(unraisable.object) and not from_h5py(unraisable.exc_traceback):
            hooks[1](unraisable)

    def contain():
        failed.append(path)
        if not (hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")):
            return
        names = {os.path.abspath(path), os.path.abspath(path) + " (deleted)"}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") in names:
                    sink = os.memfd_create("discarded_hdf5_writes")
                    os.dup2(sink, int(fd))
                    os.close(sink)

    hooks, failed = (sys.excepthook, sys.unraisablehook), []
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    try:
        yield contain
        if failed:
            gc.collect()  # the failed file's objects go now, while their reports are kept quiet
    finally:
        sys.excepthook, sys.unraisablehook = hooks


def commit(tmp, path, previous=None, attrs=None):
    """The rename that makes a written, synced save the current one (the previous file, if
    kept, under `previous`). `attrs`: what the save recorded (tests pause here by epoch)."""
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
    - `best.weights.h5`: the same at the end of the epoch with the lowest loss so far;
    - `log.csv`, one line per finished epoch (a copy of the line travels in the weights
      file, so that a kill between the two loses no line); `state.json`, where the run is,
      for people and tools; `events.log`: resumes, fallbacks, rollbacks, interruptions.
    Every file is written to a temporary name and renamed, temporaries left by a killed save
    are removed on resume, and the CSV is cut back to the saved epoch, so an interrupted run
    never has a half-written checkpoint, weights that disagree with their position, or
    duplicated lines. Weights that are not finite are never saved (TrainingStopped). A file
    that cannot be written (a full disk) stops the run (CannotWrite, one line: the file, the
    space it needs, what is intact); lines are appended whole or not at all.
    Call `restore()` before training and train with `fit_resumable`. The model and its
    optimiser must be built first.
    """

    def __init__(self, run_dir, batch_size=1, steps_per_epoch=None,
                 model_config=None):
        super().__init__()
        self.run_dir = run_dir
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.model_config = dict(model_config or {})
        self.latest = os.path.join(run_dir, "latest.weights.h5")
        self.previous = os.path.join(run_dir, "previous.weights.h5")
        self.best = os.path.join(run_dir, "best.weights.h5")
        self.state_path = os.path.join(run_dir, "state.json")
        self.csv_path = os.path.join(run_dir, "log.csv")
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
        if os.path.exists(self.state_path):
            read_state(self.state_path)  # damaged or edited by hand: say so, do not overwrite it
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
            recorded = json.loads(saved["config"])  # keys added since a save are not compared
            diffs = config_differences(recorded, self.model_config,
                                       sorted(k for k in self.model_config if k in recorded))
            if diffs:
                raise UsageError(f"{path} holds another model: " + "; ".join(diffs))
        load_weights(model, path)
        if not weights_are_finite(model):
            raise ValueError("its weights are not finite")
        if "epochs_done" not in saved and os.path.exists(self.state_path):
            saved = {**read_state(self.state_path), **saved}  # written by an older version
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
        if header is not None and len(lines) + 1 < len(rows):
            write_text(self.csv_path, csv_text([header] + lines), kept="log.csv is as it was")
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
        return not distribute.in_cluster(self.model.distribute_strategy if self.model else None)

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
        value = logs.get("loss")
        row = json.dumps({k: float(v) for k, v in logs.items() if np.ndim(v) == 0})
        if value is not None and np.isfinite(value) and (
                self.best_value is None or value < self.best_value):
            self.best_value = float(value)
            atomic_save_weights(self.model, self.best, **self._attrs(), log_row=row)
        atomic_save_weights(self.model, self.latest, previous=self.previous, **self._attrs(),
                            log_row=row)
        saved = f"epoch {epoch + 1} is saved in {self.latest}"
        # a line lost here comes back from the weights file on resume
        self._append_csv(epoch + 1, logs, kept=f"{saved} (with its line of log.csv)")
        write_json(self.state_path, self.state, kept=saved)  # for people and tools
        if self.interrupt is not None:  # Ctrl-C during the epoch's last step or its save
            self.model.stop_training = True

    def save_and_stop(self):
        """Save where the run is, in the middle of an epoch, and stop it (Ctrl-C, SIGTERM)."""
        signum, self.interrupt = self.interrupt, None
        self._refuse_non_finite("the interruption")
        atomic_save_weights(self.model, self.latest, previous=self.previous,
                            **self._attrs(), **metric_states(self.model))
        write_json(self.state_path, self.state, kept=f"the run is saved in {self.latest}")
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
        """One line on stderr and, with the time, in events.log (appended, never cut back). A
        line that cannot be written (a full disk) stops the run (CannotWrite); with `echo`
        False the caller raises with `message` next, and that error is the one to see."""
        if echo:
            print(message, file=sys.stderr, flush=True)
        try:
            append_text(self.events_path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n",
                        kept="the saves are intact")
        except CannotWrite:
            if echo:
                raise

    def _append_csv(self, epoch, logs, kept=None):
        """log.csv's line of `epoch`. The columns are the first epoch's; numbers that a later
        epoch adds (a monitor a resumed run gained) become new columns, empty before."""
        numbers = sorted(k for k in logs if np.ndim(logs[k]) == 0)
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        before = []
        if not new:
            with open(self.csv_path, newline="") as f:
                before = list(csv.reader(f))
        keys = numbers if new else before[0][1:]
        added = [k for k in numbers if k not in keys]
        line = [epoch] + [f"{float(logs[k]):.6g}" if k in logs else "" for k in keys + added]
        if added and not new:  # the whole file again, with the wider header, or nothing
            widened = [before[0] + added] + [row + [""] * len(added) for row in before[1:]]
            write_text(self.csv_path, csv_text(widened + [line]), kept)
            return
        rows = [["epoch"] + keys] if new else []
        append_text(self.csv_path, csv_text(rows + [line]), kept)  # the whole line or nothing


def csv_text(rows):
    """Rows as the csv module writes them (lines end in \\r\\n)."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()

