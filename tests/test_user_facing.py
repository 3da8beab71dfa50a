"""What a user types, sees and keeps (issue 15): the card's commands as typed, a quiet start,
output that stays readable in a file, TensorBoard logs and a loss-curve picture in every run
folder, runs that can move, the notebook API, exported SavedModels and `encode`."""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, SHARED_DATA
from test_same_weights import write_pictures
import cli
import f_vaes
import common
import face_runs
import image_files
import infomax
import pictures

TINY_FVAE = ["--img-size", "16", "--level", "2", "--depth", "1", "--res-steps", "1",
             "--coupling-width", "8", "--batch-size", "4", "--steps-per-epoch", "4",
             "--holdout", "4", "--seed", "5", "--log-every", "2"]
TINY_INFOMAX = ["--dataset", "folder", "--img-size", "16", "--z-dim", "8", "--batch-size", "4",
                "--steps-per-epoch", "2", "--monitor-knn", "0", "--no-baseline", "--seed", "5"]


def script(name, *argv, cwd=ROOT, env=None):
    """Run `python name argv` as a user would, output to pipes (not a terminal)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def fvae_run(tmp_path_factory):
    """A tiny f-VAE trained for 2 epochs by the real command line, its output in a file,
    started in its own working folder without --out (the default run folder)."""
    home = tmp_path_factory.mktemp("user")
    pictures = write_pictures(str(home / "pictures"), n=16)
    result = script("f_vaes.py", *TINY_FVAE, "--epochs", "2", "--data-dir", "pictures", cwd=home)
    assert result.returncode == 0, result.stderr[-3000:]
    return home, home / "runs" / "fvae16", pictures, result


@pytest.mark.slow
def test_f_vae_trains_as_typed_into_its_default_run_folder(fvae_run, monkeypatch):
    home, run, _, _ = fvae_run
    for name in ("latest.weights.h5", "best.weights.h5", "log.csv", "config.json",
                 "samples_T1.0_latest.png", "loss_curves.png"):
        assert (run / name).is_file(), name
    # the card's command without --data-dir takes the clone's prepared faces, by a relative
    # path; without them one line says what to download and which command prepares them
    faces = home / "clone" / "data" / "celeba_64x64"
    monkeypatch.setattr(face_runs, "DEFAULT_DATA", {64: str(faces), 128: str(faces) + "x"})
    fvae = f_vaes.FVAE_RUNS
    args = face_runs.parse_args(fvae, ["--img-size", "64", "--out", str(home / "elsewhere")])
    with pytest.raises(common.UsageError, match="img_align_celeba.zip.*tools/prepare_faces.py "
                                                "img_align_celeba.zip .*celeba_64x64 --size 64"):
        face_runs.train_config(fvae, args)
    faces.mkdir(parents=True)
    iio.imwrite(faces / "000001.png", np.zeros((64, 64, 3), np.uint8))
    config, out = face_runs.train_config(fvae, args)
    assert not os.path.isabs(config.data_dir)
    assert os.path.samefile(config.data_dir, faces)
    assert out == str(home / "elsewhere")


@pytest.mark.slow
def test_help_and_errors_start_quietly():
    for name in ("f_vaes.py", "infomax.py"):
        result = script(name, "--help")
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert "train is the default command" in result.stdout
    result = script("f_vaes.py", "sample", "--help")
    assert "--temperatures" in result.stdout and "--epochs" not in result.stdout
    result = script("infomax.py", "--dataset", "cifar10", "--data-dir", "/nowhere/at/all")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_output_in_a_file_is_readable_lines(fvae_run):
    _, _, _, result = fvae_run
    for stream in (result.stdout, result.stderr):
        assert "\x1b[" not in stream and "\r" not in stream  # no progress-bar escape codes
        assert max(len(line) for line in stream.splitlines()) < 400
    lines = result.stdout.splitlines()
    assert sum(line.startswith("epoch 1 step ") for line in lines) == 2  # every 2 of 4 steps
    assert sum(line.startswith("4/4 - ") for line in lines) == 2  # a line per epoch


def scalars_and_images(folder):
    """{tag: [(step, value or image shape)]} of every event file below `folder`."""
    found = {}
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                shown = tensor.shape if tensor is not None and tensor.dtype == object else (
                    float(tensor) if tensor is not None else None)
                found.setdefault(value.tag, []).append((event.step, shown))
    return found


@pytest.mark.slow
def test_tensorboard_logs_scalars_per_epoch_and_step_and_the_sample_grids(fvae_run):
    _, run, _, _ = fvae_run
    logged = scalars_and_images(str(run / "tensorboard"))
    assert [step for step, _ in logged["epoch_loss"]] == [0, 1]
    rows = list(csv.DictReader(open(run / "log.csv")))
    np.testing.assert_allclose([v for _, v in logged["epoch_loss"]],
                               [float(r["loss"]) for r in rows], rtol=1e-4)
    assert [step for step, _ in logged["loss"]] == [2, 4, 6, 8]  # the run's step count
    assert [step for step, _ in logged["samples_T0.8"]] == [1, 2]


@pytest.mark.slow
def test_a_run_and_its_images_can_move(fvae_run, tmp_path):
    home, run, pictures, _ = fvae_run
    saved = json.load(open(run / "config.json"))
    assert not [k for k, v in saved.items() if isinstance(v, str) and os.path.isabs(v)]
    moved_run, moved_pictures = tmp_path / "run", tmp_path / "faces"
    shutil.copytree(run, moved_run)
    shutil.copytree(pictures, moved_pictures)
    result = script("f_vaes.py", "reconstruct", "--out", str(moved_run), "--data-dir",
                    str(moved_pictures), "--rows", "2", "--cols", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (moved_run / "reconstruct.png").is_file()
    result = script("f_vaes.py", "evaluate", "--out", str(moved_run), cwd=tmp_path)
    assert result.returncode == 2 and "--data-dir" in result.stderr  # the old place is gone


@pytest.mark.slow
def test_notebook_api_samples_encodes_decodes_and_scores(fvae_run):
    _, run, _, _ = fvae_run
    model = f_vaes.FVAE.from_run(str(run))
    images = model.sample(6, temperature=0.8, seed=3)
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    noise = np.random.RandomState(3).randn(6, 16 * 16 * 3).astype("float32")
    np.testing.assert_array_equal(images, model.decode(0.8 * noise))
    assert not np.array_equal(images, model.sample(6, temperature=1.0, seed=3))
    z = model.encode(images)
    assert z.shape == (6, 768)
    # decode(encode(x)) is the author's reconstruction G(E(x)): the flow inverts exactly
    direct = pictures.to_uint8(model.reconstruct(images / 255.0 * 2 - 1).numpy())
    assert np.abs(model.decode(z).astype(int) - direct.astype(int)).max() <= 1
    bits = model.bits_per_dim(images)
    assert bits.shape == (6,) and np.all(np.isfinite(bits)) and np.all(bits > 0)


@pytest.mark.slow
def test_export_saved_models_load_back_and_compute_the_same(fvae_run, tmp_path):
    _, run, _, _ = fvae_run
    result = script("f_vaes.py", "export", "--out", str(run), "--dest", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr
    model = f_vaes.FVAE.from_run(str(run))
    sampler = tf.saved_model.load(str(tmp_path / "export" / "sampler"))
    encoder = tf.saved_model.load(str(tmp_path / "export" / "encoder"))
    noise = np.random.RandomState(0).randn(3, 768).astype("float32")
    images = sampler.sample(tf.constant(noise), tf.constant(0.7)).numpy()
    np.testing.assert_array_equal(images, model.decode(0.7 * noise))
    np.testing.assert_allclose(encoder.encode(tf.constant(images)).numpy(), model.encode(images),
                               atol=1e-4)
    weights = tmp_path / "export" / "inference.weights.h5"
    assert os.path.getsize(weights) < 0.4 * os.path.getsize(run / "latest.weights.h5")
    config = cli.config_from_json(f_vaes.Config, json.load(open(run / "config.json")))
    inference = f_vaes.FVAE(config.img_size, config.level, config.depth, config.res_steps,
                            config.coupling_width, config.seed, name="fvae")
    inference(np.zeros((1, 16, 16, 3), "float32"))
    inference.load_weights(str(weights))
    np.testing.assert_allclose(inference.encode(images), model.encode(images), atol=1e-5)


@pytest.mark.slow
def test_encode_writes_latents_and_bits_per_dim_keyed_by_file(fvae_run, tmp_path):
    _, run, pictures, _ = fvae_run
    result = script("f_vaes.py", "encode", "--out", str(run), "--folder", pictures,
                    "--dest", str(tmp_path / "faces"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "faces.csv")))
    latents = np.load(tmp_path / "faces.npy")
    assert [r["file"] for r in rows] == sorted(os.listdir(pictures))
    assert latents.shape == (16, 768) and all(np.isfinite(float(r["bits_per_dim"])) for r in rows)
    model = f_vaes.FVAE.from_run(str(run))
    first = image_files.load_image(os.path.join(pictures, rows[5]["file"]), 16).numpy()
    np.testing.assert_allclose(latents[5], model.encode(first[None])[0], atol=1e-4)


@pytest.mark.slow
def test_infomax_encoder_exports_and_encodes_a_folder(tmp_path):
    pictures = write_pictures(str(tmp_path / "pictures"), n=12)
    run = tmp_path / "dim"
    result = script("infomax.py", *TINY_INFOMAX, "--epochs", "1", "--data-dir", pictures,
                    "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "loss_curves.png").is_file() and (run / "tensorboard").is_dir()
    assert "neighbours_cosine" in scalars_and_images(str(run / "tensorboard"))
    for argv in (["export", "--dest", str(tmp_path / "export")],
                 ["encode", "--folder", pictures, "--dest", str(tmp_path / "codes")]):
        result = script("infomax.py", *argv, "--out", str(run))
        assert result.returncode == 0, result.stderr
    encoder, config = infomax.load_encoder(str(run))
    images = np.stack([image_files.load_image(os.path.join(pictures, f), 16).numpy()
                       for f in sorted(os.listdir(pictures))]).round().astype(np.uint8)
    expected = infomax.embed(images, encoder, config)
    exported = tf.saved_model.load(str(tmp_path / "export" / "feature_extractor"))
    np.testing.assert_allclose(exported.embed(tf.constant(images)).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "codes.npy"), expected, atol=1e-4)
    assert [r["file"] for r in csv.DictReader(open(tmp_path / "codes.csv"))] == sorted(
        os.listdir(pictures))


def test_no_code_outside_the_tests_reads_the_projects_private_folder():
    """Users have no ../shared: only the tests and CI may pass it as --data-dir."""
    import glob
    import re
    pattern = re.compile(r"""\.\./shared|["']\.\.["'],\s*["']shared["']|dirname\(ROOT\), "shared\"""")
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
                       + glob.glob(os.path.join(ROOT, "*", "*", "*.py"))):
        if os.sep + "tests" + os.sep in path:
            continue
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if pattern.search(line):
                found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
