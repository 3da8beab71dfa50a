"""The redesign of issue 14 changed where code lives, not what it computes: the same seed and
flags still train the same weights. `tests/data/weights_before_redesign.npz` holds a
fingerprint of every array in `latest.weights.h5` (weights and optimiser state) of two short
runs, one per script, recorded with the code as it was before the redesign (commit cbc68d5)
by `python tests/test_same_weights.py record`; the test trains the same runs with today's code
and compares. The argument lists are the old spellings, which must still work."""

import os
import sys

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT  # noqa: E402

REFERENCE = os.path.join(ROOT, "tests", "data", "weights_before_redesign.npz")


def write_pictures(folder, n=12, size=16):
    """Small smooth pictures (blocky noise) as PNG files, the same bytes every time."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(1)
    for i in range(n):
        picture = rng.uniform(0, 255, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
        iio.imwrite(os.path.join(folder, f"{i:02d}.png"), picture.astype("uint8"))
    return folder


def runs(data, out):
    """(name, script, argv) of the two short deterministic runs."""
    return [
        ("fvae", "f_vaes", ["--img-size", "16", "--level", "2", "--depth", "2", "--res-steps", "1",
                            "--coupling-width", "8", "--batch-size", "4", "--steps-per-epoch", "2",
                            "--epochs", "2", "--holdout", "0", "--seed", "5", "--deterministic",
                            "--data-dir", data, "--out", os.path.join(out, "fvae")]),
        ("infomax", "infomax", ["--dataset", "folder", "--data-dir", data, "--img-size", "16",
                                "--z-dim", "8", "--batch-size", "4", "--steps-per-epoch", "2",
                                "--epochs", "2", "--monitor-knn", "0", "--no-baseline",
                                "--seed", "5", "--deterministic", "--no-jit",
                                "--out", os.path.join(out, "infomax")]),
    ]


def fingerprint(path):
    """Per HDF5 dataset: its sum, its sum of squares and its first 16 values (float64)."""
    prints = {}
    with h5py.File(path, "r") as f:
        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                values = np.asarray(item[()], np.float64).reshape(-1)
                prints[name] = np.concatenate([[values.sum(), np.square(values).sum()],
                                               values[:16]])
        f.visititems(visit)
    return prints


def train_run(script, argv):
    import subprocess
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def fingerprints(tmp):
    data = write_pictures(os.path.join(tmp, "pictures"))
    found = {}
    for name, script, argv in runs(data, tmp):
        train_run(script, argv)
        for key, value in fingerprint(os.path.join(tmp, name, "latest.weights.h5")).items():
            found[f"{name}/{key}"] = value
    return found


def test_same_seed_and_flags_train_the_weights_saved_before_the_redesign(tmp_path):
    reference = dict(np.load(REFERENCE))
    found = fingerprints(str(tmp_path))
    assert sorted(found) == sorted(reference)  # the same variables under the same names
    for key, value in reference.items():
        np.testing.assert_allclose(found[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(REFERENCE, **fingerprints(tmp))
    print(f"wrote {REFERENCE}")
