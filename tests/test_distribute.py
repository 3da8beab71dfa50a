"""Training under tf.distribute (issue 7): one mirrored step on two devices is the step on one
device; two worker processes of a cluster end with the same model, and only the chief writes.

The mirrored runs need the CPU split into two logical devices before TensorFlow starts its
devices, which this pytest process did long ago: they run in a child process
(tests/mirrored_step.py). The multi-worker runs are two child processes on loopback ports.
"""

import csv
import json
import os
import socket
import subprocess
import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import keras

from conftest import ROOT
import common
import datasets
import fault_hooks
import training.checkpoint
import training.distribute
import training.run
import f_vaes
import face_runs
import infomax

PYTHON = [sys.executable]
TINY_FVAE = ["--img-size", "16", "--level", "2", "--depth", "1", "--res-steps", "1",
             "--coupling-width", "8", "--batch-size", "4", "--steps-per-epoch", "2",
             "--seed", "3", "--holdout", "0"]


def run_child(argv, timeout, log):
    """Run a child process to the end (killed after `timeout` s); its output goes to `log`."""
    with open(log, "w") as out:
        child = subprocess.Popen(PYTHON + argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            code = "killed after a timeout"
    if code != 0:
        pytest.fail(f"{' '.join(argv[:2])}: {code}\n" + open(log).read()[-4000:])


# --------------------------------------------------------------------------- two devices

@pytest.fixture(scope="module")
def mirrored_step(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mirrored")
    run_child(["tests/mirrored_step.py", str(folder / "step.npz"), "float64"], 400,
              folder / "log.txt")
    return np.load(folder / "step.npz")


def parts(results, model, device):
    prefix = f"{model}_{device}_"
    return {k[len(prefix):]: results[k] for k in results.files if k.startswith(prefix)}


@pytest.mark.parametrize("model", ["fvae", "infomax"])
@pytest.mark.slow
def test_one_mirrored_step_equals_the_step_on_one_device(mirrored_step, model):
    """Same weights, same global batch of 8, same seeds: the step on two replicas (4 images each)
    logs the same loss and leaves the same weights and Adam moments as on one device, so the
    per-replica loss is scaled to the global-batch mean and the replicas' noise is the noise
    one device draws. (float64: see tests/mirrored_step.py for why not float32.)"""
    one, two = parts(mirrored_step, model, "one"), parts(mirrored_step, model, "two")
    assert set(one) == set(two)
    assert {"log_loss", "weight_0", "optimizer_0"} <= set(one)
    assert int(one["optimizer_0"]) == int(two["optimizer_0"]) == 1  # one Adam step was taken
    for name in sorted(one):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-9, err_msg=name)
    moments = [k for k in one if k.startswith("optimizer_") and one[k].ndim > 0]
    assert sum(np.any(one[k] != 0) for k in moments) > len(moments) // 2  # real gradients


@pytest.mark.slow
def test_replicas_draw_different_noise_that_together_is_the_one_device_draw(mirrored_step):
    one, two = mirrored_step["noise_one"], mirrored_step["noise_two"]
    assert two.shape == (2, 4, 3)
    assert not np.allclose(two[0], two[1])  # no replica repeats another's noise
    np.testing.assert_array_equal(np.concatenate(two), one)


@pytest.mark.slow
def test_one_mirrored_step_in_float32(tmp_path):
    """In float32 the logged numbers still agree to 1e-5; the weights only to within the size
    of Adam's first step either way (lr), because that step is lr * g / (|g| + 1e-7), and a
    gradient that is 0 but for rounding (a conv bias before batch norm) points anywhere."""
    run_child(["tests/mirrored_step.py", str(tmp_path / "step.npz"), "float32"], 400,
              tmp_path / "log.txt")
    results = np.load(tmp_path / "step.npz")
    for model, lr in (("fvae", 1e-3), ("infomax", 1e-3)):
        one, two = parts(results, model, "one"), parts(results, model, "two")
        for name in sorted(one):
            if name.startswith("log_"):
                np.testing.assert_allclose(two[name], one[name], rtol=1e-5, err_msg=name)
            elif name.startswith("weight_"):
                np.testing.assert_allclose(two[name], one[name], rtol=0, atol=2 * lr,
                                           err_msg=name)


# --------------------------------------------------------------------------- the pieces

def test_on_one_device_nothing_changes():
    generator = keras.random.SeedGenerator(4)
    expected = keras.random.normal((5, 2), seed=keras.random.SeedGenerator(4))
    drawn = training.distribute.replica_draw(lambda shape: keras.random.normal(shape, seed=generator), (5, 2))
    np.testing.assert_array_equal(drawn, expected)
    assert float(training.distribute.replica_share(np.float32(3.0))) == 3.0
    assert training.distribute.step_logs({"loss": 1.0}) == {"loss": 1.0}
    assert training.distribute.is_chief(training.distribute.make_strategy("none"))


def test_negatives_in_groups_pair_images_only_within_each_block():
    """What a replica does with its part of the batch, one device does with `groups` blocks."""
    for groups in (1, 2, 4):
        perm = np.asarray(infomax.random_permutation(16, keras.random.SeedGenerator(1), groups))
        keys = np.asarray(keras.random.uniform((16,), seed=keras.random.SeedGenerator(1)))
        blocks = [np.argsort(block, kind="stable") + 16 // groups * i
                  for i, block in enumerate(np.split(keys, groups))]
        np.testing.assert_array_equal(perm, np.concatenate(blocks))
        assert sorted(perm) == list(range(16))


def fake_strategy(task_type, task_id, jobs=("worker",)):
    spec = types.SimpleNamespace(as_dict=lambda: {job: ["h:1"] for job in jobs})
    resolver = types.SimpleNamespace(task_type=task_type, task_id=task_id,
                                     cluster_spec=lambda: spec)
    return types.SimpleNamespace(cluster_resolver=resolver)


def test_the_chief_is_task_chief_or_else_worker_0():
    assert training.distribute.is_chief(fake_strategy("worker", 0))
    assert not training.distribute.is_chief(fake_strategy("worker", 1))
    assert training.distribute.is_chief(fake_strategy("chief", 0, ("chief", "worker")))
    assert not training.distribute.is_chief(fake_strategy("worker", 0, ("chief", "worker")))


def test_other_workers_write_to_a_temporary_folder_that_resumes_from_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "latest.weights.h5").write_bytes(b"chief's weights")
    folder = training.distribute.writable_run_dir(str(out), fake_strategy("worker", 1))
    assert folder != str(out) and os.path.isdir(folder)
    assert json.load(open(os.path.join(folder, "config.json"))) == {}
    assert open(os.path.join(folder, "latest.weights.h5"), "rb").read() == b"chief's weights"
    with open(os.path.join(folder, "new.weights.h5"), "wb") as f:  # how checkpoints are written
        f.write(b"worker's weights")
    os.replace(os.path.join(folder, "new.weights.h5"), os.path.join(folder, "latest.weights.h5"))
    assert (out / "latest.weights.h5").read_bytes() == b"chief's weights"
    assert sorted(os.listdir(out)) == ["config.json", "latest.weights.h5"]
    assert training.distribute.writable_run_dir(str(out), fake_strategy("worker", 0)) == str(out)


