"""experiments/fvae64_pictures.py end to end on a tiny f-VAE run: two checkpoint copies, all
five pictures at the sizes their layouts give, and the table of every epoch."""

import csv
import os
import shutil

import imageio.v3 as iio
import pytest

from conftest import load_experiment
from test_same_weights import write_pictures
from test_user_facing import TINY_FVAE
import common
import f_vaes


def load_script():
    return load_experiment("fvae64_pictures")


def copy_checkpoint(run, folder):
    """What the long run's watcher copies at a chosen step."""
    os.makedirs(folder)
    for name in ("config.json", "latest.weights.h5", "state.json", "log.csv"):
        shutil.copy(os.path.join(run, name), folder)
    return folder


@pytest.mark.slow
def test_pictures_of_a_run_and_its_checkpoints(tmp_path, capsys):
    data = write_pictures(str(tmp_path / "faces"), n=16)
    run = str(tmp_path / "run")
    argv = [*TINY_FVAE, "--data-dir", data, "--out", run]  # 4 steps an epoch
    assert f_vaes.main(argv + ["--epochs", "1"]) == 0
    early = copy_checkpoint(run, str(tmp_path / "run-step4"))
    common.write_json(os.path.join(early, "evaluate.json"), {"bits_per_dim": 7.5})  # as evaluate
    assert f_vaes.main(argv + ["--epochs", "2"]) == 0
    late = copy_checkpoint(run, str(tmp_path / "run-step8"))

    out = tmp_path / "pictures"
    assert load_script().main([run, "--checkpoints", late, early, "--out-dir", str(out),
                               "--rows", "3", "--precision-switch-step", "6"]) == 0
    printed = capsys.readouterr().out
    assert "pictures of step 8, checkpoint rows of steps 4, 8" in printed
    assert "held-out bits/dim: 7.5000 at step 4" in printed
    table = (out / "fvae64_epochs.md").read_text().splitlines()
    with open(os.path.join(run, "log.csv"), newline="") as f:
        logged = list(csv.DictReader(f))
    assert [line.split(" | ")[:4] for line in table[4:]] == [  # epoch, step, loss, bits/dim
        [f"| {e + 1}", str(4 * (e + 1)), f"{float(r['loss']):,.0f}", f"{float(r['bits_per_dim']):.3f}"]
        for e, r in enumerate(logged)]
    assert table[4].endswith("| 7.500 |") and table[5].endswith("|  |")  # evaluate at step 4 only
    shapes = {p.name: iio.imread(p).shape for p in out.iterdir() if p.suffix == ".png"}
    assert sorted(shapes) == ["fvae64_checkpoints.png", "fvae64_interpolate_2.png",
                              "fvae64_interpolate_4.png", "fvae64_learning_curve.png",
                              "fvae64_temperatures.png"]
    assert shapes["fvae64_interpolate_2.png"] == (3 * 16, 9 * 16, 3)
    assert shapes["fvae64_interpolate_4.png"] == (9 * 16, 9 * 16, 3)
    height, width, _ = shapes["fvae64_temperatures.png"]  # labels above the 7 temperatures
    assert width == 7 * 16 and 3 * 16 < height < 3 * 16 + 30
    height, width, _ = shapes["fvae64_checkpoints.png"]  # labels left of the 2 rows
    assert height == 2 * 16 and 8 * 16 < width < 8 * 16 + 100
    assert shapes["fvae64_learning_curve.png"] == (350, 600, 3)
    assert all(p.stat().st_size < 300_000 for p in out.iterdir())
