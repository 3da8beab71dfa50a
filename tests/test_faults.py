"""Issue 6: training survives interruption, damaged checkpoints, non-finite steps, bad data
and bad flags. Every test injects its fault: a real SIGKILL or SIGINT to a real training
process, bytes cut from a checkpoint, NaN batches from the input pipeline (TEST_NAN_AT_STEPS),
unreadable image files, wrong flags."""

import csv
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zlib

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
import keras
from PIL import Image

from conftest import ROOT
import common
import pictures
import datasets
import fault_hooks
import training.checkpoint
import training.guards
import training.run
import f_vaes
import face_runs
import infomax
from test_common import write_messy_folder
from test_f_vaes import TINY_FLAGS
from test_infomax import make_cifar_fixture, write_cifar_batch

RNG = np.random.RandomState(0)


# --------------------------------------------------------------------------- helpers

def write_faces(folder, n=12, size=16):
    """A folder of small smooth pictures (blocky noise), as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    for i in range(n):
        picture = rng.uniform(0, 255, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
        iio.imwrite(folder / f"{i:02d}.png", picture.astype("uint8"))
    return folder


def fvae_argv(data, run, epochs, *extra):
    return TINY_FLAGS + ["--data-dir", str(data), "--out", str(run), "--epochs", str(epochs),
                         "--holdout", "0", "--seed", "5", *extra]


def infomax_argv(data, run, epochs, *extra):
    return ["--dataset", "folder", "--data-dir", str(data), "--out", str(run), "--img-size", "8",
            "--z-dim", "8", "--batch-size", "4", "--steps-per-epoch", "3", "--epochs", str(epochs),
            "--monitor-knn", "0", "--no-baseline", "--seed", "5", *extra]


def main_exit_code(module, argv):
    """Run a script's main() in this process; its exit status (0 when it returns)."""
    try:
        return module.main(argv) or 0
    except SystemExit as e:
        return e.code


def csv_rows(run):
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return list(csv.reader(f))


def h5_arrays(path):
    """Every dataset of an HDF5 file by its path (weights and optimiser state)."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays


def all_finite_in_file(path):
    return all(np.all(np.isfinite(a)) for a in h5_arrays(path).values()
               if np.issubdtype(np.asarray(a).dtype, np.floating))


def folder_digest(folder):
    """name -> sha1 of every file below `folder` (to show nothing was overwritten)."""
    digest = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            digest[os.path.relpath(path, folder)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return digest


class Training:
    """A training command in a child process whose stderr is collected line by line."""

    def __init__(self, script, argv, tmp_path, env=None):
        self.lines = []
        self.stdout = tmp_path / f"{script}.stdout"
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "fault_hooks.py"), script, *argv], cwd=ROOT,
            text=True,
            stdout=open(self.stdout, "w"), stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, condition, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError("training ended early:\n" + "".join(self.lines[-20:]))
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s:\n" + "".join(self.lines[-20:]))

    def saw(self, text):
        return any(text in line for line in self.lines)

    def printed(self, text):
        return text in self.stdout.read_text()

    def finish(self, timeout=60):
        try:
            code = self.process.wait(timeout)
        finally:
            self.kill()
        self.reader.join(5)
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def op_determinism():
    """TensorFlow op determinism for one test (the scripts' --deterministic turns it on)."""
    from tensorflow.python.framework import config
    tf.config.experimental.enable_op_determinism()
    yield
    config.disable_op_determinism()


def interrupt_at_step(monkeypatch, step, signum=signal.SIGINT):
    """Send a real signal to this process at the end of the run's global training step `step`,
    as a user's Ctrl-C would arrive: the scripts' handler sees it at that step's end."""
    original = training.checkpoint.RunCheckpoint.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch_images + (batch + 1) * self.batch_size == step * self.batch_size:
            os.kill(os.getpid(), signum)
        original(self, batch, logs)

    monkeypatch.setattr(training.checkpoint.RunCheckpoint, "on_train_batch_end", on_train_batch_end)


# --------------------------------------------------------------------------- non-finite steps

class TinyRegression(keras.Model):
    """y = Dense(1)(BatchNorm(x)) trained with the guarded step, for checks that need no image."""

    def __init__(self):
        super().__init__()
        self.norm = keras.layers.BatchNormalization()
        self.dense = keras.layers.Dense(1)
        self.tracker = training.guards.AppliedMean(name="loss")
        self.skipped = training.guards.SkippedSteps()

    @property
    def metrics(self):
        return [self.tracker, self.skipped]

    def call(self, x, training=False):
        return self.dense(self.norm(x, training=training))

    def train_step(self, data):
        x, y = data
        statistics = training.guards.snapshot(self.non_trainable_variables)
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        applied = training.guards.apply_if_finite(self.optimizer, loss, grads, self.trainable_variables,
                                         restore=statistics)
        self.tracker.update_state(loss, applied)
        self.skipped.update_state(applied)
        return {m.name: m.result() for m in self.metrics}


def tiny_regression(lr=0.01, inputs=3):
    keras.utils.set_random_seed(0)
    model = TinyRegression()
    model.compile(keras.optimizers.Adam(lr))
    model(np.zeros((1, inputs), "float32"))
    model.optimizer.build(model.trainable_variables)
    return model


def regression_stream(start=0):
    """Batches (x, y) of a fixed regression problem, through the common stream (and its NaN hook)."""
    x = RNG.randn(64, 3).astype("float32")
    data = tf.constant(np.concatenate([x, x.sum(1, keepdims=True)], 1))
    batches = datasets.stream_order(64, 0, start).batch(8).map(lambda i: tf.gather(data, i))
    return datasets.finish_stream(batches, first_step=start // 8).map(lambda b: (b[:, :3], b[:, 3:]))


def variables_of(model):
    """Every weight, batch-norm statistic and optimiser variable (step count included); not
    the noise generators' states, which move on at every step, applied or not."""
    return [v.numpy().copy() for v in model.weights + model.optimizer.variables
            if "seed_generator" not in v.path]


@pytest.mark.parametrize("which", ["fvae", "infomax-xla"])
@pytest.mark.slow
def test_a_non_finite_step_changes_nothing(which, tmp_path, monkeypatch):
    """The batch of step 2 is NaN (injected in the input pipeline): its update is not applied -
    weights, Adam moments, the optimiser's step count and batch-norm statistics stay as they
    were - it is counted in skipped_steps, and the step after it trains normally."""
    monkeypatch.setenv(fault_hooks.NAN_STEPS_ENV, "2")
    if which == "fvae":
        model = f_vaes.build_model(f_vaes.Config(seed=0, img_size=16, level=2, depth=1,
                                                 res_steps=1, coupling_width=8))
        files = [str(p) for p in sorted(write_faces(tmp_path / "faces").glob("*.png"))]
        stream = datasets.image_stream(files, 16, 4, face_runs.scale_pixels, seed=0)
    else:  # infomax with its step compiled by XLA (the default only with a GPU)
        model = infomax.build_model(infomax.parse_args(["--dataset", "folder", "--img-size", "8",
                                                        "--z-dim", "8", "--jit"]).config)
        assert model.jit_compile
        stream = infomax.training_stream(RNG.randint(0, 256, (16, 8, 8, 3)).astype("uint8"), 4,
                                         (-1.0, 1.0), seed=0)
    after_epoch = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_epoch.append(variables_of(model)))
    logs = model.fit(stream, steps_per_epoch=1, epochs=3, callbacks=[record], verbose=0).history
    for a, b in zip(after_epoch[0], after_epoch[1]):  # step 2 changed nothing
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(after_epoch[1], after_epoch[2]))
    assert logs["skipped_steps"] == [0.0, 1.0, 0.0]
    assert np.isnan(logs["loss"][1]) and np.isfinite(logs["loss"][2])  # epoch 2 applied nothing
    assert int(model.optimizer.iterations.numpy()) == 2 and training.checkpoint.weights_are_finite(model)


