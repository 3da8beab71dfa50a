"""The bound at the fitted decoder scale (`evaluate`'s *_fitted_t_x): the squared residuals are
a loss part (not read back by inverting the reconstruction term), the refitted loss is the loss at t_x and is
lowest at t_x* = -1/2 ln(mean squared residual), and evaluate reports it for the VAEs (K = 1
and the importance-weighted bound) but not for Glow; the error of the sampled reconstructions
G(v) that evaluate reads back from the same term is G(E(x))'s when the posterior has no noise."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import f_vaes
import face_runs
from test_f_vaes import smooth_images, tiny_model, tiny_run  # noqa: F401 (a fixture)

DIMS = 16 * 16 * 3


def parts_and_residuals():
    model = tiny_model(seed=2)
    x = smooth_images(4, 16, seed=3)
    noise = np.random.RandomState(4).randn(4, 2, 2, 192).astype("float32")
    parts = model.loss_parts(x, noise=noise)
    v = np.exp(model.log_noise_scale.numpy()) * noise + ops.convert_to_numpy(model.encoder(x))
    rebuilt = ops.convert_to_numpy(model.decoder(v))
    squares = np.square(rebuilt.astype("float64") - x).reshape(4, -1).sum(1)
    return model, parts, squares


def test_the_squared_residuals_are_a_loss_part():
    model, parts, squares = parts_and_residuals()
    assert float(model.log_precision.numpy()) == pytest.approx(0.3)  # not t_x = 0: it must not matter
    np.testing.assert_allclose(ops.convert_to_numpy(parts["squared_error"]), squares, rtol=1e-5)


def test_the_refitted_loss_is_the_loss_at_t_x_and_lowest_at_the_fitted_scale():
    model, parts, squares = parts_and_residuals()
    t_x = float(model.log_precision.numpy())
    loss, recon = (ops.convert_to_numpy(parts[k]) for k in ("loss", "recon"))
    np.testing.assert_allclose(face_runs.refitted_loss(loss, recon, squares, DIMS, t_x), loss,
                               rtol=1e-6)
    fitted = -0.5 * np.log(squares.mean() / DIMS)
    mean_at = lambda t: face_runs.refitted_loss(loss, recon, squares, DIMS, t).mean()  # noqa: E731
    assert mean_at(fitted) < min(mean_at(fitted - 0.05), mean_at(fitted + 0.05), mean_at(t_x))
    # the closed form: recon at t = 0.5 e^{2t} S + D/2 ln 2pi - D t, S the squared residuals
    expected = loss - recon + (0.5 * np.exp(2 * fitted) * squares + 0.5 * DIMS * np.log(2 * np.pi)
                               - DIMS * fitted)
    np.testing.assert_allclose(face_runs.refitted_loss(loss, recon, squares, DIMS, fitted), expected,
                               rtol=1e-4)


def test_the_scale_is_fitted_on_training_images_not_held_out_ones(tmp_path):
    """t_x* = -1/2 ln(mean squared residual / D) of training images: with a decoder that outputs
    0, grey training pixels (128, y = u/128, mean y^2 = 1/(3*128^2)) give 1/2 ln(3*128^2) = 5.40,
    the black held-out ones (y ~ -1) would give about 0."""
    import imageio.v3 as iio

    class ZeroDecoder:
        log_precision = np.float32(0.0)

        def loss_parts(self, x):
            return {"squared_error": np.square(np.asarray(x, np.float64)).reshape(len(x), -1).sum(1)}

    for name, level in [*((f"train{i}", 128) for i in range(6)), ("zheld0", 0), ("zheld1", 0)]:
        iio.imwrite(tmp_path / f"{name}.png", np.full((16, 16, 3), level, np.uint8))
    config = f_vaes.Config(img_size=16, batch_size=4, holdout=2, data_dir=str(tmp_path))
    fitted = face_runs.fitted_log_precision(ZeroDecoder(), config, seed=0)
    assert fitted == pytest.approx(0.5 * np.log(3 * 128 ** 2), abs=0.05)


@pytest.mark.parametrize("samples", ["1", "3"])
@pytest.mark.slow
def test_evaluate_reports_the_bound_at_the_fitted_scale(tiny_run, samples):  # noqa: F811
    _, run = tiny_run
    assert f_vaes.main(["evaluate", "--out", str(run), "--samples", samples]) == 0
    result = json.loads((run / "evaluate.json").read_text())
    for key in ("log_precision", "fitted_log_precision", "loss_fitted_t_x",
                "bits_per_dim_fitted_t_x"):
        assert np.isfinite(result[key]), key
    assert result["bits_per_dim_fitted_t_x"] == pytest.approx(
        (result["loss_fitted_t_x"] + DIMS * np.log(128.0)) / (DIMS * np.log(2.0)))
    # after one epoch t_x is still near 0, its best value well above: the refit lowers the bound
    assert result["fitted_log_precision"] > result["log_precision"]
    assert result["bits_per_dim_fitted_t_x"] < result["bits_per_dim"]


@pytest.mark.slow
def test_sampled_reconstruction_error_is_g_of_e_x_error_without_posterior_noise(
        tiny_run, tmp_path, monkeypatch):  # noqa: F811
    """With the noise scale exp(s_u) ~ 0, v = E(x): evaluate's sampled_reconstruction_rmse
    (read back from the loss, on dequantised pixels) and reconstruction_rmse (G(E(x)) rounded
    to 0..255 against the integer pixels) measure the same error, up to the half-level
    differences between the two pixel scalings and the rounding."""
    _, trained = tiny_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _, model = face_runs.load_run(f_vaes.FVAE_RUNS, str(run))
    model.log_noise_scale.assign(-30.0)
    model.save_weights(str(run / "best.weights.h5"))
    monkeypatch.setattr(face_runs, "dequantise", lambda x: (tf.round(x) + 0.5) / 128.0 - 1.0)
    assert f_vaes.main(["evaluate", "--out", str(run)]) == 0
    result = json.loads((run / "evaluate.json").read_text())
    assert result["reconstruction_rmse"] > 5  # an error well above the tolerance
    assert result["sampled_reconstruction_rmse"] == pytest.approx(result["reconstruction_rmse"],
                                                                  abs=1.0)
