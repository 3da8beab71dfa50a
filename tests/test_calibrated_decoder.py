"""`--decoder-scale calibrated` (the sigma-VAE's decoder, Rybkin et al. 2021): the loss is the
learnt loss at t_x* = -1/2 ln(mean squared residual of the batch), where the loss's derivative
in t_x is zero; the training step keeps t_x* in the weight (so evaluate scores at a fixed
t_x) and trains nothing through it; the default run is the author's; a run keeps its
decoder scale when it resumes."""

import json

import numpy as np
import pytest
import keras
import tensorflow as tf
from keras import ops

import f_vaes
from f_vaes import FVAE, calibrated_log_precision, fvae_loss
from test_f_vaes import TINY, TINY_FLAGS, randomise, read_log, smooth_images, write_image_folder

DIMS = 16 * 16 * 3


def tiny_pair(posterior="flow"):
    """A learnt and a calibrated tiny model with the same weights (every part acting)."""
    models = []
    for scale in ("learnt", "calibrated"):
        keras.utils.set_random_seed(0)
        model = FVAE(seed=0, posterior=posterior, decoder_scale=scale, **TINY)
        model(np.zeros((1, 16, 16, 3), "float32"))
        randomise(model.flow.trainable_weights, seed=0)
        randomise(model.decoder.trainable_weights, 0.02, 1)
        model.log_noise_scale.assign(-0.7)
        models.append(model)
    for mine, theirs in zip(models[1].encoder.weights + models[1].decoder.weights,
                            models[0].encoder.weights + models[0].decoder.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    return models


def batch_and_noise(n=4):
    x = smooth_images(n, 16, seed=5)
    return x, np.random.RandomState(6).randn(n, 2, 2, 192).astype("float32")


def numpy_fitted_log_precision(model, x, u):
    """t_x* in float64 from the sampled reconstruction G(exp(s_u) u + E(x)) of a training step
    (batch normalisation on the batch's statistics)."""
    h = ops.convert_to_numpy(model.encoder(x, training=True))
    v = np.exp(float(model.log_noise_scale.numpy())) * u + h
    residual = ops.convert_to_numpy(model.decoder(v, training=True)).astype(np.float64) - x
    return -0.5 * np.log(np.mean(residual ** 2))


@pytest.mark.parametrize("posterior", ["flow", "gaussian"])
def test_calibrated_loss_is_the_learnt_loss_at_the_batch_optimum(posterior):
    learnt, calibrated = tiny_pair(posterior)
    x, u = batch_and_noise()
    fitted = numpy_fitted_log_precision(learnt, x, u)
    assert abs(fitted) > 0.5  # far from the initial t_x = 0: a test that could fail
    found = calibrated.loss_parts(x, training=True, noise=u)
    assert float(calibrated.log_precision.numpy()) == pytest.approx(fitted, abs=1e-5)
    learnt.log_precision.assign(fitted)
    expected = learnt.loss_parts(x, training=True, noise=u)
    for name in ("loss", "recon", "prior", "entropy"):
        np.testing.assert_allclose(found[name], expected[name], rtol=1e-5, atol=1e-2)


def test_without_training_a_calibrated_model_scores_at_its_kept_t_x():
    """Evaluation (training=False) uses the t_x of the last training step, not one fitted on
    the images it scores: the held-out bound is a bound at one fixed t_x."""
    _, calibrated = tiny_pair()
    x, u = batch_and_noise()
    calibrated.log_precision.assign(0.25)
    parts = calibrated.loss_parts(x, training=False, noise=u)
    assert float(calibrated.log_precision.numpy()) == pytest.approx(0.25)
    dims_term = 0.5 * np.log(2 * np.pi) * DIMS - DIMS * 0.25
    np.testing.assert_allclose(parts["recon"], 0.5 * np.exp(0.5) * ops.convert_to_numpy(
        parts["squared_error"]) + dims_term, rtol=1e-5)


def test_at_the_calibrated_t_x_the_loss_does_not_change_with_t_x():
    """d(mean loss)/d t_x = 0 at t_x*, so no gradient needs to flow through t_x*; at t_x* +- 0.1
    the derivative is clearly not zero (the test could fail)."""
    learnt, _ = tiny_pair()
    x, u = batch_and_noise()
    fitted = numpy_fitted_log_precision(learnt, x, u)

    def slope(t):
        learnt.log_precision.assign(t)
        with tf.GradientTape() as tape:
            loss = ops.mean(learnt.loss_parts(x, training=True, noise=u)["loss"])
        return float(tape.gradient(loss, learnt.log_precision))

    assert abs(slope(fitted)) < 1e-3 * DIMS * 1e-2
    assert abs(slope(fitted + 0.1)) > 0.1 * DIMS and abs(slope(fitted - 0.1)) > 0.1 * DIMS


def test_calibration_adds_nothing_to_the_other_weights_gradients():
    """The envelope theorem, checked: the gradient of the encoder's and decoder's weights with
    t_x* held constant equals the gradient with t_x* differentiated through."""
    learnt, _ = tiny_pair()
    x, u = batch_and_noise()
    weights = learnt.encoder.trainable_weights + learnt.decoder.trainable_weights

    def gradients(through):
        with tf.GradientTape() as tape:
            h = learnt.encoder(x)
            reconstruction = learnt.decoder(np.exp(-0.7) * u + h)
            t = -0.5 * ops.log(ops.mean(ops.square(reconstruction - x)))
            t = t if through else calibrated_log_precision(x, reconstruction)
            z, logdet = learnt.flow(np.exp(-0.7) * u + h)
            loss = ops.mean(fvae_loss(x, reconstruction, u, z, logdet, t,
                                      learnt.log_noise_scale)["loss"])
        return tape.gradient(loss, weights)

    for held, through in zip(gradients(False), gradients(True)):
        np.testing.assert_allclose(held, through, rtol=1e-3, atol=1e-4 * float(np.abs(through).max()))


def test_a_calibrated_training_step_keeps_t_x_star_and_trains_no_t_x():
    _, calibrated = tiny_pair()
    calibrated.compile(optimizer="adam")
    x, _ = batch_and_noise(8)
    assert "log_precision" not in [w.name for w in calibrated.trainable_weights]
    calibrated.fit(x, batch_size=8, epochs=1, verbose=0)
    t_x = float(calibrated.log_precision.numpy())
    assert t_x > 0.5  # set from the batch's residuals (it starts at 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    data = tmp_path_factory.mktemp("calibrated") / "faces"
    write_image_folder(data)
    return data


def train(folder, run, *flags, epochs=1):
    argv = TINY_FLAGS + ["--data-dir", str(folder), "--out", str(run), "--epochs", str(epochs),
                         "--holdout", "2", "--seed", "3", *flags]
    with pytest.warns(UserWarning, match="a_broken.png"):
        return f_vaes.main(argv)


@pytest.mark.slow
def test_calibrated_run_trains_logs_resumes_and_evaluates(folder, tmp_path):
    run = tmp_path / "run"
    assert train(folder, run, "--decoder-scale", "calibrated") == 0
    assert train(folder, run, "--decoder-scale", "calibrated", epochs=2) == 0
    rows = read_log(run)
    assert len(rows) == 2 and all(float(r["log_precision"]) > 0.3 for r in rows)
    assert f_vaes.main(["evaluate", "--out", str(run), "--weights", "latest"]) == 0
    result = json.loads((run / "evaluate.json").read_text())
    assert result["log_precision"] == pytest.approx(float(rows[-1]["log_precision"]), abs=1e-5)
    assert np.isfinite(result["bits_per_dim"]) and np.isfinite(result["bits_per_dim_fitted_t_x"])


@pytest.mark.parametrize("first, then", [((), ("--decoder-scale", "calibrated")),
                                         (("--decoder-scale", "calibrated"), ())])
@pytest.mark.slow
def test_a_run_resumes_only_with_its_own_decoder_scale(folder, tmp_path, first, then, capsys):
    run = tmp_path / "run"
    assert train(folder, run, *first) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        f_vaes.main(TINY_FLAGS + ["--data-dir", str(folder), "--out", str(run), "--epochs", "2",
                                  "--holdout", "2", "--seed", "3", *then])
    assert "--decoder-scale" in capsys.readouterr().err
    assert len(read_log(run)) == 1


@pytest.mark.slow
def test_a_run_saved_before_the_flag_existed_is_a_learnt_one(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(folder, run) == 0
    config = json.loads((run / "config.json").read_text())
    del config["decoder_scale"]
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        f_vaes.main(TINY_FLAGS + ["--data-dir", str(folder), "--out", str(run), "--epochs", "2",
                                  "--holdout", "2", "--seed", "3", "--decoder-scale", "calibrated"])
    assert "--decoder-scale" in capsys.readouterr().err
    assert train(folder, run, epochs=2) == 0
