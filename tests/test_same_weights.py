"""Redesigns change where code lives, not what it computes: the same seed and flags still
train the same weights. `tests/data/weights_before_redesign.npz` holds a fingerprint of every
array in `latest.weights.h5` (weights and optimiser state) of two short runs, one per script,
first recorded with the code as it was before the second redesign (commit f7bd01c) by
`python tests/test_same_weights.py record`; the test trains the same runs with the code as it
is and compares. The argument lists are the old spellings, which must still work. When the
f-VAE's coupling kernels on 1x1 maps were cut to their live centre taps, the recording was
made again (`record PREVIOUS.npz`, on an AMD EPYC with AVX2 only), after checking that those
kernels and their moments were the only arrays that moved by more than the two CPUs' round-off
(and tests/test_run_before_live_weights.py pins the centre taps against the code before).
When the data order got a random key of its own (datasets.order_key), new runs train on
other batches: the fingerprints were recorded again with that code (2026-12-07, AMD EPYC,
AVX2 only), keeping the round-off arrays of the recording before, after checking that the
old key still gives the recorded weights (tests/test_random_streams.py pins both keys).

How close is "the same" on another machine? oneDNN picks other kernels on another CPU, which
sum in another order, and after a few Adam steps (which turn a gradient's sign, however small,
into a step of the learning rate's size) and batch-norm statistics of near-cancelling sums,
float32 round-off grows well past a few ulps. So the recording also trains both runs with
TensorFlow's own (Eigen) kernels, `TF_ENABLE_ONEDNN_OPTS=0`, another valid float32 summation
order, and keeps the differences between the two, and between this recording and the
previous one made on another CPU: the round-off these steps amplify, measured
(`allowed_difference`). The test allows a few times that; a changed computation (another
seed, learning rate, sign or axis) moves the weights by far more. Bit-exact comparisons stay
where one machine reproduces them (resume)."""

import os
import sys

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT  # noqa: E402

REFERENCE = os.path.join(ROOT, "tests", "data", "weights_before_redesign.npz")
ROUND_OFF_MARGIN = 8
ULPS = 16 * np.finfo(np.float32).eps


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


def train_run(script, argv, onednn="1"):
    import subprocess
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn})
    assert result.returncode == 0, result.stderr[-3000:]


def fingerprints(tmp, onednn="1"):
    data = write_pictures(os.path.join(tmp, "pictures"))
    found = {}
    for name, script, argv in runs(data, tmp):
        train_run(script, argv, onednn)
        for key, value in fingerprint(os.path.join(tmp, name, "latest.weights.h5")).items():
            found[f"{name}/{key}"] = value
    return found


def test_same_seed_and_flags_train_the_weights_saved_before_the_redesign(tmp_path):
    saved = dict(np.load(REFERENCE))
    reference = {k: v for k, v in saved.items() if not k.startswith("round_off/")}
    found = fingerprints(str(tmp_path))
    assert sorted(found) == sorted(reference)  # the same variables under the same names
    for key, value in reference.items():
        assert np.all(np.abs(found[key] - value) <= allowed_difference(
            value, saved[f"round_off/{key}"])), (
            f"{key}: differs by more than float32 round-off allows\nfound    "
            f"{found[key][:6]}\nrecorded {value[:6]}\nallowed  "
            f"{allowed_difference(value, saved[f'round_off/{key}'])[:6]}")


def allowed_difference(value, round_off):
    """Per number of a fingerprint (sum, sum of squares, first values): ROUND_OFF_MARGIN times
    its measured round-off, or the largest of the array's first values where that is larger
    (a value that happened to come out the same both ways is no more exact than its
    neighbours), plus a few ulps of the array's scale."""
    return (ROUND_OFF_MARGIN * np.maximum(round_off, round_off[2:].max())
            + ULPS * np.abs(value).max())


def record(previous=None):
    """The fingerprints with oneDNN's kernels, and per array its round-off: the largest
    difference from TensorFlow's own kernels here and, with `previous` (a recording made on
    another CPU, whose kernels sum in yet another order), from that recording. The arrays
    that changed on purpose since `previous` (`cut_to_live_taps`) get instead the largest
    relative cross-CPU difference of their run's other arrays, times their scale."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        reference = fingerprints(os.path.join(tmp, "onednn"))
        changed = cut_to_live_taps(os.path.join(tmp, "onednn", "fvae", "latest.weights.h5"))
        eigen = fingerprints(os.path.join(tmp, "eigen"), onednn="0")
    round_off = {k: np.abs(reference[k] - eigen[k]) for k in reference}
    if previous is not None:
        before = dict(np.load(previous))
        scale = {k: np.abs(v).max() + 1e-30 for k, v in reference.items()}
        relative = {}
        for k in reference:
            if k in before and k not in changed:
                cross = np.abs(reference[k] - before[k])
                round_off[k] = np.maximum(round_off[k], cross)
                run = k.split("/")[0]
                relative[run] = max(relative.get(run, 0.0), cross.max() / scale[k])
        for k in changed:
            round_off[k] = np.maximum(round_off[k], relative["fvae"] * scale[k])
        print(f"{len(changed)} arrays changed on purpose since {previous}: {sorted(changed)}")
    np.savez_compressed(REFERENCE, **reference, **{f"round_off/{k}": v for k, v in round_off.items()})
    worst = sorted(((k, v.max()) for k, v in round_off.items()), key=lambda kv: -kv[1])[:3]
    print(f"wrote {REFERENCE}; the largest round-off differences: {worst}")


def cut_to_live_taps(path):
    """The f-VAE run's arrays that the live taps changed: the 3x3 coupling kernels of its 1x1
    level, stored as 1x1 (their layers' first and last convolutions), and their Adam moments
    (the optimiser's arrays of the same shapes)."""
    shapes = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda key, item: shapes.__setitem__(key, item.shape)
                     if isinstance(item, h5py.Dataset) else None)
    kernels = {k for k, shape in shapes.items() if "couple_wrapper" in k and len(shape) == 4
               and shape[:2] == (1, 1) and not k.split("/")[-3].endswith("_1")}
    cut_shapes = {shapes[k] for k in kernels}
    moments = {k for k, shape in shapes.items() if k.startswith("optimizer") and shape in cut_shapes}
    return {f"fvae/{k}" for k in kernels | moments}


if __name__ == "__main__" and sys.argv[1:2] == ["record"]:
    record(*sys.argv[2:3])  # record [PREVIOUS.npz]