@pytest.mark.slow
def test_repeated_non_finite_steps_roll_back_lower_the_rate_and_never_reach_a_save(tmp_path,
                                                                                  monkeypatch, capsys):
    """Steps 4-6 (all of epoch 2) are NaN, --nan-patience 2: after two the run reloads
    best.weights.h5 and divides the learning rate by 10, logged on stderr, in events.log and
    in the CSV, and goes on; no saved file holds a NaN."""
    data, run = write_faces(tmp_path / "faces"), tmp_path / "run"
    monkeypatch.setenv(fault_hooks.NAN_STEPS_ENV, "4,5,6")
    assert main_exit_code(f_vaes, fvae_argv(data, run, 3, "--nan-patience", "2")) == 0
    err = capsys.readouterr().err
    assert "2 non-finite steps in a row (epoch 2, step 2): rolled back to" in err
    assert "best.weights.h5, learning rate 0.0001 -> 1e-05" in err
    assert "rolled back to" in (run / "events.log").read_text()
    rows = csv_rows(run)
    column = {name: [r[i] for r in rows[1:]] for i, name in enumerate(rows[0])}
    assert column["epoch"] == ["1", "2", "3"] and column["skipped_steps"] == ["0", "3", "0"]
    assert column["learning_rate"] == ["0.0001", "1e-05", "1e-05"]
    assert column["loss"][1] == "nan" and column["loss"][2] != "nan"  # epoch 2: nothing applied
    for name in ("latest", "previous", "best"):
        assert all_finite_in_file(run / f"{name}.weights.h5"), name


def test_a_lowered_learning_rate_survives_a_resume_unless_lr_changes(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv(fault_hooks.NAN_STEPS_ENV, "9,10")
    model = tiny_regression(lr=0.01)
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8)
    training.run.fit_resumable(model, regression_stream, checkpoint, 3, 8,
                         [checkpoint, training.guards.NonFiniteRollback(checkpoint, patience=2)], verbose=0)
    assert "learning rate 0.01 -> 0.001" in capsys.readouterr().err

    resumed = tiny_regression(lr=0.01)
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8)
    checkpoint.restore(resumed)
    training.run.resume_learning_rate(resumed, checkpoint, asked=0.01, asked_before=0.01)
    assert float(resumed.optimizer.learning_rate.numpy()) == pytest.approx(0.001)
    assert "keeping the saved learning rate 0.001" in capsys.readouterr().err

    changed = tiny_regression(lr=0.05)
    checkpoint.restore(changed)
    training.run.resume_learning_rate(changed, checkpoint, asked=0.05, asked_before=0.01)
    assert float(changed.optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    assert "--lr changed from 0.01" in capsys.readouterr().err


def test_rollbacks_that_do_not_help_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(fault_hooks.NAN_STEPS_ENV, ",".join(str(s) for s in range(9, 60)))
    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8)
    rollback = training.guards.NonFiniteRollback(checkpoint, patience=2, max_rollbacks=2)
    with pytest.raises(common.TrainingStopped, match="again after 2 rollbacks"):
        training.run.fit_resumable(model, regression_stream, checkpoint, 10, 8,
                             [checkpoint, rollback], verbose=0)
    events = (tmp_path / "events.log").read_text()
    assert events.count("rolled back to") == 2 and "stopping" in events
    assert abs(float(model.optimizer.learning_rate.numpy()) - 1e-4) < 1e-9  # 0.01 / 10 / 10
    assert training.checkpoint.weights_attrs(checkpoint.latest)["epochs_done"] == 1  # epoch 2 never finished