def test_bad_distribution_flags_are_clear_errors(monkeypatch):
    with pytest.raises(common.UsageError, match="--devices"):
        training.distribute.make_strategy("none", ["GPU:0"])
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(common.UsageError, match="TF_CONFIG"):
        training.distribute.make_strategy("multiworker")
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(common.UsageError, match="--batch-size 5"):
        training.distribute.check_global_batch(5, two_replicas)
    with pytest.raises(common.UsageError, match="--batch-size 2"):
        training.distribute.check_global_batch(2, two_replicas, per_replica_minimum=2)
    training.distribute.check_global_batch(4, two_replicas, per_replica_minimum=2)
    assert not training.distribute.xla_allowed(True, "mirrored", "--jit")
    assert training.distribute.xla_allowed(True, "none", "--jit")


def test_in_a_cluster_ctrl_c_saves_at_the_end_of_the_epoch(tmp_path, monkeypatch):
    """In a cluster a signal reaches the workers at different steps (or one worker only), and a
    mid-epoch save reads the metrics with an all-reduce that the others would never join: the
    run goes on to the end of its epoch, which every worker reaches, saves there and stops."""
    from test_faults import interrupt_at_step, regression_stream, tiny_regression
    monkeypatch.setattr(training.distribute, "in_cluster", lambda strategy=None: True)
    interrupt_at_step(monkeypatch, 2)  # step 2 of epoch 1 (4 steps)
    model = tiny_regression()
    checkpoint = training.checkpoint.RunCheckpoint(str(tmp_path), batch_size=8, steps_per_epoch=4)
    with pytest.raises(common.Interrupted, match="at the end of epoch 1"):
        training.run.fit_resumable(model, regression_stream, checkpoint, 3, 4, [checkpoint], verbose=0)
    attrs = training.checkpoint.weights_attrs(checkpoint.latest)
    assert (attrs["epochs_done"], attrs["steps_done"], attrs["images_seen"]) == (1, 0, 32)
    assert int(model.optimizer.iterations.numpy()) == 4


