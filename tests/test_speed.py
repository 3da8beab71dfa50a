"""The speed work (issue 5) changes no model: the same parameters, the same loss for the same
weights and inputs, the same optimiser update, and the kernels the scripts ask for."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

from conftest import ROOT
import common
import speedups
from f_vaes import FVAE
from speedups import SameConv2D
from test_f_vaes import TINY, smooth_images, tiny_model


def plain_conv(monkeypatch):
    """Make every SameConv2D compute the ordinary padded Keras convolution."""
    monkeypatch.setattr(SameConv2D, "convolution_op", keras.layers.Conv2D.convolution_op)


def loss_and_gradients(model, x, noise):
    with tf.GradientTape() as tape:
        parts = model.loss_parts(x, training=True, noise=noise)
        loss = tf.reduce_mean(parts["loss"])
    return parts, tape.gradient(loss, model.trainable_variables)


def test_fvae_loss_and_gradients_equal_the_padded_convolutions(monkeypatch):
    # TINY's flow runs on 2x2 then 1x1 maps: both of SameConv2D's shortcuts are taken.
    model = tiny_model(seed=3)
    x = tf.constant(smooth_images(4, 16, seed=1))
    noise = tf.constant(np.random.RandomState(2).randn(4, 2, 2, 192).astype("float32"))
    fast_parts, fast_grads = loss_and_gradients(model, x, noise)
    plain_conv(monkeypatch)
    plain_parts, plain_grads = loss_and_gradients(model, x, noise)
    for name in fast_parts:
        np.testing.assert_allclose(fast_parts[name], plain_parts[name], rtol=1e-5, atol=1e-3)
    assert len(fast_grads) == len(plain_grads)
    for fast, plain, variable in zip(fast_grads, plain_grads, model.trainable_variables):
        scale = max(1.0, float(np.max(np.abs(plain))))
        np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5 * scale, err_msg=variable.path)


def test_coupling_convolutions_keep_their_kernel_shapes():
    """The 3x3 kernels on 1x1 maps stay 3x3 (the parameters docs/model.md counts), even though
    only their centre taps can ever touch the data."""
    model = FVAE(**TINY)
    model(np.zeros((1, 16, 16, 3), "float32"))
    kernels = [w for w in model.flow.trainable_weights if "kernel" in w.path and "coupling" in w.path]
    assert sorted({tuple(w.shape[:2]) for w in kernels}) == [(1, 1), (3, 3)]


def test_infomax_pair_scores_and_gradients_equal_the_concatenation(monkeypatch):
    """score_pairs splits the discriminators' first layer instead of concatenating: the same
    loss and the same gradients for the discriminators, z and the feature map."""
    import infomax
    rng = np.random.default_rng(0)
    batch, z_dim, size, channels = 6, 8, 4, 5   # unequal halves: a swapped split would fail
    keras.utils.set_random_seed(4)
    global_d = infomax.build_discriminator((2 * z_dim,), "g")
    local_d = infomax.build_discriminator((size, size, z_dim + channels), "l")
    z, mu, logvar = (tf.constant(rng.normal(size=(batch, z_dim)), "float32") for _ in range(3))
    local_map = tf.constant(rng.normal(size=(batch, size, size, channels)), "float32")
    perms = np.array([3, 0, 5, 1, 2, 4]), np.array([1, 2, 0, 4, 5, 3])

    def loss_and_gradients():
        with tf.GradientTape() as tape:
            tape.watch([z, local_map])
            terms = infomax.infomax_loss(global_d, local_d, z, mu, logvar, local_map, *perms)
        sources = [z, local_map, *global_d.trainable_variables, *local_d.trainable_variables]
        return terms, tape.gradient(terms["loss"], sources)

    fast_terms, fast_grads = loss_and_gradients()
    monkeypatch.setattr(infomax, "score_pairs", infomax.concatenated_scores)  # the documented form
    plain_terms, plain_grads = loss_and_gradients()
    for name in fast_terms:
        np.testing.assert_allclose(fast_terms[name], plain_terms[name], rtol=1e-5, err_msg=name)
    for fast, plain in zip(fast_grads, plain_grads):
        np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-6)


def adam_run(optimizer_class, jit, steps=4):
    rng = np.random.RandomState(0)
    shapes = [(3, 3, 4, 5), (7,), ()]
    variables = [keras.Variable(np.asarray(rng.randn(*s), "float32")) for s in shapes]
    optimizer = optimizer_class(learning_rate=0.01)
    optimizer.build(variables)
    apply = tf.function(lambda grads: optimizer.apply(grads, variables), jit_compile=jit)
    for _ in range(steps):
        apply([tf.constant(np.asarray(rng.randn(*s), "float32")) for s in shapes])
    return [v.numpy() for v in variables] + [v.numpy() for v in optimizer.variables]


@pytest.mark.parametrize("jit", [False, True])
def test_fused_adam_is_keras_adam(jit):
    expected = adam_run(keras.optimizers.Adam, jit=False)
    got = adam_run(speedups.FusedAdam, jit=jit)
    assert len(got) == len(expected)  # same state: iterations, learning rate, m and v
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adam_state_loads_into_keras_adam(tmp_path):
    """Checkpoints are interchangeable with keras.optimizers.Adam's."""
    def model_with(optimizer):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=optimizer, loss="mse")
        return model
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    fused = model_with(speedups.FusedAdam(0.01))
    fused.fit(x, y, epochs=2, verbose=0)
    fused.save_weights(tmp_path / "run.weights.h5")
    plain = model_with(keras.optimizers.Adam(0.01))
    plain.optimizer.build(plain.trainable_variables)
    plain.load_weights(tmp_path / "run.weights.h5")
    for a, b in zip(fused.optimizer.variables, plain.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("script", ["f_vaes", "infomax"])
def test_scripts_turn_on_onednn_unless_told_not_to(script):
    check = (f"import {script}; from tensorflow.python.util import _pywrap_util_port as p; "
             "print(p.IsMklEnabled())")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    on = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    off = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True,
                         env=dict(env, TF_ENABLE_ONEDNN_OPTS="0"), timeout=120)
    assert on.stdout.split()[-1] == "True", on.stderr[-2000:]
    assert off.stdout.split()[-1] == "False", off.stderr[-2000:]
