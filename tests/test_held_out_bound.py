"""The held-out bound after every epoch (face_runs.HeldOutBound, `--held-out-images`): it is
the model's bits/dim on the first held-out files dequantised with fixed noise, it leaves the
training run as it would have been without it, and a run resumed with it gains its columns in
log.csv (empty for the epochs before)."""

import csv
import os

import h5py
import numpy as np
import pytest

from test_same_weights import write_pictures
import datasets
import face_runs
import f_vaes
import glow
import image_files

TINY_FVAE = ["--img-size", "16", "--level", "2", "--depth", "1", "--res-steps", "1",
             "--coupling-width", "8", "--batch-size", "4", "--steps-per-epoch", "2",
             "--holdout", "6", "--seed", "5", "--deterministic"]


def log_rows(run):
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_glows_held_out_bits_per_dim_is_its_exact_likelihood_of_the_first_held_out_files(tmp_path):
    """Glow's bits/dim is exact (no posterior draw), so the logged number can be recomputed:
    the first 3 of the 6 held-out files, y = (x + u) / 256 * 2 - 1 with u the run seed's
    numpy uniform noise, scored by the saved weights."""
    pictures = write_pictures(str(tmp_path / "pictures"), n=16)
    run = str(tmp_path / "glow")
    assert glow.main(["--img-size", "16", "--level", "2", "--depth", "1", "--coupling-width", "8",
                      "--batch-size", "2", "--steps-per-epoch", "2", "--holdout", "6",
                      "--held-out-images", "3", "--seed", "3", "--epochs", "2",
                      "--data-dir", pictures, "--out", run]) == 0
    logged = [float(r["held_out_bits_per_dim"]) for r in log_rows(run)]
    assert len(logged) == 2 and logged[0] != logged[1]  # one number per epoch, and it moves

    files = image_files.list_image_files(pictures)[-6:][:3]  # the last 6 sorted are held out
    x, _ = datasets.decode_images(files, 16)
    u = np.random.RandomState(3).uniform(size=(3, 16, 16, 3))
    y = ((x.astype(np.float64) + u) / 256.0 * 2.0 - 1.0).astype("float32")
    _, model = face_runs.load_run(glow.GLOW_RUNS, run, "latest")
    expected = np.mean(np.asarray(model.loss_parts(y)["bits_per_dim"]))
    assert logged[1] == pytest.approx(expected, rel=1e-5)


def test_every_epoch_scores_the_same_dequantisation_noise(tmp_path):
    """The fixed noise the bound promises, so that epochs differ only by the model: what each
    epoch's evaluation gets is bit for bit the same, y = (x + u) / 256 * 2 - 1 with u the seed's
    numpy uniform noise (a fresh draw moves every number by up to 2/256)."""
    import keras

    seen = []

    class Recording(keras.Model):
        def evaluate(self, dataset, **kwargs):
            seen.append(np.concatenate([np.asarray(y) for y in dataset]))
            return {"loss": 1.0, "bits_per_dim": 1.0}

    files = image_files.list_image_files(write_pictures(str(tmp_path / "pictures"), n=5))
    bound = face_runs.HeldOutBound(files, 16, 2, seed=3)
    bound.set_model(Recording())
    for epoch in range(3):
        bound.on_epoch_end(epoch, {})
    x, _ = datasets.decode_images(files, 16)
    u = np.random.RandomState(3).uniform(size=(5, 16, 16, 3))
    np.testing.assert_allclose(seen[0], (x + u) / 256.0 * 2.0 - 1.0, rtol=0, atol=1e-6)
    for later in seen[1:]:
        np.testing.assert_array_equal(later, seen[0])


def weights_of(path):
    with h5py.File(path, "r") as f:
        found = {}
        f.visititems(lambda name, item: found.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return found


@pytest.mark.slow
def test_the_bound_leaves_training_as_it_was_and_a_resumed_run_gains_its_columns(tmp_path):
    pictures = write_pictures(str(tmp_path / "pictures"), n=16)
    without, beside = str(tmp_path / "without"), str(tmp_path / "with")
    for run, flags in ((without, ["--held-out-images", "0"]), (beside, [])):
        assert f_vaes.main([*TINY_FVAE, *flags, "--epochs", "2", "--data-dir", pictures,
                            "--out", run]) == 0
    # the same training: the same losses, and bit for bit the same weights and optimiser state
    assert [r["loss"] for r in log_rows(without)] == [r["loss"] for r in log_rows(beside)]
    saved_without = weights_of(os.path.join(without, "latest.weights.h5"))
    saved_beside = weights_of(os.path.join(beside, "latest.weights.h5"))
    assert saved_without.keys() == saved_beside.keys()
    for name, value in saved_without.items():
        if name.startswith("seed_state") or np.asarray(value).dtype.kind in "fiu":
            np.testing.assert_array_equal(value, saved_beside[name], err_msg=name)
    assert "held_out_bits_per_dim" not in log_rows(without)[0]
    assert all(np.isfinite(float(r["held_out_bits_per_dim"])) and float(r["held_out_loss"]) > 0
               for r in log_rows(beside))

    # the run trained without it resumes with it: log.csv gets the columns, empty before
    assert f_vaes.main([*TINY_FVAE, "--epochs", "3", "--data-dir", pictures, "--out", without]) == 0
    rows = log_rows(without)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["held_out_bits_per_dim"] for r in rows[:2]] == ["", ""]
    assert np.isfinite(float(rows[2]["held_out_bits_per_dim"])) and rows[2]["loss"]
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in log_rows(beside)]


@pytest.mark.slow
def test_an_unreadable_held_out_file_is_left_out_of_the_bound(tmp_path):
    pictures = write_pictures(str(tmp_path / "pictures"), n=16)
    with open(os.path.join(pictures, "zz_broken.png"), "wb") as f:  # sorted last: held out
        f.write(b"not a picture")
    run = str(tmp_path / "run")
    assert f_vaes.main([*TINY_FVAE, "--epochs", "1", "--data-dir", pictures, "--out", run]) == 0
    assert np.isfinite(float(log_rows(run)[0]["held_out_bits_per_dim"]))


def test_a_failing_evaluation_skips_the_bound_and_keeps_the_random_state(tmp_path, capsys):
    """A held-out file gone by the epoch's end: one line, no bound, the epoch goes on to its
    save, and the random-number state is the one before."""
    import keras
    import tensorflow as tf
    from training.checkpoint import seed_generators

    class Drawing(keras.Model):
        def __init__(self):
            super().__init__()
            self.noise = keras.random.SeedGenerator(7)

        def evaluate(self, *args, **kwargs):
            keras.random.normal((2,), seed=self.noise)  # draws, then fails
            raise tf.errors.NotFoundError(None, None, "held-out/0001.png; No such file")

    model = Drawing()
    bound = face_runs.HeldOutBound([str(tmp_path / "0001.png")], 16, 4, seed=0)
    bound.set_model(model)
    before = seed_generators(model)[0].state.numpy().copy()
    logs = {"loss": 1.0}
    bound.on_epoch_end(0, logs)
    assert logs == {"loss": 1.0}
    np.testing.assert_array_equal(seed_generators(model)[0].state.numpy(), before)
    assert "held-out bound of epoch 1 skipped: NotFoundError" in capsys.readouterr().err