def test_non_finite_weights_are_never_saved(tmp_path):
    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8)
    model.fit(regression_stream(), steps_per_epoch=2, epochs=1, callbacks=[checkpoint], verbose=0)
    saved = open(checkpoint.latest, "rb").read()
    model.dense.kernel.assign(np.full((3, 1), np.nan, "float32"))
    with pytest.raises(common.TrainingStopped, match="not finite at the end of epoch 2: not saved"):
        checkpoint.on_epoch_end(1, {"loss": 0.5})
    assert open(checkpoint.latest, "rb").read() == saved
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@pytest.mark.slow
def test_skip_decision_is_the_same_on_every_replica(tmp_path):
    """MirroredStrategy on two CPU replicas, a NaN in the half of one batch that replica 0
    gets: neither replica applies that step (apply_if_finite all-reduces the decision and
    conds in cross-replica context around optimizer.apply's merge_call), the skipped step
    counts once, and the replicas' copies of the weights stay equal."""
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, {ROOT!r})
        import common, infomax
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = infomax.build_model(infomax.parse_args(
                ["--dataset", "folder", "--img-size", "8", "--z-dim", "8", "--no-jit"]).config)
        images = np.random.RandomState(0).uniform(-1, 1, (3, 8, 8, 8, 3)).astype("float32")
        images[1, :4] = np.nan  # step 2: replica 0's half of the batch only
        model.fit(tf.data.Dataset.from_tensor_slices(images), epochs=1, steps_per_epoch=1, verbose=0)
        before = [v.numpy() for v in model.weights + model.optimizer.variables]
        logs = model.fit(tf.data.Dataset.from_tensor_slices(images[1:]), epochs=1,
                         steps_per_epoch=1, verbose=0).history
        unchanged = all(np.array_equal(a, v.numpy()) for a, v in
                        zip(before, model.weights + model.optimizer.variables))
        # (Keras keeps a batch-norm moving average per replica, so those may differ anyway)
        replicas_equal = all(np.array_equal(*[t.numpy() for t in v.value.values])
                             for v in model.trainable_weights)
        print("RESULT", strategy.num_replicas_in_sync, unchanged, replicas_equal,
              logs["skipped_steps"][0], int(model.optimizer.iterations.numpy()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=240, cwd=ROOT)
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, result.stderr[-3000:]
    assert line[0].split()[1:] == ["2", "True", "True", "1.0", "1"]


# --------------------------------------------------------------------------- damaged checkpoints

def two_epochs(run, model_config={"img_size": 64}):
    """A run of the tiny regression with two finished epochs (latest = 2, previous = 1)."""
    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(run), batch_size=8, steps_per_epoch=2,
                                      model_config=model_config)
    training.run.fit_resumable(model, regression_stream, checkpoint, 2, 2, [checkpoint], verbose=0)
    return model


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "garbage"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_and_says_so(damage, tmp_path,
                                                                          capsys):
    two_epochs(tmp_path)
    latest = tmp_path / "latest.weights.h5"
    content = latest.read_bytes()
    latest.write_bytes({"zero bytes": b"", "truncated": content[: len(content) // 2],
                        "garbage": b"x" * len(content)}[damage])

    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8, model_config={"img_size": 64})
    assert checkpoint.restore(model) == 1
    err = capsys.readouterr().err
    assert "latest.weights.h5 is damaged (OSError" in err
    assert "set aside as latest.weights.h5.damaged; falling back to" in err
    assert "previous.weights.h5" in err and "resuming" in err
    assert (tmp_path / "latest.weights.h5.damaged").exists() and not latest.exists()
    assert [r[0] for r in csv_rows(tmp_path)] == ["epoch", "1"]  # the CSV follows the weights
    reference = tiny_regression()
    reference.load_weights(tmp_path / "previous.weights.h5")
    for a, b in zip(variables_of(reference), variables_of(model)):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_model_names_the_file_and_the_difference(tmp_path):
    two_epochs(tmp_path)
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8, model_config={"img_size": 128})
    with pytest.raises(common.UsageError, match=r"latest.weights.h5 holds another model: "
                                                r"saved with --img-size 64, asked for 128"):
        checkpoint.restore(tiny_regression())


def test_weights_of_an_unrecorded_other_model_are_an_error_naming_each_file(tmp_path):
    two_epochs(tmp_path, model_config=None)
    model = tiny_regression(inputs=5)  # the files record no configuration: only loading tells
    with pytest.raises(common.UsageError, match=r"no checkpoint can be read \(.*latest.weights.h5: "
                                                r".*previous.weights.h5: .*best.weights.h5: "):
        training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8).restore(model)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".h5")) == [
        "best.weights.h5", "latest.weights.h5", "previous.weights.h5"]  # nothing set aside


@pytest.mark.slow
def test_weights_that_do_not_fit_the_model_name_the_file(fvae_reference, tmp_path, capsys):
    """config.json deleted, then --depth changed: the weights files know their model, and the
    command stops before writing anything (config.json is not recreated)."""
    data, reference = fvae_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    os.remove(run / "config.json")
    before = folder_digest(run)
    argv = fvae_argv(data, run, 4)
    argv[argv.index("--depth") + 1] = "2"
    assert main_exit_code(f_vaes, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "latest.weights.h5 holds another model: saved with --depth 1, asked for 2" in err[0]
    assert folder_digest(run) == before


@pytest.mark.parametrize("damage", ["line lost", "half a line", "lines of later epochs"])
def test_the_csv_is_one_whole_line_per_saved_epoch_after_a_kill(damage, tmp_path):
    """Killed between the weights and the CSV line (lost), while writing it (half), or after
    epochs whose saves never finished: on resume the CSV has exactly epochs 1..2 again."""
    two_epochs(tmp_path)
    expected = csv_rows(tmp_path)
    text = (tmp_path / "log.csv").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    (tmp_path / "log.csv").write_text({
        "line lost": text[: -len(last) - 1],
        "half a line": text[: -len(last) // 2 - 1],
        "lines of later epochs": text + "3,0.5,0.1,0.2\n2,0.4,0.1,0.2\n"}[damage])
    training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8).restore(tiny_regression())
    assert csv_rows(tmp_path) == expected


def test_a_save_that_cannot_be_written_stops_the_run_and_keeps_the_last_one(tmp_path, monkeypatch):
    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8)
    model.fit(regression_stream(), steps_per_epoch=2, epochs=1, callbacks=[checkpoint], verbose=0)
    saved = open(checkpoint.latest, "rb").read()

    def full_disk(path, overwrite=True):
        open(path, "wb").write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(common.TrainingStopped, match="No space left on device.*previous save is intact"):
        checkpoint.on_epoch_end(1, {"loss": 9.0})
    assert open(checkpoint.latest, "rb").read() == saved
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def replace(old, new):
    return lambda text: text.replace(old, new)


