"""log.csv follows the f-VAE's two scalars through a run: the decoder's log-precision t_x,
the posterior's log noise scale s_u, and exp(s_u), as the weights saved with the epoch hold
them."""

import csv

import numpy as np
import pytest

from test_f_vaes import TINY_FLAGS
from test_same_weights import write_pictures
import f_vaes


@pytest.mark.slow
def test_log_csv_records_t_x_and_s_u_every_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pictures("faces", n=10, size=16)
    assert f_vaes.main([*TINY_FLAGS, "--epochs", "2", "--holdout", "2", "--seed", "1",
                        "--lr", "0.01", "--data-dir", "faces", "--out", "run"]) == 0
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    model = f_vaes.FVAE.from_run("run", "latest")
    t_x, s_u = float(model.log_precision.numpy()), float(model.log_noise_scale.numpy())
    assert t_x != 0.0 and s_u != 0.0  # they moved (lr 0.01), so the columns are not the init
    last = rows[-1]
    np.testing.assert_allclose(float(last["log_precision"]), t_x, rtol=1e-5)
    np.testing.assert_allclose(float(last["log_noise_scale"]), s_u, rtol=1e-5)
    np.testing.assert_allclose(float(last["noise_scale"]), np.exp(s_u), rtol=1e-5)
    assert float(rows[0]["log_precision"]) != float(last["log_precision"])  # every epoch's own
