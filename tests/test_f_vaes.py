"""Tests of f_vaes.py: the loss, the flow, the VAE special case, training, resuming, the CLI."""

import csv
import json
import math
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
import keras

from conftest import ROOT, SHARED_DATA
import common
import image_files
import datasets
import training.checkpoint
import f_vaes
import face_runs
from f_vaes import FVAE, Config, fvae_loss, general_posterior_loss
from layers import MultiScaleFlow

TINY = dict(img_size=16, level=2, depth=1, res_steps=1, coupling_width=8)
TINY_FLAGS = ["--img-size", "16", "--level", "2", "--depth", "1", "--res-steps", "1",
              "--coupling-width", "8", "--batch-size", "4", "--steps-per-epoch", "3"]


def randomise(weights, scale=0.1, seed=0):
    """Give zero-initialised weights (ActNorm, CondActNorm, last coupling conv) random values,
    so that every part of the flow does something."""
    rng = np.random.RandomState(seed)
    for w in weights:
        if not np.any(w.numpy()):
            w.assign(scale * rng.randn(*w.shape).astype("float32"))


def tiny_flow(shape=(4, 4, 4), level=2, depth=2, width=8, seed=0):
    flow = MultiScaleFlow(shape, level, depth, width, seed)
    flow(np.zeros((1, *shape), "float32"))
    randomise(flow.trainable_weights, seed=seed)
    return flow


def tiny_model(seed=0, **options):
    """The tiny f-VAE (or with `options`, e.g. latent_channels) with every part made to act."""
    model = FVAE(seed=seed, **TINY, **options)
    model(np.zeros((1, 16, 16, 3), "float32"))
    randomise(model.flow.trainable_weights, seed=seed)
    randomise(model.decoder.trainable_weights, 0.02, seed + 1)
    model.log_precision.assign(0.3)
    model.log_noise_scale.assign(-0.7)
    return model


