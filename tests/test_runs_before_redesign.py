"""Run folders written by the code before f_vaes.py and glow.py were split (commit f7bd01c)
still load, sample and resume: the weights' paths in their .weights.h5 files, config.json
and state.json are read as they were written.

tests/data/runs_before_redesign holds two such runs (config.json, state.json, log.csv,
best and latest weights; no pictures): one epoch of two steps each on the synthetic
pictures of `write_pictures(n=12, size=16)`, kept as `pictures` next to the run folders,

    f_vaes.py --img-size 16 --level 2 --depth 1 --res-steps 0 --latent-channels 12 ...
    glow.py   --img-size 16 --level 2 --depth 1 ...

with the flags of `TRAIN_FLAGS` (the f-VAE's 12 latent channels and no residual steps keep
its weights small; its flow still has both levels and the factor-out between them).
"""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import ROOT
from test_same_weights import write_pictures
import f_vaes
import face_runs
import glow
from speedups import centre_taps

FIXTURE = os.path.join(ROOT, "tests", "data", "runs_before_redesign")
SHARED_FLAGS = ["--img-size", "16", "--level", "2", "--depth", "1", "--coupling-width", "8",
                "--batch-size", "4", "--steps-per-epoch", "2", "--holdout", "2", "--seed", "3",
                "--data-dir", "pictures", "--log-every", "0"]
TRAIN_FLAGS = {"fvae16": SHARED_FLAGS + ["--res-steps", "0", "--latent-channels", "12"],
               "glow16": SHARED_FLAGS}
SCRIPTS = {"fvae16": f_vaes, "glow16": glow}
MODELS = {"fvae16": f_vaes.FVAE_RUNS, "glow16": glow.GLOW_RUNS}


@pytest.fixture(params=sorted(SCRIPTS))
def old_run(request, tmp_path, monkeypatch):
    """(name, run folder) of a copy of the saved run, with its pictures, in the current folder."""
    name = request.param
    shutil.copytree(os.path.join(FIXTURE, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    write_pictures("pictures", n=12, size=16)
    return name, tmp_path / name


def saved_arrays(path):
    """The model's arrays in a .weights.h5 file (not the optimiser's), by path."""
    arrays = {}
    with h5py.File(path) as f:
        f.visititems(lambda key, item: arrays.__setitem__(key, np.asarray(item))
                     if isinstance(item, h5py.Dataset) and not key.startswith("optimizer")
                     else None)
    return arrays


def test_weights_of_an_old_run_load_into_the_same_variables(old_run, tmp_path):
    """Every saved array loads as it is, or, for the f-VAE's coupling kernels on its 1x1
    level (saved whole, 3x3), as their centre taps, the only ones that touch data: saved
    again, the file holds the same arrays under the same paths."""
    name, run = old_run
    _, model = face_runs.load_run(MODELS[name], str(run), "best")
    model.save_weights(tmp_path / "again.weights.h5")
    saved, again = saved_arrays(run / "best.weights.h5"), saved_arrays(tmp_path / "again.weights.h5")
    assert sorted(saved) == sorted(again)
    for key, value in saved.items():
        np.testing.assert_array_equal(again[key], centre_taps(value, again[key].shape), key)
    cut = [key for key in saved if saved[key].shape != again[key].shape]
    assert bool(cut) == (name == "fvae16")  # the f-VAE fixture holds whole kernels on 1x1 maps


def test_an_old_run_samples_and_resumes_one_more_epoch(old_run):
    name, run = old_run
    script = SCRIPTS[name]
    assert script.main(["sample", "--out", name, "--rows", "2", "--cols", "2"]) == 0
    assert (run / f"sample_T{MODELS[name].temperatures[0]}.png").is_file()

    assert script.main([*TRAIN_FLAGS[name], "--epochs", "2", "--out", name]) == 0
    state = json.loads((run / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["images_seen"] == 16
    epochs = [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]