RUN_FILE_DAMAGE = {  # (file, damage, what the error says)
    "config.json cut short": ("config.json", lambda text: text[:len(text) // 2],
                              "config.json: not valid JSON"),
    "config.json a list": ("config.json", lambda text: "[1, 2]",
                           "config.json: holds [1, 2], not a JSON object"),
    "config.json without depth": ("config.json", replace('"depth": 1,', ""),
                                  "config.json: key 'depth' is missing"),
    "config.json img_size a string": ("config.json", replace('"img_size": 16', '"img_size": "16"'),
                                      "config.json: key 'img_size' is \"16\", expected an integer"),
    "config.json lr a word": ("config.json", replace('"lr": 0.0001', '"lr": "fast"'),
                              "config.json: key 'lr' is \"fast\", expected a number"),
    "state.json cut short": ("state.json", lambda text: text[:len(text) // 2],
                             "state.json: not valid JSON"),
    "state.json epochs_done a string": ("state.json", replace('"epochs_done": 3', '"epochs_done": "3"'),
                                      "state.json: key 'epochs_done' is \"3\", expected an integer"),
}


@pytest.mark.parametrize("damage", RUN_FILE_DAMAGE)
def test_a_damaged_or_hand_edited_run_file_is_a_one_line_error_and_stays_as_it_is(
        damage, fvae_reference, tmp_path, capsys):
    """config.json or state.json of a finished run cut short, replaced or edited by hand: the
    same command (and `sample`, which reads config.json) exits 2 with one line naming the file
    and the key, and nothing in the folder changes (the file is not overwritten)."""
    data, reference = fvae_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    name, edit, message = RUN_FILE_DAMAGE[damage]
    text = (run / name).read_text()
    assert edit(text) != text
    (run / name).write_text(edit(text))
    before = folder_digest(run)
    commands = [fvae_argv(data, run, 4)]
    if name == "config.json":
        commands.append(["sample", "--out", str(run), "--rows", "1", "--cols", "1"])
    for argv in commands:
        assert main_exit_code(f_vaes, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run / name}: "), err
        assert message in err[0] and "damaged or edited by hand?" in err[0]
    assert folder_digest(run) == before


def test_a_run_config_without_its_model_keys_is_a_one_line_error_for_infomax_too(existing_runs,
                                                                                 capsys):
    run = existing_runs / "infomax"  # config.json is {}
    for argv in (["evaluate", "--out", str(run)],
                 ["search", "--out", str(run), "--folder", str(run), "--query", "x.png"]):
        (run / "encoder.weights.h5").write_bytes(b"weights")
        assert main_exit_code(infomax, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {run / 'config.json'}: key 'dataset' is missing; damaged or "
                       "edited by hand? repair it, or move the run folder away"]
        os.remove(run / "encoder.weights.h5")


def full_disk_at(monkeypatch, name, model):
    """Writes of the run file `name` fail as on a full disk (ENOSPC) after half of their bytes:
    weights files through `model.save_weights`, the others through common's file helpers."""
    def no_space():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if name.endswith(".weights.h5"):
        save_weights = model.save_weights

        def half_then_full(path, overwrite=True):
            save_weights(path, overwrite=overwrite)
            if os.path.basename(path).split(".")[0] == name.split(".")[0]:
                data = open(path, "rb").read()
                open(path, "wb").write(data[:len(data) // 2])
                raise no_space()

        monkeypatch.setattr(model, "save_weights", half_then_full)
        return

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise no_space()

        def __getattr__(self, attribute):
            return getattr(self.f, attribute)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opened(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        writing = any(m in mode for m in "wa+")
        return HalfWritten(f) if writing and os.path.basename(path).startswith(name) else f

    monkeypatch.setattr(common, "open", opened, raising=False)


@pytest.mark.parametrize("target", ["best.weights.h5", "latest.weights.h5", "log.csv",
                                    "state.json", "events.log"])
@pytest.mark.slow
def test_a_full_disk_at_any_write_keeps_the_last_save_and_the_csv_and_the_run_resumes(
        target, tmp_path, monkeypatch):
    """Each file an epoch's end writes (the weights files, the CSV line, state.json; events.log
    when a run resumes) fails half-way as on a full disk. The run stops with one line naming
    the file, about how much space it needs and how much is free; the last save and log.csv
    stay whole and loadable, no temporary file is left; the same command then resumes from
    the last good save and finishes, one CSV line per epoch."""
    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8, steps_per_epoch=2)
    training.run.fit_resumable(model, regression_stream, checkpoint, 1, 2, [checkpoint], verbose=0)
    csv_before = (tmp_path / "log.csv").read_bytes()
    with monkeypatch.context() as patch, pytest.raises(common.CannotWrite) as stopped:
        if target == "events.log":  # the first write of a resumed run
            model = tiny_regression()
            full_disk_at(patch, target, model)
            training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8).restore(model)
        else:
            full_disk_at(patch, target, model)
            checkpoint.best_value = float("inf")  # epoch 2 is a new best: best.weights.h5 first
            training.run.fit_resumable(model, regression_stream, checkpoint, 2, 2, [checkpoint],
                                       verbose=0)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {tmp_path / target} (No space left on device): it "
                              "needs about ")
    assert " free there; " in message
    assert message.endswith(": free some space and run the same command again")
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]

    saved = 2 if target in ("log.csv", "state.json") else 1  # the weights came first
    assert training.checkpoint.weights_attrs(tmp_path / "latest.weights.h5")["epochs_done"] == saved
    tiny_regression().load_weights(tmp_path / "latest.weights.h5")
    rows = csv_rows(tmp_path)
    assert all(len(row) == len(rows[0]) for row in rows)
    if target == "state.json":
        assert [r[0] for r in rows] == ["epoch", "1", "2"]
    else:  # a CSV line is written whole or not at all
        assert (tmp_path / "log.csv").read_bytes() == csv_before

    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8, steps_per_epoch=2)
    assert checkpoint.restore(model) == saved
    training.run.fit_resumable(model, regression_stream, checkpoint, 3, 2, [checkpoint], verbose=0)
    assert [r[0] for r in csv_rows(tmp_path)] == ["epoch", "1", "2", "3"]
    assert training.checkpoint.read_state(str(tmp_path / "state.json"))["epochs_done"] == 3