def smooth_images(n, size, seed=0):
    """Images in [-1, 1] with some spatial structure (blurred noise), like faces are not."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(-0.8, 0.8, (n, size // 4, size // 4, 3)).astype("float32")
    return np.asarray(tf.image.resize(coarse, (size, size), method="bilinear"))


# --------------------------------------------------------------------------- the flow

def test_inverse_undoes_forward():
    flow = tiny_flow()
    v = np.random.RandomState(1).randn(3, 4, 4, 4).astype("float32")
    z, _ = flow(v)
    assert z.shape == (3, 64)
    np.testing.assert_allclose(flow.inverse(z), v, atol=1e-4)
    z_prior = np.random.RandomState(2).randn(3, 64).astype("float32")
    np.testing.assert_allclose(flow(flow.inverse(z_prior))[0], z_prior, atol=1e-4)


def test_logdet_matches_autodiff_jacobian():
    flow = tiny_flow()
    v = tf.constant(np.random.RandomState(3).randn(1, 4, 4, 4).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(v)
        z, logdet = flow(v)
    jacobian = tape.jacobian(z, v).numpy().reshape(64, 64).astype("float64")
    sign, log_abs_det = np.linalg.slogdet(jacobian)
    assert sign != 0 and abs(float(logdet[0])) > 0.1  # the weights really were randomised
    np.testing.assert_allclose(float(logdet[0]), log_abs_det, atol=2e-3)


def test_model_invertible_end_to_end_at_64():
    """The real flow at 64x64: v -> z has 12288 numbers and z -> v -> z comes back, with
    weights moved far enough that the flow is far from the identity it starts as."""
    flow = MultiScaleFlow((8, 8, 192), level=4, depth=1, width=16, seed=0)
    v = np.random.RandomState(0).randn(2, 8, 8, 192).astype("float32")
    z_at_init, _ = flow(v)  # a permutation of v
    randomise(flow.trainable_weights, 0.03, seed=1)
    z, logdet = flow(v)
    assert z.shape == (2, 64 * 64 * 3) and flow.part_sizes == [6144, 3072, 1536, 1536]
    assert np.linalg.norm(z - z_at_init) > np.linalg.norm(z_at_init)  # moved more than |z|
    assert np.all(np.abs(logdet) > 100)  # volumes change by more than e^100
    np.testing.assert_allclose(flow.inverse(z), v, atol=1e-3)


def space_to_depth(x, times):
    for _ in range(times):
        x = tf.nn.space_to_depth(x, 2)
    return np.asarray(x)


def depth_to_space(x, times):
    for _ in range(times):
        x = tf.nn.depth_to_space(x, 2)
    return np.asarray(x)


def test_at_init_encoder_is_three_squeezes_and_decoder_tanh_of_three_unsqueezes():
    """docs/model.md, "The f-VAE", "Initialisation": every residual step ends in a
    zero-initialised 1x1 conv, so at init E(x) is three space-to-depth squeezes of x and
    G(v) = tanh(three depth-to-space of v), in training and inference mode alike; t_x and
    s_u start at 0."""
    model = f_vaes.build_model(Config(seed=0, **dict(TINY, res_steps=2)))
    rng = np.random.RandomState(10)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    v = 2 * rng.randn(2, 2, 2, 192).astype("float32")  # large: tanh is far from linear here
    for training in (False, True):
        np.testing.assert_allclose(model.encoder(x, training=training), space_to_depth(x, 3),
                                   atol=1e-6)
        np.testing.assert_allclose(model.decoder(v, training=training),
                                   np.tanh(depth_to_space(v, 3)), atol=1e-6)
    assert float(model.log_precision) == 0.0 and float(model.log_noise_scale) == 0.0


def test_a_weight_path_tells_the_encoder_from_the_decoder():
    """E's and G's residual steps are named after their network (encoder_block0_res0,
    decoder_block0_res0), so that every weight path (TensorBoard's histograms, a debugger)
    is the model's once; weights files do not store these names (Keras keys them by class),
    so files saved under the old shared names load (tests/test_runs_before_redesign.py,
    tests/test_run_before_live_weights.py)."""
    model = tiny_model()
    paths = [w.path for w in model.weights]
    assert len(paths) == len(set(paths))
    assert all(w.path.startswith("encoder_") for w in model.encoder.weights
               if "res" in w.path), [w.path for w in model.encoder.weights][:4]
    assert all(w.path.startswith("decoder_") for w in model.decoder.weights
               if "res" in w.path), [w.path for w in model.decoder.weights][:4]


def test_at_init_the_flow_only_permutes_and_its_logdet_is_zero():
    """ActNorm, CondActNorm and the coupling's last conv start at zero: F(v) is a
    rearrangement of v's numbers (the permutations, splits and squeezes) and log|det| = 0."""
    flow = MultiScaleFlow((4, 4, 8), level=2, depth=2, width=8, seed=0)
    v = np.random.RandomState(11).randn(3, 4, 4, 8).astype("float32")
    z, logdet = flow(v)
    np.testing.assert_array_equal(logdet, np.zeros(3))
    np.testing.assert_array_equal(np.sort(np.asarray(z), axis=1), np.sort(v.reshape(3, -1), axis=1))
    assert not np.array_equal(np.asarray(z), v.reshape(3, -1))  # rearranged, not the identity


# --------------------------------------------------------------------------- the loss

def test_loss_matches_hand_computation():
    model = tiny_model()
    x = smooth_images(2, 16)
    u = np.random.RandomState(4).randn(2, 2, 2, 192).astype("float32")
    parts = {k: v.numpy() for k, v in model.loss_parts(x, noise=u).items()}

    t_x, s_u, dims = 0.3, -0.7, 16 * 16 * 3
    h = model.encoder(x).numpy()
    v = np.exp(s_u) * u + h
    g = model.decoder(v).numpy()
    z, logdet = (t.numpy() for t in model.flow(v))
    recon = (0.5 * ((np.exp(t_x) * (g - x)) ** 2).sum(axis=(1, 2, 3))
             + 0.5 * np.log(2 * np.pi) * dims - dims * t_x)
    prior = 0.5 * (z ** 2).sum(axis=1)
    entropy = -0.5 * (u ** 2).sum(axis=(1, 2, 3)) - dims * s_u
    loss = recon + prior + entropy - logdet
    for name, value in dict(recon=recon, prior=prior, entropy=entropy, flow_logdet=logdet,
                            loss=loss).items():
        np.testing.assert_allclose(parts[name], value, rtol=1e-5, atol=1e-2, err_msg=name)
    np.testing.assert_allclose(parts["bits_per_dim"],
                               (loss + dims * np.log(128)) / (dims * np.log(2)), rtol=1e-5)


def test_loss_is_the_general_posterior_loss_of_the_fvae():
    """Paper eq. 6 with F_x(u) = F(exp(s_u) u + E(x)): log|det dF_x/du| = flow_logdet + D s_u."""
    model = tiny_model(seed=1)
    x = smooth_images(2, 16, seed=1)
    u = np.random.RandomState(5).randn(2, 2, 2, 192).astype("float32")
    parts = model.loss_parts(x, noise=u)
    v = np.exp(-0.7) * u + model.encoder(x).numpy()
    z, logdet = model.flow(v)
    general = general_posterior_loss(-parts["recon"], z, u, logdet + 16 * 16 * 3 * -0.7)
    np.testing.assert_allclose(general, parts["loss"], rtol=1e-5, atol=1e-2)


def gaussian_log_density(x, mean, std):
    return (-0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(axis=-1)


def test_loss_is_negative_elbo_with_all_constants():
    """With F = identity, -log N(x; G, e^-t) + log N(v; h, e^s) - log N(v; 0, I), every constant
    kept, equals the loss of docs/model.md: the constants it drops cancel (basis of the
    bits/dim claim)."""
    rng = np.random.RandomState(6)
    dims, t_x, s_u = 12, np.float64(0.4), np.float64(-1.1)
    x, g, h, u = (rng.randn(5, dims) for _ in range(4))
    v = h + np.exp(s_u) * u
    elbo_terms = (-gaussian_log_density(x, g, np.exp(-t_x)) + gaussian_log_density(v, h, np.exp(s_u))
                  - gaussian_log_density(v, 0.0, 1.0))
    parts = fvae_loss(x, g, u, v, np.zeros(5), t_x, s_u)
    np.testing.assert_allclose(parts["loss"], elbo_terms, rtol=1e-10)


def test_reduces_to_standard_vae():
    """F_x(u) = mu + sigma*u: the general loss minus the reconstruction, averaged over u, is
    KL(N(mu, sigma^2) || N(0, I)) - exactly, for a set of u with mean 0 and second moment 1
    per dimension (the loss is quadratic in u)."""
    rng = np.random.RandomState(7)
    dims, n = 6, 64
    mu, log_sigma = rng.randn(dims), 0.5 * rng.randn(dims)
    u = rng.randn(n // 2, dims)
    u = np.concatenate([u, -u])                  # mean exactly 0
    u = u / np.sqrt((u ** 2).mean(axis=0))       # second moment exactly 1
    z = mu + np.exp(log_sigma) * u
    per_sample = general_posterior_loss(np.zeros(n), z, u, np.full(n, log_sigma.sum()))
    kl = 0.5 * (mu ** 2 + np.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum()
    np.testing.assert_allclose(np.mean(per_sample), kl, rtol=1e-10)

    # the script's loss with F = identity and a scalar sigma = exp(s_u) is that same VAE loss
    s_u, t_x = np.float64(-0.3), np.float64(0.2)
    x, g = rng.randn(n, dims), rng.randn(n, dims)
    z = mu + np.exp(s_u) * u
    parts = fvae_loss(x, g, u, z, np.zeros(n), t_x, s_u)
    kl = 0.5 * (mu ** 2 + np.exp(2 * s_u) - 1 - 2 * s_u).sum()
    np.testing.assert_allclose(np.mean(parts["loss"] - parts["recon"]), kl, rtol=1e-10)
    np.testing.assert_allclose(parts["recon"], -gaussian_log_density(x, g, np.exp(-t_x)))


def test_reduces_to_a_plain_flow_on_noise_augmented_inputs():
    """The paper's second special case (docs/model.md, "The f-VAE"): F_x(u) = F(sigma*u + x)
    with an unconditional flow F and the decoder q(x|z) = N(x; F^-1(z), sigma^2). The general
    loss is then the negative log-likelihood of F on y = x + sigma*u,
    0.5*|F(y)|^2 + 0.5*D*log(2pi) - log|det dF/dy|, for every u (the decoder's and the
    posterior's terms in u and sigma cancel)."""
    flow = tiny_flow(seed=2)
    rng = np.random.RandomState(12)
    sigma, dims = 0.05, 4 * 4 * 4
    x = rng.uniform(-1, 1, (2, 4, 4, 4)).astype("float32")
    u = tf.constant(rng.randn(2, 4, 4, 4).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(u)
        y = x + sigma * u
        z, _ = flow(y)
    for i in range(2):  # log|det| by autodiff: of F at y (the flow), and of F_x at u (the posterior)
        d_dy = tape.batch_jacobian(z, y).numpy()[i].reshape(dims, dims).astype("float64")
        d_du = tape.batch_jacobian(z, u).numpy()[i].reshape(dims, dims).astype("float64")
        flow_nll = (0.5 * np.sum(np.square(z[i].numpy(), dtype="float64"))
                    + 0.5 * dims * np.log(2 * np.pi) - np.linalg.slogdet(d_dy)[1])
        decoder = gaussian_log_density(x[i].ravel(), y[i].numpy().ravel(), sigma)
        general = general_posterior_loss(np.array([decoder]), z[i:i + 1], u[i:i + 1],
                                         np.array([np.linalg.slogdet(d_du)[1]], "float32"))
        assert abs(flow_nll) > 10  # not a trivial zero
        np.testing.assert_allclose(float(general[0]), flow_nll, rtol=1e-5, atol=2e-3)


def test_bits_per_dim_convention():
    """A uniform density on [-1, 1]^D (nll = D log 2 nats) is 8 bits/dim of 8-bit data."""
    dims = 48
    assert face_runs.bits_per_dim(dims * math.log(2.0), dims) == pytest.approx(8.0)
    x = np.array([0.0, 127.0, 255.0])
    y = face_runs.dequantise(tf.constant(x)).numpy()
    assert np.all(y > -1) and np.all(y < 1) and np.all((y + 1) / 2 * 256 - x >= 0)
    assert np.all((y + 1) / 2 * 256 - x < 1)


# --------------------------------------------------------------------------- sampling

class RecordingModel:
    """Stands in for an FVAE in the picture code: records every z given to `generate`."""

    img_size = 16
    latent_dims = 16 * 16 * 3  # d = D: the paper's latent size

    def __init__(self):
        self.latents = []

    def generate(self, flow_latent):
        self.latents.append(np.array(flow_latent))
        return np.zeros((len(flow_latent), 16, 16, 3), "float32")

    def drawn(self):
        latents, self.latents = np.concatenate(self.latents), []
        return latents


def test_sampling_scales_noise_by_temperature():
    """z ~ N(0, T^2 I): each z has the spread T (and is Gaussian), and a lower T scales the same
    noise (the author's annealing, docs/model.md: T = 0 gives the mode, every z = 0)."""
    model = RecordingModel()
    drawn = {}
    for t in (1.0, 0.8, 0.5, 0.0):
        images = face_runs.sample_images(model, 100, t, seed=3)
        drawn[t] = model.drawn()
        assert images.shape == (100, 16, 16, 3) and drawn[t].shape == (100, 16 * 16 * 3)
    for t in (1.0, 0.8, 0.5):
        z = drawn[t].astype("float64")
        assert abs(z.mean()) < 0.02 * t and abs(z.std() - t) < 0.01 * t, (t, z.mean(), z.std())
        assert abs(np.mean(np.abs(z) < t) - 0.6827) < 0.01  # Gaussian, not some other shape
        np.testing.assert_allclose(drawn[t], t * drawn[1.0], rtol=1e-6)
    np.testing.assert_array_equal(drawn[0.0], 0.0)
    face_runs.sample_images(model, 100, 1.0, seed=4)
    assert not np.allclose(model.drawn(), drawn[1.0])  # another seed, another draw


def test_sweep_rows_share_one_noise_and_columns_scale_it(tmp_path):
    """`sweep`: one row per noise draw, one column per temperature, z = T * eps with eps fixed
    per row and independent across rows."""
    model = RecordingModel()
    args = face_runs.parse_args(f_vaes.FVAE_RUNS, ["sweep", "--out", str(tmp_path), "--rows", "3",
                                                    "--sweep", "0,0.5,1.0,2.0"])
    face_runs.command_sweep(args, Config(img_size=16), model)
    z = model.drawn().reshape(3, 4, 16 * 16 * 3)
    np.testing.assert_array_equal(z[:, 0], 0.0)
    for column, t in enumerate((0.5, 1.0, 2.0), start=1):
        np.testing.assert_allclose(z[:, column], t * z[:, 2], rtol=1e-6)
    assert abs(z[:, 2].std() - 1.0) < 0.03 and not np.allclose(z[0, 2], z[1, 2])
    assert (tmp_path / "sweep.png").exists()


def test_interpolation_between_samples_starts_and_ends_at_their_noise(tmp_path):
    """`interpolate --between samples`: the ends of each row are the z of `sample` at that seed
    and temperature, the steps between lie on the straight line, and the 4-corner grid is
    bilinear; the pictures get their own names (those of real images are not replaced)."""
    model = RecordingModel()
    args = face_runs.parse_args(f_vaes.FVAE_RUNS, [
        "interpolate", "--out", str(tmp_path), "--rows", "3", "--cols", "5",
        "--between", "samples", "--temperature", "0.8", "--seed", "4"])
    face_runs.command_interpolate(args, Config(img_size=16), model)
    z = model.drawn().reshape(-1, 16 * 16 * 3)
    pairs, grid = z[:15].reshape(3, 5, -1), z[15:].reshape(3, 5, -1)
    ends = face_runs.sample_latents(model, 6, 0.8, seed=4)
    np.testing.assert_array_equal(pairs[:, 0], ends[0::2])
    np.testing.assert_allclose(pairs[:, -1], ends[1::2], atol=1e-6)
    np.testing.assert_allclose(pairs[:, 2], (ends[0::2] + ends[1::2]) / 2, atol=1e-6)
    corners = face_runs.sample_latents(model, 4, 0.8, seed=5)
    np.testing.assert_allclose(grid[[0, 0, -1, -1], [0, -1, 0, -1]], corners, atol=1e-6)
    np.testing.assert_allclose(grid[1, 2], corners.mean(axis=0), atol=1e-6)
    assert abs(ends.std() - 0.8) < 0.02
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interpolate_2_T0.8.png",
                                                         "interpolate_4_T0.8.png"]
    assert face_runs.parse_args(f_vaes.FVAE_RUNS, ["interpolate"]).between == "images"


def test_generate_decodes_the_inverse_flow_and_latent_is_the_flow_of_the_encoding():
    """generate(z) = G(F^-1(z)): for z = F(v), the picture is G(v); latent(x) = F(E(x))."""
    model = tiny_model(seed=3)
    rng = np.random.RandomState(13)
    v = rng.randn(2, 2, 2, 192).astype("float32")
    z, _ = model.flow(v)
    np.testing.assert_allclose(model.generate(z), model.decoder(v), atol=1e-3)  # float32 round-off
    x = smooth_images(2, 16, seed=3)
    np.testing.assert_allclose(model.latent(x), model.flow(model.encoder(x))[0], atol=1e-5)


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("img_size, flow, dead", [(64, "48,622,274", "37,748,736"),
                                                  (128, "86,371,010", None)])
@pytest.mark.slow
def test_parameter_counts_match_spec(img_size, flow, dead):
    """The author's counts at 128x128; at 64x64 the flow's last level runs on 1x1 maps, where
    the 12 couplings keep 1 of the 9 taps of both 3x3 kernels: 12 * 8 * 9 * (768 * 256 +
    256 * 768) = 37,748,736 fewer numbers, which the report names with the author's total."""
    model = f_vaes.build_model(Config(img_size=img_size, seed=0))
    report = "\n".join(f_vaes.parameter_report(model))
    whole = "95,830,082" if dead is None else "58,081,346"
    for expected in ("encoder trainable parameters:        4,729,536",
                     "decoder trainable parameters:        4,729,536",
                     f"flow + 2 scalars trainable:          {flow}",
                     f"whole model trainable:               {whole}",
                     "non-trainable batch-norm statistics: 12,096",
                     "non-trainable permutation indices:   34,560"):
        assert expected in report
    assert 12 * 8 * (768 * 256 + 256 * 768) == 37_748_736
    if dead:
        assert f"also stores {dead} kernel taps" in report and "(95,830,082 in all" in report
    else:
        assert "also stores" not in report
    assert model.encoder.output.shape == (None, img_size // 8, img_size // 8, 192)
    assert model.decoder.output.shape == (None, img_size, img_size, 3)


@pytest.mark.parametrize("size, level", [(60, 4), (32, 4), (96, 4)])
def test_image_size_must_divide(size, level):
    with pytest.raises(common.UsageError, match=r"--img-size %d" % size):
        f_vaes.check_config(Config(img_size=size, level=level))
    f_vaes.check_config(Config(img_size=96, level=3))


@pytest.mark.slow
def test_image_size_error_exits_before_building(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "f_vaes.py"), "--img-size", "60",
                             "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--img-size 60" in result.stderr and "64" in result.stderr
    assert not (tmp_path / "run").exists()


def test_held_out_files_are_the_last_of_the_sorted_list():
    files = [f"{i:03d}.png" for i in range(10)]
    assert face_runs.split_files(files, 3) == (files[:7], files[7:])
    assert face_runs.split_files(files, 0) == (files, [])
    with pytest.raises(common.UsageError, match="--holdout 10"):
        face_runs.split_files(files, 10)


# --------------------------------------------------------------------------- training

def test_training_decreases_loss():
    """A compiled fit lowers the loss and moves the weights of E, G, F and both scalars."""
    keras.utils.set_random_seed(0)
    model = f_vaes.build_model(Config(lr=1e-3, seed=0, **TINY))
    x = smooth_images(8, 16)
    u = np.random.RandomState(8).randn(8, 2, 2, 192).astype("float32")
    parts = {"encoder": model.encoder.trainable_weights, "decoder": model.decoder.trainable_weights,
             "flow": model.flow.trainable_weights,
             "t_x and s_u": [model.log_precision, model.log_noise_scale]}
    initial = {name: [w.numpy() for w in weights] for name, weights in parts.items()}
    before = float(np.mean(model.loss_parts(x, training=True, noise=u)["loss"]))
    history = model.fit(tf.data.Dataset.from_tensors(x).repeat(), steps_per_epoch=20, epochs=1,
                        verbose=0)
    after = float(np.mean(model.loss_parts(x, training=True, noise=u)["loss"]))
    assert after < 0.99 * before, (before, after)  # ~900 nats at the start
    assert set(history.history) >= set(FVAE.LOG_NAMES)
    for name, weights in parts.items():
        changed = [w.numpy() != w0 for w, w0 in zip(weights, initial[name])]
        assert all(c.any() for c in changed), name  # every tensor of every part moved ...
        assert np.mean(np.concatenate([c.ravel() for c in changed])) > 0.5, name  # ... mostly


@pytest.mark.parametrize("part", ["encoder", "decoder", "flow"])
@pytest.mark.slow
def test_training_one_part_alone_lowers_the_loss(part):
    """Each of E, G and F learns by itself: training only that part (everything else frozen,
    the two scalars too, so their easy ~1% cannot count) lowers the loss on a fixed batch
    and noise by more than half a nat in 10 real training steps."""
    keras.utils.set_random_seed(0)
    model = f_vaes.build_model(Config(lr=1e-3, seed=0, **TINY))
    x = tf.constant(smooth_images(8, 16))
    u = np.random.RandomState(8).randn(8, 2, 2, 192).astype("float32")
    for name in ("encoder", "decoder", "flow"):
        getattr(model, name).trainable = name == part
    model.log_precision.trainable = model.log_noise_scale.trainable = False
    frozen = [w.numpy() for w in model.weights if not w.trainable]

    def loss():
        return float(np.mean(model.loss_parts(x, training=True, noise=u)["loss"]))

    before = loss()
    for _ in range(10):
        model.train_step(x)  # eagerly: the same step as fit's, without compiling it again
    assert before - loss() > 0.5, (part, before, loss())
    for w, w0 in zip([w for w in model.weights if not w.trainable], frozen):
        if "moving" not in w.path:  # batch-norm statistics follow the data in training mode
            np.testing.assert_array_equal(w.numpy(), w0, err_msg=w.path)


# --------------------------------------------------------------------------- command line

def write_image_folder(folder):
    """Real PNG/JPEG files of every awkward kind, and one unreadable file (first, in training)."""
    rng = np.random.RandomState(0)
    picture = lambda h, w, c: (rng.uniform(0, 255, (h // 4, w // 4, c)).repeat(4, 0).repeat(4, 1)  # noqa: E731
                               .astype("uint8"))
    folder.mkdir()
    (folder / "a_broken.png").write_text("not an image")
    (folder / "sub").mkdir()
    for i in range(6):
        iio.imwrite(folder / "sub" / f"face{i}.JPG", picture(20, 20, 3))
    iio.imwrite(folder / "grey.png", picture(16, 16, 1)[..., 0])
    iio.imwrite(folder / "rgba.png", picture(16, 16, 4))
    iio.imwrite(folder / "tall.jpeg", picture(24, 16, 3))
    iio.imwrite(folder / "z_held_out_1.png", picture(16, 16, 3))
    iio.imwrite(folder / "z_held_out_2.jpg", picture(32, 32, 3))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of a tiny model trained through the command line on a folder of real files."""
    base = tmp_path_factory.mktemp("fvae")
    data, run = base / "faces", base / "run"
    write_image_folder(data)
    argv = TINY_FLAGS + ["--data-dir", str(data), "--out", str(run), "--epochs", "1",
                         "--holdout", "2", "--seed", "3"]
    with pytest.warns(UserWarning, match="a_broken.png"):
        assert f_vaes.main(argv) == 0
    return argv, run


def read_log(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_training_run_writes_its_outputs(tiny_run):
    _, run = tiny_run
    for name in ("config.json", "state.json", "log.csv", "latest.weights.h5", "best.weights.h5",
                 "samples_T1.0_latest.png", "samples_T0.8_latest.png",
                 "samples/epoch0001_T1.0.png", "samples/epoch0001_T0.8.png"):
        assert (run / name).exists(), name
    assert iio.imread(run / "samples_T1.0_latest.png").shape == (9 * 16, 9 * 16, 3)
    (row,) = read_log(run)
    assert set(row) == {"epoch", *FVAE.LOG_NAMES, "skipped_steps", "learning_rate",
                        "held_out_loss", "held_out_bits_per_dim", "log_precision",
                        "log_noise_scale", "noise_scale"}
    assert row["epoch"] == "1" and row["skipped_steps"] == "0"
    assert json.loads((run / "config.json").read_text())["holdout"] == 2


def test_resumed_run_continues_with_the_same_weights(tiny_run):
    argv, run = tiny_run
    _, trained = face_runs.load_run(f_vaes.FVAE_RUNS, str(run), "latest")
    saved = [w.numpy() for w in trained.weights]
    resumed = f_vaes.build_model(Config(seed=99, lr=1e-4, **TINY))  # other seed: other permutations
    start = training.checkpoint.RunCheckpoint(str(run)).restore(resumed)
    assert start == 1 and int(resumed.optimizer.iterations.numpy()) == 3
    for a, b in zip(saved, [w.numpy() for w in resumed.weights]):
        np.testing.assert_array_equal(a, b)

    # a resumed run with another model is refused, and nothing saved is touched
    before = (run / "config.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        f_vaes.main([a if a != "8" else "16" for a in argv])
    assert exit_info.value.code == 2 and (run / "config.json").read_text() == before

    assert f_vaes.main(argv[:-6] + ["--epochs", "2"] + argv[-4:]) == 0
    assert [row["epoch"] for row in read_log(run)] == ["1", "2"]
    assert json.loads((run / "state.json").read_text())["epochs_done"] == 2
    assert (run / "samples/epoch0002_T1.0.png").exists()


def test_commands_on_a_trained_run(tiny_run, capsys):
    _, run = tiny_run
    out = ["--out", str(run)]
    assert f_vaes.main(["sample"] + out + ["--temperatures", "1.0,0.5"]) == 0
    assert f_vaes.main(["reconstruct"] + out) == 0
    assert f_vaes.main(["interpolate"] + out) == 0
    assert f_vaes.main(["interpolate"] + out + ["--between", "samples", "--rows", "2"]) == 0
    assert f_vaes.main(["sweep"] + out) == 0
    assert f_vaes.main(["evaluate"] + out + ["--weights", "latest"]) == 0
    shapes = {name: iio.imread(run / name).shape[:2] for name in
              ("sample_T1.0.png", "sample_T0.5.png", "reconstruct.png", "reconstruct_pairs.png",
               "interpolate_2.png", "interpolate_4.png", "sweep.png")}
    assert shapes["sample_T0.5.png"] == (144, 144) and shapes["interpolate_4.png"] == (144, 144)
    assert shapes["sweep.png"] == (144, 11 * 16) and shapes["reconstruct_pairs.png"] == (144, 144)
    assert iio.imread(run / "interpolate_2_T0.8.png").shape[:2] == (32, 144)
    printed = capsys.readouterr().out
    assert "evaluated 2 images" in printed and "bits_per_dim" in printed
    result = json.loads((run / "evaluate.json").read_text())
    assert result["images"] == 2 and math.isfinite(result["bits_per_dim"])


def test_evaluate_reports_the_mean_loss_and_its_bits_per_dim(tiny_run, tmp_path, monkeypatch):
    """`evaluate` on five images (batches of 4 and 1): its loss parts are the per-image means of
    the model's loss on the dequantised pixels, and bits/dim is the module docstring's
    (nll + D log 128) / (D log 2) of that mean. The dequantisation noise is replaced by bin
    centres here, so that numpy computes the same inputs; the u noise is replayed by a freshly
    loaded model, whose noise stream starts where evaluate's did."""
    _, run = tiny_run
    pixels = np.random.RandomState(14).randint(0, 256, (5, 16, 16, 3)).astype("uint8")
    (tmp_path / "eval").mkdir()
    for i, image in enumerate(pixels):
        iio.imwrite(tmp_path / "eval" / f"{i}.png", image)
    monkeypatch.setattr(face_runs, "dequantise", lambda x: (tf.round(x) + 0.5) / 128.0 - 1.0)
    assert f_vaes.main(["evaluate", "--out", str(run), "--eval-dir", str(tmp_path / "eval")]) == 0
    result = json.loads((run / "evaluate.json").read_text())

    _, model = face_runs.load_run(f_vaes.FVAE_RUNS, str(run))
    y = ((pixels.astype("float64") + 0.5) / 128.0 - 1.0).astype("float32")
    batches = [model.loss_parts(y[:4]), model.loss_parts(y[4:])]
    dims = 16 * 16 * 3
    expected = {name: np.mean(np.concatenate([np.asarray(b[name], "float64") for b in batches]))
                for name in ("loss", "recon", "prior", "entropy", "flow_logdet")}
    expected["bits_per_dim"] = (expected["loss"] + dims * np.log(128.0)) / (dims * np.log(2.0))
    assert result["images"] == 5
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-5, abs=1e-3), name
    assert 5 < result["bits_per_dim"] < 12  # uniform noise would be 8


def test_best_weights_are_those_of_the_lowest_loss_epoch(tiny_run):
    """best.weights.h5 records the epoch with log.csv's lowest loss, and that loss
    (tests/test_common.py checks the rule on a run whose losses go up and down)."""
    _, run = tiny_run
    losses = [float(row["loss"]) for row in read_log(run)]
    saved = training.checkpoint.weights_attrs(str(run / "best.weights.h5"))
    assert saved["epochs_done"] == int(np.argmin(losses)) + 1
    assert saved["best"] == pytest.approx(min(losses), rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--temperatures", "-0.5"], "temperatures must be numbers >= 0"),
    (["sample", "--temperatures", "hot"], "expected comma-separated numbers"),
])
def test_bad_temperature_is_an_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        f_vaes.main(argv + ["--out", "nowhere"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    cases = [
        (["sample", "--out", str(tmp_path / "none")], "--out"),
        (TINY_FLAGS + ["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
         "--data-dir"),
        (TINY_FLAGS + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "r")], "no .png"),
    ]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as exit_info:
            f_vaes.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and flag in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "celeba", "celeba_64x64")),
                    reason="the shared CelebA 64x64 folder is not here (../shared/data/celeba)")
def test_real_faces_load_as_the_model_expects():
    files = image_files.list_image_files(os.path.join(SHARED_DATA, "celeba", "celeba_64x64"))
    assert len(files) == 10000
    batch = next(iter(datasets.image_dataset(files[:8], 64, 8, face_runs.scale_pixels)))
    assert batch.shape == (8, 64, 64, 3)
    assert -1.0 <= float(tf.reduce_min(batch)) < -0.5 and 0.5 < float(tf.reduce_max(batch)) <= 1.0


# --------------------------------------------------------------------------- seeds and posterior draws

def test_bits_per_dim_with_a_seed_gives_the_same_numbers_twice():
    """`bits_per_dim(images, seed)` draws both noises from its seed, whatever the batches, and
    leaves the model's own noise stream (training's) where it was."""
    model = tiny_model(seed=2)
    images = np.random.RandomState(5).randint(0, 256, (5, 16, 16, 3)).astype("uint8")
    state = model.seed_generator.state.numpy().copy()
    first = model.bits_per_dim(images, seed=0)
    np.testing.assert_array_equal(model.bits_per_dim(images, seed=0), first)
    np.testing.assert_allclose(model.bits_per_dim(images, seed=0, batch=2), first, rtol=1e-5)
    assert not np.allclose(model.bits_per_dim(images, seed=1), first)
    np.testing.assert_array_equal(model.seed_generator.state.numpy(), state)
    assert first.shape == (5,) and np.all(np.isfinite(first))


@pytest.mark.parametrize("posterior", ["flow", "gaussian"])
def test_latent_of_a_posterior_draw_is_the_z_the_loss_scores(posterior):
    """latent(x, noise=u) is z = F(v) of the posterior draw v that `loss_parts` scores with the
    same u (the author's total_encoder, his random normal layer kept): its prior term is
    0.5*sum(z^2); without noise, u = 0 (the posterior mean); `posterior_latent(x, seed)` is
    the draw of numpy's seed."""
    model = tiny_model(seed=4, posterior=posterior)
    if posterior == "gaussian":
        randomise(model.log_scale_head.weights, seed=6)
    x = smooth_images(3, 16, seed=4)
    u = np.random.RandomState(9).randn(3, 2, 2, 192).astype("float32")
    for noise in (u, np.zeros_like(u)):
        z = np.asarray(model.latent(x, noise=noise), "float64")
        prior = 0.5 * np.sum(z ** 2, axis=1)
        np.testing.assert_allclose(model.loss_parts(x, noise=noise)["prior"], prior, rtol=1e-5)
    np.testing.assert_array_equal(model.latent(x), model.latent(x, noise=np.zeros_like(u)))
    assert not np.allclose(model.latent(x, noise=u), model.latent(x), atol=1e-3)
    drawn = np.random.RandomState(3).randn(3, 2, 2, 192).astype("float32")
    np.testing.assert_allclose(model.posterior_latent(x, seed=3), model.latent(x, noise=drawn),
                               atol=1e-6)