def test_synchronised_batch_norm_keeps_the_same_weights(tmp_path):
    """--sync-bn changes how batch statistics are computed, not the variables: weights saved
    with or without it load into the other."""
    for build in (lambda sync: f_vaes.FVAE(16, level=2, depth=1, res_steps=1, coupling_width=8,
                                           sync_bn=sync),
                  lambda sync: infomax.InfoMax(8, z_dim=8, sync_bn=sync)):
        plain, synced = build(False), build(True)
        for model in (plain, synced):
            model(np.zeros((1, *model.encoder.input_shape[1:]), "float32"))
        norms = [layer for layer in synced._flatten_layers()
                 if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(layer.synchronized for layer in norms)
        plain.save_weights(tmp_path / "plain.weights.h5")
        synced.load_weights(tmp_path / "plain.weights.h5")
        for a, b in zip(plain.weights, synced.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


# --------------------------------------------------------------------------- several machines

def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_cluster(script, outs, argv, folder, timeout=300, own_argv=None, expect=0, env=None):
    """Start one worker process per `--out` of `outs` (TF_CONFIG on loopback ports), each with
    `argv` (then its own of `own_argv`) and `env` added to its environment; wait for all (all
    are killed on a timeout or when one fails); unless each exits with `expect`, fail. Return
    each worker's model state (dumped by tests/train_and_dump.py; None when `expect` is not 0)
    and printed output."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(outs))]
    children, logs = [], []
    try:
        for index, out in enumerate(outs):
            tf_config = {"cluster": {"worker": addresses},
                         "task": {"type": "worker", "index": index}}
            logs.append(open(folder / f"worker{index}.log", "w"))
            children.append(subprocess.Popen(
                PYTHON + ["tests/train_and_dump.py", str(folder / f"worker{index}.npz"), script,
                          "--out", str(out), "--distribute", "multiworker"] + argv
                + (own_argv[index] if own_argv else []),
                cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT,
                env=dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="2",
                         **(env or {}))))
        codes = [child.wait(timeout=timeout) for child in children]
    except subprocess.TimeoutExpired:
        codes = ["killed after a timeout"] * len(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for log in logs:
            log.close()
    printed = [(folder / f"worker{i}.log").read_text() for i in range(len(outs))]
    if any(code != expect for code in codes):
        pytest.fail(f"workers exited with {codes}, not {expect}\n"
                    + "\n----\n".join(p[-3000:] for p in printed))
    if expect != 0:
        return None, printed
    dumps = [np.load(folder / f"worker{i}.npz") for i in range(len(outs))]
    in_order = lambda dump: sorted(dump.files, key=lambda k: int(k.split("_")[1]))  # noqa: E731
    return [[dump[k] for k in in_order(dump)] for dump in dumps], printed


def assert_same_state(states):
    first, second = states
    assert len(first) == len(second) > 10
    for i, (a, b) in enumerate(zip(first, second)):
        np.testing.assert_array_equal(a, b, err_msg=f"variable {i}")


def write_faces(folder, n=12):
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(n):
        iio.imwrite(folder / f"face{i}.png",
                    rng.uniform(0, 255, (4, 4, 3)).repeat(4, 0).repeat(4, 1).astype("uint8"))


def log_epochs(run):
    with open(run / "log.csv", newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_workers_train_the_same_fvae_only_the_chief_writes_and_a_resume_works(tmp_path):
    """... and the resumed run, whose first step is all-NaN (TEST_NAN_AT_STEPS) with
    --nan-patience 1, skips that step and rolls back on both workers to the same best weights
    (worker 1 reads the chief's through its links), so that they still end identical."""
    write_faces(tmp_path / "faces")
    chief_out, worker_out = tmp_path / "chief_run", tmp_path / "worker_run"
    argv = TINY_FVAE + ["--data-dir", str(tmp_path / "faces"), "--epochs", "2"]
    states, printed = run_cluster("f_vaes", [chief_out, worker_out], argv, tmp_path)
    assert_same_state(states)
    assert {"latest.weights.h5", "best.weights.h5", "log.csv", "config.json",
            "samples_T1.0_latest.png"} <= set(os.listdir(chief_out))
    assert log_epochs(chief_out) == ["1", "2"]
    assert not worker_out.exists()  # worker 1 wrote into a temporary folder ...
    temporary = printed[1].split("it writes to ")[1].split()[0]
    assert not os.path.exists(temporary)  # ... removed when it finished

    # The same command again with more epochs, --out shared by both: both resume from it.
    argv[argv.index("--epochs") + 1] = "3"
    states, printed = run_cluster("f_vaes", [chief_out, chief_out], argv + ["--nan-patience", "1"],
                                  tmp_path, env={fault_hooks.NAN_STEPS_ENV: "5"})  # epoch 3's first
    assert all("after epoch 2" in p for p in printed), printed
    assert all("non-finite steps in a row" in p and "rolled back to" in p for p in printed)
    assert_same_state(states)
    assert log_epochs(chief_out) == ["1", "2", "3"]
    assert json.loads((chief_out / "state.json").read_text())["epochs_done"] == 3
    with open(chief_out / "log.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["skipped_steps"]) == 1 and float(last["learning_rate"]) < 1e-3


def worker_part(dataset, workers, index):
    """What worker `index` of `workers` (one replica each) gets from `dataset` under
    MultiWorkerMirroredStrategy: its `experimental_distribute_dataset` rebatches each global
    batch into per-worker parts and auto-shards them (tensorflow/python/distribute/input_lib.py,
    `_create_cloned_datasets_from_dataset`); reproduced here without a cluster."""
    from tensorflow.python.distribute import input_lib, input_ops
    rebatch = input_lib.DistributedDataset._make_rebatch_fn(None, dataset, workers, workers)
    return input_ops.auto_shard_dataset(rebatch(dataset, index), workers, index, workers)


@pytest.mark.parametrize("start", [0, 28])
def test_two_workers_get_complementary_halves_of_the_same_global_batches(start, tmp_path):
    """The training streams of both models (issue 6's position-addressed streams, also after a
    resume at image `start`) are sharded by data: worker 0 gets the first half of each global
    batch, worker 1 the second, and together they are the batch one device gets."""
    write_faces(tmp_path / "faces")
    files = sorted(str(p) for p in (tmp_path / "faces").iterdir())
    streams = [datasets.image_stream(files, 16, 4, face_runs.scale_pixels, seed=3, start=start),
               infomax.training_stream(np.arange(12 * 48, dtype="uint8").reshape(12, 4, 4, 3),
                                       4, (-1.0, 1.0), seed=3, start=start)]
    for stream in streams:
        whole = [batch.numpy() for batch in stream.take(5)]
        halves = [[batch.numpy() for batch in worker_part(stream, 2, i).take(5)] for i in (0, 1)]
        for batch, first, second in zip(whole, *halves):
            assert len(first) == len(second) == 2
            np.testing.assert_array_equal(np.concatenate([first, second]), batch)


@pytest.mark.slow
def test_workers_given_different_seeds_stop_before_anything_is_written(tmp_path):
    """The f-VAE's default --seed -1 draws a seed per process: in a cluster the workers would
    build different flows and cut their parts from different batches. All stop, exit 2."""
    write_faces(tmp_path / "faces")
    out = tmp_path / "run"
    at = TINY_FVAE.index("--seed")
    argv = TINY_FVAE[:at] + TINY_FVAE[at + 2:] + ["--data-dir", str(tmp_path / "faces")]
    _, printed = run_cluster("f_vaes", [out, out], argv, tmp_path, timeout=120,
                             own_argv=[["--seed", "1"], ["--seed", "2"]], expect=2)
    assert all("the workers disagree on --seed" in p for p in printed), printed
    assert not out.exists()


@pytest.mark.slow
def test_two_workers_train_the_same_infomax_and_only_the_chief_evaluates(tmp_path):
    from test_infomax import make_cifar_fixture
    make_cifar_fixture(str(tmp_path / "data"), rows=16)
    chief_out, worker_out = tmp_path / "chief_run", tmp_path / "worker_run"
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--batch-size", "8",
            "--steps-per-epoch", "2", "--epochs", "2", "--monitor-knn", "40",
            "--probe-epochs", "1", "--no-baseline"]
    states, printed = run_cluster("infomax", [chief_out, worker_out], argv, tmp_path)
    assert_same_state(states)
    assert {"latest.weights.h5", "encoder.weights.h5", "metrics.json",
            "neighbours_cosine.png"} <= set(os.listdir(chief_out))
    assert not worker_out.exists() and "the chief evaluates" in printed[1]
    assert "unhealthy" not in printed[0]  # worker 1 waited for the chief before leaving