def test_a_sample_grid_that_cannot_be_written_leaves_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / "grid.png")
    pictures.save_grid(path, np.zeros((4, 8, 8, 3)))
    before = open(path, "rb").read()

    def half_then_full(file, image, **kwargs):
        open(file, "wb").write(b"half a PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pictures.iio, "imwrite", half_then_full)
    with pytest.raises(common.CannotWrite, match=r"cannot write .*grid.png \(No space left on "
                                                 r"device\): it needs about 768 bytes, "):
        pictures.save_grid(path, np.ones((4, 8, 8, 3)), kept="epoch 3 is saved")
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["grid.png"]


def mount_a_small_tmpfs_works(tmp_path):
    """Whether this machine lets an unprivileged process mount a tmpfs in its own user and
    mount namespaces (`unshare -Urm`), where a real full filesystem can be made."""
    if not shutil.which("unshare"):
        return False
    (tmp_path / "probe").mkdir()
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"',
                            str(tmp_path / "probe")], capture_output=True, timeout=30)
    return probe.returncode == 0


FILL_LEAVING = textwrap.dedent("""
    import os, sys
    path, leave = sys.argv[1], int(sys.argv[2])
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        except OSError:
            pass
    os.truncate(path, max(os.path.getsize(path) - leave, 0))
""")


@pytest.mark.slow
def test_a_save_into_a_full_filesystem_stops_with_one_line_and_the_same_command_resumes(
        fvae_reference, tmp_path, capsys):
    """A real full disk: the finished 3-epoch run is copied onto a small tmpfs (mounted in a
    user and mount namespace of its own), which is then filled but for half a weights file.
    The same command for a 4th epoch, a real process there, cannot write epoch 4's save: it
    exits 1 (HDF5 does not crash it at exit) with one line naming the file, the space a save
    needs and the space free, and no traceback; the epoch 3 save and log.csv are intact. The
    folder, taken off the full disk, resumes with the same command from epoch 3."""
    if not mount_a_small_tmpfs_works(tmp_path):
        pytest.skip("cannot mount a tmpfs here (unshare -Urm); "
                    "test_a_full_disk_at_any_write_... injects ENOSPC instead")
    data, reference = fvae_reference
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    leave = os.path.getsize(reference / "latest.weights.h5") // 2
    argv = fvae_argv(data, disk / "run", 4)
    script = textwrap.dedent("""
        set -u
        mount -t tmpfs -o size=48m tmpfs "$DISK" && cp -a "$REFERENCE" "$DISK/run" || exit 90
        "$PYTHON" -c "$FILL" "$DISK/filler" "$LEAVE" || exit 91
        "$PYTHON" tests/fault_hooks.py f_vaes.py "$@" > "$OUT/stdout" 2> "$OUT/stderr"
        echo $? > "$OUT/rc"
        df -k "$DISK" > "$OUT/df"
        cp -a "$DISK/run" "$OUT/run"
    """)
    subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", *argv], cwd=ROOT, timeout=300,
                   check=True, env={**os.environ, "DISK": str(disk), "REFERENCE": str(reference),
                                    "PYTHON": sys.executable, "FILL": FILL_LEAVING,
                                    "LEAVE": str(leave), "OUT": str(out)})
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "1", stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write {re.escape(str(disk / 'run'))}/(best|latest)"
                        r"\.weights\.h5 \(No space left on device\): it needs about ([\d.]+) MB, "
                        r"[\d.]+ MB free there; the previous save is intact: free some space and "
                        r"run the same command again", last), last
    needs = float(re.search(r"needs about ([\d.]+) MB", last).group(1))  # a save's size
    assert abs(needs - os.path.getsize(reference / "latest.weights.h5") / 1e6) < 0.5, last
    run = out / "run"
    assert training.checkpoint.weights_attrs(run / "latest.weights.h5")["epochs_done"] == 3
    assert csv_rows(run) == csv_rows(reference)
    assert not [n for n in os.listdir(run) if ".tmp" in n or n == "trainer.lock"]

    capsys.readouterr()
    assert main_exit_code(f_vaes, fvae_argv(data, run, 4)) == 0
    assert "resuming" in capsys.readouterr().err
    assert [r[0] for r in csv_rows(run)] == ["epoch", "1", "2", "3", "4"]


# --------------------------------------------------------------------------- interruption

@pytest.fixture(scope="module")
def fvae_reference(tmp_path_factory):
    """An uninterrupted tiny f-VAE run of 3 epochs with --deterministic: the weights, optimiser
    state and CSV that an interrupted run must end with (and a run folder that bad commands
    must leave alone)."""
    from tensorflow.python.framework import config
    base = tmp_path_factory.mktemp("reference")
    data = write_faces(base / "faces")
    try:
        assert main_exit_code(f_vaes, fvae_argv(data, base / "run", 3, "--deterministic")) == 0
    finally:
        config.disable_op_determinism()
    return data, base / "run"


@pytest.mark.slow
def test_killed_and_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
        fvae_reference, tmp_path, op_determinism):
    """The real command line, three times with the same command: SIGKILL while it writes epoch
    2's checkpoint (a test hook pauses between the temporary file and the rename); Ctrl-C
    (SIGINT) once the resumed run trains; then to the end. Each start resumes from the last
    completed save, and the run ends with the weights, optimiser state and CSV of an
    uninterrupted run, bit for bit (TensorFlow op determinism, same seed)."""
    data, reference = fvae_reference
    run = tmp_path / "run"
    argv = fvae_argv(data, run, 3, "--deterministic")

    killed = Training("f_vaes.py", argv, tmp_path, env={fault_hooks.PAUSE_ENV: "2:60"})
    try:
        killed.wait_for(lambda: killed.saw("pausing before renaming"))
        assert [n for n in os.listdir(run) if n.endswith(".tmp.weights.h5")]
        killed.process.send_signal(signal.SIGKILL)
        assert killed.finish() == -signal.SIGKILL
    finally:
        killed.kill()
    assert training.checkpoint.weights_attrs(run / "latest.weights.h5")["epochs_done"] == 1
    assert [r[0] for r in csv_rows(run)] == ["epoch", "1"]

    interrupted = Training("f_vaes.py", argv, tmp_path)
    try:
        interrupted.wait_for(lambda: interrupted.printed("Epoch 2/3"))  # compiling its first step
        interrupted.process.send_signal(signal.SIGINT)
        assert interrupted.finish() == 128 + signal.SIGINT
    finally:
        interrupted.kill()
    assert interrupted.saw("left by an interrupted save") and interrupted.saw("resuming")
    assert interrupted.saw("SIGINT: saving after this step")
    assert interrupted.saw("stopped: SIGINT: saved")
    attrs = training.checkpoint.weights_attrs(run / "latest.weights.h5")
    epochs, steps = attrs["epochs_done"], attrs["steps_done"]  # epoch 2, step 1 unless slow
    assert attrs["images_seen"] == (3 * epochs + steps) * 4 and len(csv_rows(run)) == 1 + epochs
    assert "SIGINT: saved" in (run / "events.log").read_text()

    assert main_exit_code(f_vaes, argv) == 0
    assert csv_rows(run) == csv_rows(reference)  # epochs 1, 2, 3 once each, the same numbers
    assert not [n for n in os.listdir(run) if ".tmp" in n]
    expected, got = h5_arrays(reference / "latest.weights.h5"), h5_arrays(run / "latest.weights.h5")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)


