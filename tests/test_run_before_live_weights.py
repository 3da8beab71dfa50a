"""A run saved while the coupling kernels on 1x1 maps were stored whole (3x3) loads into the
live taps (speedups.SameConv2D), samples, and resumes to the same next losses and weights as
the code that saved it.

tests/data/run_before_live_weights/fvae16 is one epoch of two steps on the pictures of
`write_pictures(n=12, size=16)`, saved by the code of commit 50d8cc0 with `FLAGS` and
`--epochs 1`; its flow's second level runs on 1x1 maps, where the coupling's 3x3 kernels
keep one tap in nine. The same code then resumed it with `--epochs 2`:
fvae16_epoch2_by_old_code.csv is its log.csv and fvae16_epoch2_by_old_code.npz every array
of its latest.weights.h5 (weights and Adam moments, by their paths in the file).
"""

import csv
import os
import shutil

import h5py
import numpy as np

from conftest import ROOT
from speedups import centre_taps
from test_same_weights import write_pictures
import f_vaes

FIXTURE = os.path.join(ROOT, "tests", "data", "run_before_live_weights")
FLAGS = ["--img-size", "16", "--level", "2", "--depth", "1", "--coupling-width", "8",
         "--batch-size", "4", "--steps-per-epoch", "2", "--holdout", "2", "--seed", "3",
         "--data-dir", "pictures", "--log-every", "0", "--res-steps", "0",
         "--latent-channels", "12"]
# Two Adam steps from the same state: another CPU's kernels sum in another order, and Adam
# turns a tiny gradient's sign into a step of up to the learning rate (1e-4) each step. A
# wrong tap or a lost moment moves the weights by far more (the kernels' values are ~0.1).
WEIGHT_TOLERANCE = 3e-4


def arrays(path):
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda key, item: found.__setitem__(key, np.asarray(item))
                     if isinstance(item, h5py.Dataset) else None)
    return found


def test_a_run_with_whole_kernels_resumes_as_the_code_that_saved_it(tmp_path, monkeypatch):
    shutil.copytree(os.path.join(FIXTURE, "fvae16"), tmp_path / "fvae16")
    monkeypatch.chdir(tmp_path)
    write_pictures("pictures", n=12, size=16)
    saved = arrays(tmp_path / "fvae16" / "latest.weights.h5")
    assert f_vaes.main(["sample", "--out", "fvae16", "--weights", "latest", "--rows", "2",
                        "--cols", "2"]) == 0

    assert f_vaes.main([*FLAGS, "--epochs", "2", "--out", "fvae16"]) == 0

    with open(tmp_path / "fvae16" / "log.csv") as f:
        ours = list(csv.DictReader(f))
    with open(os.path.join(FIXTURE, "fvae16_epoch2_by_old_code.csv")) as f:
        old = list(csv.DictReader(f))
    assert [row["epoch"] for row in ours] == ["1", "2"]
    for name in ("loss", "recon", "prior", "entropy", "flow_logdet", "held_out_loss"):
        np.testing.assert_allclose(float(ours[1][name]), float(old[1][name]), rtol=1e-4,
                                   atol=1e-4, err_msg=name)

    expected = dict(np.load(os.path.join(FIXTURE, "fvae16_epoch2_by_old_code.npz")))
    got = arrays(tmp_path / "fvae16" / "latest.weights.h5")
    assert sorted(got) == sorted(expected)  # the same variables under the same paths
    cut = [key for key in got if got[key].shape != expected[key].shape]
    assert cut and all(saved[key].shape[:2] == (3, 3) and got[key].shape[:2] == (1, 1)
                       for key in cut)  # the fixture does hold whole kernels on 1x1 maps
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], centre_taps(value, got[key].shape), rtol=0,
                                   atol=WEIGHT_TOLERANCE * max(1.0, float(np.abs(value).max())),
                                   err_msg=key)
