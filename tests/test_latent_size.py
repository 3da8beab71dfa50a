"""The dimension-reducing f-VAE (issue 18): `--latent-channels C` gives h = E(x), v and the
flow's input S/8 x S/8 x C; the loss keeps the D image numbers (reconstruction, bits/dim)
apart from the d latent numbers (prior, posterior entropy, noise scale); C = 192 is the
paper's model exactly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from test_f_vaes import TINY, TINY_FLAGS, randomise, smooth_images, tiny_model
from test_same_weights import write_pictures
import f_vaes
from f_vaes import FVAE
from layers import MultiScaleFlow


def reduced_model(channels, seed=0):
    return tiny_model(seed, latent_channels=channels)


def gaussian_log_density(x, mean, std):
    """log N(x; mean, std^2) summed over all but the first axis (numpy, float64)."""
    x, mean = np.asarray(x, np.float64), np.asarray(mean, np.float64)
    per_number = -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return per_number.reshape(len(x), -1).sum(axis=1)


@pytest.mark.parametrize("channels", [12, 48])
def test_loss_with_a_smaller_latent_is_the_general_posterior_loss(channels):
    """Paper eq. 6 computed here from densities: -log q(x|z) - log q(z) + log p(z|x), with
    p(v|x) = N(E(x), exp(s_u)^2) over the d latent numbers and z = F(v); its log-density is
    log p(v|x) - flow_logdet. A D in place of d (or the reverse) in any term would differ."""
    model = reduced_model(channels)
    x = smooth_images(3, 16, seed=2)
    u = np.random.RandomState(6).randn(3, 2, 2, channels).astype("float32")
    parts = {k: v.numpy() for k, v in model.loss_parts(x, noise=u).items()}

    h = model.encoder(x).numpy()
    v = np.exp(-0.7) * u + h
    z, flow_logdet = (t.numpy() for t in model.flow(v))
    g = model.decoder(v).numpy()
    log_likelihood = gaussian_log_density(x, g, np.exp(-0.3))            # over D numbers
    log_prior = gaussian_log_density(z, 0.0, 1.0)                       # over d numbers
    log_posterior = gaussian_log_density(v, h, np.exp(-0.7)) - flow_logdet
    expected = -log_likelihood - log_prior + log_posterior
    assert z.shape == (3, 2 * 2 * channels) and u[0].size == 2 * 2 * channels
    np.testing.assert_allclose(parts["loss"], expected, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(parts["recon"], -log_likelihood, rtol=1e-5, atol=1e-2)
    dims = 16 * 16 * 3  # bits/dim per image number, whatever the latent size
    np.testing.assert_allclose(parts["bits_per_dim"],
                               (expected + dims * np.log(128)) / (dims * np.log(2)), rtol=1e-5)


@pytest.mark.slow
def test_192_channels_is_the_papers_model():
    paper, explicit = FVAE(seed=3, **TINY), FVAE(seed=3, latent_channels=192, **TINY)
    for model in (paper, explicit):
        model(np.zeros((1, 16, 16, 3), "float32"))
    # the same variables in the same order (tests/test_same_weights.py trains the default
    # model to the weights recorded before the flag existed, by name)
    assert [w.shape for w in paper.weights] == [w.shape for w in explicit.weights]
    assert not [layer for layer in paper.encoder.layers if layer.name == "to_latent"]
    smaller = FVAE(seed=3, latent_channels=48, **TINY)
    smaller(np.zeros((1, 16, 16, 3), "float32"))
    assert smaller.encoder.output.shape[1:] == (2, 2, 48) and smaller.latent_dims == 192


@pytest.mark.parametrize("channels", [2, 12, 96])
def test_flow_inverts_at_a_smaller_latent(channels):
    flow = MultiScaleFlow((2, 2, channels), level=2, depth=2, width=8, seed=1)
    v = np.random.RandomState(0).randn(4, 2, 2, channels).astype("float32")
    flow(v)
    randomise(flow.trainable_weights, seed=2)
    z, _ = flow(v)
    assert z.shape == (4, 4 * channels)
    np.testing.assert_allclose(flow.inverse(z).numpy(), v, atol=1e-4)


@pytest.mark.parametrize("value", ["13", "0", "-4"])
@pytest.mark.slow
def test_an_invalid_latent_size_is_a_one_line_error(value, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "f_vaes.py"), *TINY_FLAGS,
                             "--latent-channels", value, "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--latent-channels {value}: must be an even number >= 2" in result.stderr
    assert "192, 96, 48 or 12" in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_command_works_with_a_smaller_latent(tmp_path):
    pictures = write_pictures(str(tmp_path / "pictures"), n=12)
    run = str(tmp_path / "run")
    assert f_vaes.main([*TINY_FLAGS, "--latent-channels", "12", "--epochs", "1", "--holdout",
                        "4", "--seed", "2", "--data-dir", pictures, "--out", run]) == 0
    assert json.load(open(os.path.join(run, "config.json")))["latent_channels"] == 12
    for argv in (["sample", "--rows", "2", "--cols", "2"], ["reconstruct", "--rows", "1"],
                 ["interpolate", "--rows", "1", "--cols", "3"], ["sweep", "--rows", "1"],
                 ["evaluate"], ["encode", "--folder", pictures, "--dest", str(tmp_path / "z")]):
        assert f_vaes.main([*argv, "--out", run]) == 0, argv
    assert np.load(tmp_path / "z.npy").shape == (12, 2 * 2 * 12)
    evaluated = json.load(open(os.path.join(run, "evaluate.json")))
    assert np.isfinite(evaluated["bits_per_dim"]) and evaluated["images"] == 4
    model = f_vaes.FVAE.from_run(run)
    assert model.sample(2, 0.5).shape == (2, 16, 16, 3)
