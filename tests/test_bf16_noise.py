"""experiments/bf16_noise.py: the share of v's numbers where bfloat16 rounds the posterior's
noise away, against values worked out by hand (bfloat16 keeps 8 significant bits: near 1 its
step is 2^-7, so an added 0.001 is lost and an added 0.01 is not), and on a trained run."""

import json

import numpy as np
import pytest

from conftest import load_experiment
from test_same_weights import write_pictures
from test_user_facing import TINY_FVAE
import f_vaes


def load_script():
    return load_experiment("bf16_noise")


def test_lost_share_counts_the_numbers_bfloat16_rounds_back_to_h():
    script = load_script()
    h = np.array([1.0, 1.0, 0.01, 100.0], np.float32)
    noise = np.ones(4, np.float32)
    # 1 + 0.001 rounds to 1 (step 2^-7 = 0.0078); 0.01 + 0.001 does not (step 2^-14); 100 +
    # 0.001 does (step 0.5)
    assert script.lost_share(h, noise, 0.001) == pytest.approx(3 / 4)
    assert script.lost_share(h, noise, 0.01) == pytest.approx(1 / 4)  # only 100
    assert script.lost_share(h, noise, 1.0) == 0.0


@pytest.mark.slow
def test_it_measures_a_run(tmp_path):
    data = write_pictures(str(tmp_path / "faces"), n=16)
    run = str(tmp_path / "run")
    assert f_vaes.main([*TINY_FVAE, "--data-dir", data, "--out", run, "--epochs", "1"]) == 0
    out = str(tmp_path / "noise.json")
    assert load_script().main([run, "--images", "4", "--json", out]) == 0
    (row,) = json.load(open(out))
    assert row["noise_scale"] == pytest.approx(1.0, abs=0.01)  # one epoch from exp(0)
    assert 0 <= row["lost_at_own_scale"] <= row["lost_at"]["0.01"] <= 1