@pytest.mark.slow
def test_infomax_stopped_by_ctrl_c_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch,
                                                                         op_determinism):
    """Deep InfoMax (its noise and both negative permutations come from a seed generator): 3
    epochs in one go, against a run that Ctrl-C stops after step 5 (epoch 2 of 3 steps) and
    the same command again. Weights, optimiser state and CSV are equal, bit for bit."""
    data = write_faces(tmp_path / "faces", n=16)
    one_go, interrupted = tmp_path / "one_go", tmp_path / "interrupted"
    assert main_exit_code(infomax, infomax_argv(data, one_go, 3, "--deterministic")) == 0
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 5)
        assert main_exit_code(infomax, infomax_argv(data, interrupted, 3, "--deterministic")) == 130
    attrs = training.checkpoint.weights_attrs(interrupted / "latest.weights.h5")
    assert (attrs["epochs_done"], attrs["steps_done"]) == (1, 2)
    assert main_exit_code(infomax, infomax_argv(data, interrupted, 3, "--deterministic")) == 0

    expected, got = h5_arrays(one_go / "latest.weights.h5"), h5_arrays(interrupted / "latest.weights.h5")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)
    assert csv_rows(one_go) == csv_rows(interrupted)


@pytest.mark.slow
def test_sigkills_at_random_moments_lose_nothing_and_change_nothing(fvae_reference, tmp_path,
                                                                    op_determinism):
    """The same command killed with SIGKILL at random moments of its training (steps, saves,
    sample grids), five times, then run to the end: one CSV line per epoch, no temporary
    file, and the weights and CSV of the uninterrupted run."""
    data, reference = fvae_reference
    run = tmp_path / "run"
    argv = fvae_argv(data, run, 3, "--deterministic")
    rng = np.random.RandomState(0)
    for attempt in range(5):
        child = Training("f_vaes.py", argv, tmp_path)
        try:
            child.wait_for(lambda: child.printed("Epoch ") or child.saw("already trained"),
                              timeout=180)
            time.sleep(rng.uniform(0.0, 4.0))
            child.process.send_signal(signal.SIGKILL)
            child.finish()
        finally:
            child.kill()
        if os.path.exists(run / "latest.weights.h5"):
            done = training.checkpoint.weights_attrs(run / "latest.weights.h5")["epochs_done"]
            assert [r[0] for r in csv_rows(run)][1:done + 1] == [str(e) for e in range(1, done + 1)]
    assert main_exit_code(f_vaes, argv) == 0
    assert csv_rows(run) == csv_rows(reference)
    assert not [n for n in os.listdir(run) if ".tmp" in n]
    expected, got = h5_arrays(reference / "latest.weights.h5"), h5_arrays(run / "latest.weights.h5")
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)


# --------------------------------------------------------------------------- two trainers

@pytest.mark.slow
def test_a_second_trainer_on_the_same_folder_stops_at_once_and_a_killed_ones_lock_blocks_nothing(
        tmp_path, capsys):
    """Two real processes with the same command: while the first trains (paused in epoch 2's
    save), the second exits 2 with one line naming the first (its pid and command) and changes
    nothing in the folder; a command that only reads the run (sample) works meanwhile. The
    first is then killed (SIGKILL: its lock file stays behind), and the same command resumes
    from epoch 1 and finishes, and removes the lock file."""
    data = write_faces(tmp_path / "faces")
    run = tmp_path / "run"
    argv = fvae_argv(data, run, 2)
    first = Training("f_vaes.py", argv, tmp_path, env={fault_hooks.PAUSE_ENV: "2:90"})
    try:
        first.wait_for(lambda: first.saw("pausing before renaming"))
        lock = run / training.run.RunFolderLock.NAME
        assert f"pid {first.process.pid} on " in lock.read_text()
        before = folder_digest(run)
        second = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tests", "fault_hooks.py"), "f_vaes.py", *argv],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0] == second.stderr.strip().splitlines()[-1]
        assert errors[0].startswith(f"error: --out {str(run)!r}: another training command is "
                                    f"running on this run folder (pid {first.process.pid} on ")
        assert "f_vaes.py --img-size 16 " in errors[0]  # the command that holds the folder
        assert folder_digest(run) == before

        sample = ["sample", "--out", str(run), "--rows", "1", "--cols", "2"]
        assert main_exit_code(f_vaes, sample) == 0  # a command that only reads: no lock
        first.process.send_signal(signal.SIGKILL)
        assert first.finish() == -signal.SIGKILL
    finally:
        first.kill()
    assert lock.exists()  # left by the killed process, and no obstacle:
    capsys.readouterr()
    assert main_exit_code(f_vaes, argv) == 0
    assert "resuming" in capsys.readouterr().err
    assert [r[0] for r in csv_rows(run)] == ["epoch", "1", "2"]
    assert not lock.exists()


# --------------------------------------------------------------------------- bad data

