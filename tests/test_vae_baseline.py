"""The f-VAE paper's VAE baseline (`--posterior gaussian`, issue 12): the same encoder and
decoder, the posterior N(E(x), diag(sigma(x)^2)) instead of the flow; its loss is the
Gaussian VAE's (reconstruction + analytic KL, in expectation); and the importance-weighted
bound of `evaluate --samples K` (K = 1 is the ELBO; it does not grow with K on average)."""

import json
import os

import numpy as np
import pytest

from test_f_vaes import TINY, TINY_FLAGS, randomise, smooth_images
from test_latent_size import gaussian_log_density
from test_same_weights import write_pictures
import f_vaes
import face_runs
from f_vaes import FVAE
from training.monitor import count_parameters


def tiny_vae(seed=0):
    model = FVAE(seed=seed, posterior="gaussian", **TINY)
    model(np.zeros((1, 16, 16, 3), "float32"))
    randomise(model.decoder.trainable_weights, 0.02, seed + 1)
    model.log_scale_head.kernel.assign(
        0.05 * np.random.RandomState(seed).randn(*model.log_scale_head.kernel.shape))
    model.log_precision.assign(0.3)
    model.log_noise_scale.assign(-0.7)
    return model


def test_vae_loss_is_reconstruction_plus_the_analytic_kl():
    model = tiny_vae()
    x = smooth_images(2, 16, seed=3)
    h = model.encoder(x).numpy().astype(np.float64)
    sigma = np.exp(-0.7 + model.log_scale_head(h.astype("float32")).numpy().astype(np.float64))
    assert sigma.std() > 0.01  # sigma(x) varies with x and position
    kl = (0.5 * (sigma ** 2 + h ** 2 - 1) - np.log(sigma)).reshape(2, -1).sum(1)

    draws = 1500
    rng = np.random.RandomState(7)
    gaps = []
    for _ in range(draws // 50):
        u = rng.randn(50, *h.shape).astype("float32")
        for i in range(2):
            parts = model.loss_parts(np.repeat(x[i:i + 1], 50, 0), noise=u[:, i])
            v = np.exp(np.log(sigma[i])) * u[:, i] + h[i]
            g = model.decoder(v.astype("float32")).numpy()
            recon = -gaussian_log_density(np.repeat(x[i:i + 1], 50, 0), g, np.exp(-0.3))
            np.testing.assert_allclose(parts["recon"].numpy(), recon, rtol=1e-5, atol=1e-2)
            gaps.append(parts["loss"].numpy() - parts["recon"].numpy() - kl[i])
    gaps = np.concatenate(gaps)
    # one draw's prior + entropy is an unbiased estimate of the KL: its mean over the draws
    assert abs(gaps.mean()) < 4 * gaps.std() / np.sqrt(len(gaps)) + 1e-3, (gaps.mean(), gaps.std())


def test_vae_has_the_f_vaes_encoder_and_decoder_and_a_scale_head():
    config = f_vaes.Config(img_size=64, seed=0, posterior="gaussian")
    model = f_vaes.build_model(config)
    count = count_parameters
    assert count(model.encoder.trainable_weights) == count(model.decoder.trainable_weights) \
        == 4_729_536
    assert count(model.trainable_weights) == 2 * 4_729_536 + 2 + 192 * 192 + 192


def test_iwae_bound_with_one_sample_is_the_elbo_and_does_not_grow_with_k():
    losses = np.random.RandomState(0).normal(100.0, 5.0, (1, 7))
    np.testing.assert_allclose(face_runs.iwae_bound(losses), losses[0])
    # by hand: -log mean exp(-loss) of two samples
    np.testing.assert_allclose(face_runs.iwae_bound([[1.0], [3.0]]),
                               [-np.log((np.exp(-1.0) + np.exp(-3.0)) / 2)])
    model = tiny_vae(seed=2)
    x = smooth_images(32, 16, seed=5)
    bounds = {}
    for k in (1, 4, 32):
        draws = np.stack([model.loss_parts(x)["loss"].numpy() for _ in range(k)])
        bounds[k] = face_runs.iwae_bound(draws).mean()
    assert bounds[1] >= bounds[4] >= bounds[32], bounds


@pytest.mark.slow
def test_vae_trains_and_evaluates_with_k_samples_through_the_command_line(tmp_path):
    pictures = write_pictures(str(tmp_path / "pictures"), n=12)
    run = str(tmp_path / "vae")
    assert f_vaes.main([*TINY_FLAGS, "--posterior", "gaussian", "--epochs", "1", "--holdout",
                        "4", "--seed", "1", "--data-dir", pictures, "--out", run]) == 0
    assert json.load(open(os.path.join(run, "config.json")))["posterior"] == "gaussian"
    results = {}
    for k in ("1", "16"):
        assert f_vaes.main(["evaluate", "--out", run, "--samples", k]) == 0
        results[k] = json.load(open(os.path.join(run, "evaluate.json")))
        assert results[k]["samples"] == int(k) and results[k]["images"] == 4
    assert results["16"]["loss"] <= results["1"]["loss"] + 1.0
    assert f_vaes.main(["sample", "--out", run, "--rows", "2", "--cols", "2"]) == 0