@pytest.mark.parametrize("script", ["f_vaes", pytest.param("infomax", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_a_folder_of_every_kind_of_file_trains_through_a_whole_pass(script, tmp_path, capsys):
    """Empty, truncated, text-as-PNG files are skipped with a warning naming each; 16-bit,
    grey, RGBA, CMYK, palette, tiny, large and nested images are used: one epoch covers every
    readable file at least once and the run finishes."""
    good, bad = write_messy_folder_at(tmp_path / "messy")
    run = tmp_path / "run"
    argv = (fvae_argv if script == "f_vaes" else infomax_argv)(tmp_path / "messy", run, 1)
    assert len(good) <= 3 * 4  # f-VAE: one epoch of 3 steps of 4 decodes every good file
    with pytest.warns(UserWarning) as caught:
        assert main_exit_code(f_vaes if script == "f_vaes" else infomax, argv) == 0
    warned = " ".join(str(w.message) for w in caught)
    for path in bad:
        assert path in warned
    assert [r[0] for r in csv_rows(run)] == ["epoch", "1"]


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png(path, width, height, rows_of_zeros=True):
    """A 1-bit greyscale PNG of width x height; with `rows_of_zeros` a valid one (every row a
    filter byte and zeros, streamed through zlib), else a header with one tiny IDAT: a
    decompression bomb's claim without the data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row, deflate = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
    data = (b"".join(deflate.compress(row) for _ in range(height)) if rows_of_zeros
            else deflate.compress(row)) + deflate.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data)
                     + png_chunk(b"IEND", b""))


def write_jpeg_claiming(path, width, height):
    """A real 8 x 8 JPEG whose start of frame claims width x height: TensorFlow decodes it,
    missing data and all, into width x height x 3 bytes (432 MB for 12,000 x 12,000)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, "JPEG")
    data, at = bytearray(buffer.getvalue()), 2
    while data[at + 1] != 0xC0:
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def write_gif(path, frames, width, height):
    """An animated GIF of `frames` full frames, alternately black and white."""
    pictures = [Image.fromarray(np.full((height, width), 255 * (i % 2), np.uint8)).convert("P")
                for i in range(frames)]
    pictures[0].save(path, format="GIF", save_all=True, append_images=pictures[1:],
                     optimize=False, disposal=1)


MEASURE_DECODING = textwrap.dedent("""
    import json, resource, sys, time, warnings
    import image_files
    folder, warm_up = sys.argv[1], sys.argv[2]
    image_files.find_readable_images([warm_up], 16)  # TensorFlow's and tf.data's own memory first
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        readable = image_files.scan_image_folder(folder, img_size=16)
    print(json.dumps({"readable": readable, "warnings": [str(w.message) for w in caught],
                      "seconds": time.time() - started,
                      "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         - before) / 1024}))
""")


@pytest.mark.slow
def test_hostile_images_are_skipped_by_name_or_read_within_bounded_memory_and_time(tmp_path):
    """A decompression bomb (a PNG header claiming 100,000 x 100,000 pixels over a tiny file),
    a real 20,000 x 20,000 PNG, a JPEG whose header claims 12,000 x 12,000 (TensorFlow would
    decode it: 432 MB), and an animation whose 30 frames of 2,000 x 2,000 add up to 120
    megapixels (giflib reads every frame: 120 MB), beside a small animated GIF, a 16-bit PNG,
    a CMYK JPEG and a plain PNG (web downloads named .jpg are often GIFs). In a fresh
    process: the four big ones are skipped by name without being decoded (common.
    MAX_IMAGE_PIXELS = 50 megapixels, read from their headers), the others are read (the
    animation's first frame), and the peak memory of the whole scan grows by less than 64 MB."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "bomb.png", 100_000, 100_000, rows_of_zeros=False)
    write_png(folder / "huge.png", 20_000, 20_000)
    write_jpeg_claiming(folder / "claims_12000.jpg", 12_000, 12_000)
    write_gif(folder / "long_animation.jpg", 30, 2000, 2000)
    write_gif(folder / "animated.jpg", 5, 40, 30)
    tf.io.write_file(str(folder / "deep16.png"),
                     tf.io.encode_png((RNG.rand(24, 32, 3) * 65535).astype("uint16")))
    Image.fromarray((RNG.rand(24, 32, 3) * 255).astype("uint8")).convert("CMYK").save(
        folder / "cmyk.jpg")
    Image.fromarray((RNG.rand(24, 32, 3) * 255).astype("uint8")).save(folder / "plain.png")
    assert (folder / "bomb.png").stat().st_size < 200
    assert (folder / "long_animation.jpg").stat().st_size < 2_000_000

    measured = subprocess.run([sys.executable, "-c", MEASURE_DECODING, str(folder),
                               str(folder / "plain.png")], cwd=ROOT, capture_output=True,
                              text=True, timeout=180)
    assert measured.returncode == 0, measured.stderr[-3000:]
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    assert sorted(os.path.basename(f) for f in result["readable"]) == [
        "animated.jpg", "cmyk.jpg", "deep16.png", "plain.png"]
    warned = "\n".join(result["warnings"])
    for name, says in [("bomb.png", "its header says 100000 x 100000 pixels"),
                       ("huge.png", "its header says 20000 x 20000 pixels"),
                       ("claims_12000.jpg", "its header says 12000 x 12000 pixels"),
                       ("long_animation.jpg", "the frames of its 2000 x 2000 animation add up to")]:
        assert f"skipping image {folder / name}: {says}" in warned
    assert warned.count("more than the 50 megapixels allowed") == 4
    assert ("skipped 4 unreadable image file(s) of 8 (4 of them too large to decode)"
            in measured.stderr)
    assert result["peak_growth_mb"] < 64, result
    assert result["seconds"] < 30, result


def write_messy_folder_at(folder):
    folder.mkdir()
    return write_messy_folder(folder)


@pytest.mark.parametrize("script", ["f_vaes", "infomax"])
def test_a_folder_without_a_usable_image_is_an_error_before_training(script, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.png").write_bytes(b"")
    (tmp_path / "data" / "text.png").write_text("not an image")
    run = tmp_path / "run"
    argv = (fvae_argv if script == "f_vaes" else infomax_argv)(tmp_path / "data", run, 1)
    with pytest.warns(UserWarning):
        assert main_exit_code(f_vaes if script == "f_vaes" else infomax, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --data-dir") and str(tmp_path / "data") in err
    assert not (run / "latest.weights.h5").exists() and not (run / "log.csv").exists()


class WritesMarker:
    """A pickled object that, when unpickled by `pickle.load`, runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


@pytest.mark.parametrize("packed", ["folder", "tarball"])
def test_a_crafted_cifar_batch_runs_no_code_and_is_named(packed, tmp_path, capsys):
    """A data_batch_1 in the official format with one more item whose unpickling runs code (it
    would write a marker file). infomax.py refuses it: exit 2, one line naming the file and
    the refused global, before any model is built; the marker never appears. The same file
    given to plain pickle.load does write the marker: the payload is real."""
    batches, _ = make_cifar_fixture(str(tmp_path / "data"), rows=2)
    marker = tmp_path / "marker"
    crafted = os.path.join(batches, "data_batch_1")
    write_cifar_batch(crafted, np.zeros((2, 32, 32, 3), np.uint8), [0, 1],
                      extra={b"payload": WritesMarker(marker)})
    data_dir = str(tmp_path / "data")
    if packed == "tarball":
        data_dir = str(tmp_path / "cifar-10-python.tar.gz")
        with tarfile.open(data_dir, "w:gz") as tar:
            tar.add(batches, arcname="cifar-10-batches-py")
        crafted = f"{data_dir}:cifar-10-batches-py/data_batch_1"
    argv = ["--dataset", "cifar10", "--data-dir", data_dir, "--out", str(tmp_path / "run"),
            "--batch-size", "2", "--epochs", "1", "--monitor-knn", "0", "--no-baseline"]
    assert main_exit_code(infomax, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{crafted}: not readable as a CIFAR-10 python batch" in err[0]
    assert "refused __builtin__.exec" in err[0]  # as Python 2 named builtins
    assert not marker.exists()
    assert not (tmp_path / "run" / "latest.weights.h5").exists()

    with open(os.path.join(batches, "data_batch_1"), "rb") as f:
        pickle.load(f, encoding="bytes")  # what the loader did before
    assert marker.read_text() == "the payload ran"


def test_the_cifar_reader_refuses_every_global_but_numpy_arrays(tmp_path):
    """Python 3 pickles of the same dict: protocols 3 to 5 (bytes need no global; numpy's
    arrays, `_reconstruct` or at protocol 5 `_frombuffer`) load; protocol 2 stores bytes
    through _codecs.encode, which the official files never name: refused, as os.system is."""
    images, labels = RNG.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8), [3, 4]
    batch = {b"batch_label": b"x", b"labels": labels,
             b"data": images.transpose(0, 3, 1, 2).reshape(2, 3072)}
    for protocol in (3, 4, 5):
        loaded = datasets.read_cifar_batch(io.BytesIO(pickle.dumps(batch, protocol=protocol)))
        np.testing.assert_array_equal(loaded[0], images)
        assert list(loaded[1]) == labels
    with pytest.raises(pickle.UnpicklingError, match="refused _codecs.encode"):
        datasets.read_cifar_batch(io.BytesIO(pickle.dumps(batch, protocol=2)))
    with pytest.raises(pickle.UnpicklingError, match="refused (posix|os).system"):
        datasets.read_cifar_batch(io.BytesIO(pickle.dumps({**batch, b"x": SystemCall()},
                                                          protocol=4)))
    with pytest.raises(ValueError, match="expected uint8"):
        datasets.read_cifar_batch(io.BytesIO(pickle.dumps({**batch, b"data": np.zeros((2, 5))},
                                                          protocol=4)))


class SystemCall:
    def __reduce__(self):
        return os.system, ("true",)


# --------------------------------------------------------------------------- bad flags and places

@pytest.fixture(scope="module")
def existing_runs(fvae_reference):
    """A finished f-VAE run and an infomax run folder, to show that a bad command overwrites
    nothing (the infomax errors come before any file of the run is read)."""
    data, reference = fvae_reference
    base = reference.parent
    (base / "infomax").mkdir(exist_ok=True)
    (base / "infomax" / "config.json").write_text("{}")
    (base / "infomax" / "latest.weights.h5").write_bytes(b"weights")
    (base / "a_file").write_text("not a folder")
    return base


FVAE_BAD = [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be at least 1"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch 0: must be at least 1"),
    (["--img-size", "60"], "--img-size 60: must be a positive multiple of"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--nan-patience", "-1"], "--nan-patience -1: must be 0 or more"),
    (["--data-dir", "{base}/missing"], "--data-dir '{base}/missing': no such folder"),
    (["--out", "{base}/a_file/run"], "--out '{base}/a_file/run': cannot write there"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
]
INFOMAX_BAD = [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "1"], "--batch-size 1: must be at least 2"),
    (["--steps-per-epoch", "-3"], "--steps-per-epoch -3: must be at least 1"),
    (["--img-size", "12"], "--img-size 12: must be a power of two >= 8"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--nan-patience", "-2"], "--nan-patience -2: must be 0 or more"),
    (["--data-dir", "{base}/missing"], "--data-dir '{base}/missing': no such folder"),
    (["--out", "{base}/a_file/run"], "--out '{base}/a_file/run': cannot write there"),
]


@pytest.mark.parametrize("script, flags, message",
                         [("f_vaes", f, m) for f, m in FVAE_BAD]
                         + [("infomax", f, m) for f, m in INFOMAX_BAD])
def test_a_bad_flag_or_place_is_a_one_line_error_and_overwrites_nothing(script, flags, message,
                                                                      existing_runs, capsys):
    base = existing_runs
    module, argv = {"f_vaes": (f_vaes, fvae_argv), "infomax": (infomax, infomax_argv)}[script]
    run = base / ("run" if script == "f_vaes" else "infomax")
    before = folder_digest(base)
    command = argv(base / "faces", run, 2)
    for flag, value in zip(flags[::2], flags[1::2]):
        value = value.format(base=base)
        if flag in command:
            command[command.index(flag) + 1] = value
        else:
            command += [flag, value]
    assert main_exit_code(module, command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(base=base) in err[0]
    assert folder_digest(base) == before


@pytest.mark.parametrize("argv, message", [
    (["sample", "--temperatures", "1.0,-0.5"], "temperatures must be numbers >= 0"),
    (["sweep", "--sweep", "-1"], "temperatures must be numbers >= 0"),
    (["sample", "--rows", "0"], "--rows 0: must be at least 1"),
])
def test_a_negative_temperature_is_a_one_line_error(argv, message, existing_runs, capsys):
    assert main_exit_code(f_vaes, argv + ["--out", str(existing_runs / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
