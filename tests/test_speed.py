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


def test_coupling_convolutions_keep_only_their_live_taps():
    """On the tiny f-VAE's 1x1 level the coupling's 3x3 kernels keep their centre tap only;
    on its 2x2 level (and the factor-out's CondActNorm there) every tap touches data."""
    model = FVAE(**TINY)
    model(np.zeros((1, 16, 16, 3), "float32"))
    shapes = {w.path: tuple(w.shape[:2]) for w in model.flow.trainable_weights if "kernel" in w.path}
    level0 = {s for p, s in shapes.items() if "level0" in p}
    level1 = {s for p, s in shapes.items() if "level1" in p}
    assert level0 == {(3, 3), (1, 1)} and level1 == {(1, 1)}


@pytest.mark.parametrize("map_size, kernel, live", [(1, 3, 1), (2, 3, 3), (2, 5, 3), (3, 5, 5),
                                                   (1, 5, 1)])
def test_live_taps_are_the_centre_of_the_kernel_keras_draws(map_size, kernel, live):
    """The live kernel holds the centre taps of the kernel keras.layers.Conv2D draws from the
    same initializer seed, and computes the same function as Conv2D with that whole kernel."""
    shape = (2, map_size, map_size, 5)
    x = np.random.RandomState(0).randn(*shape).astype("float32")
    init = lambda: keras.initializers.GlorotUniform(seed=11)  # noqa: E731
    whole = keras.layers.Conv2D(7, kernel, padding="same", kernel_initializer=init(),
                                bias_initializer="ones")
    fast = SameConv2D(7, kernel, kernel_initializer=init(), bias_initializer="ones")
    expected, got = whole(x).numpy(), fast(x).numpy()
    assert tuple(fast.kernel.shape) == (live, live, 5, 7)
    cut = (kernel - live) // 2
    np.testing.assert_array_equal(fast.kernel.numpy(),
                                  whole.kernel.numpy()[cut:cut + live, cut:cut + live])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert fast.get_config()["kernel_size"] == (kernel, kernel)  # the model's definition


def test_whole_kernels_and_their_adam_moments_load_as_centre_taps(tmp_path):
    """A weights file of a whole 3x3 kernel trained on 1x1 maps (as runs were saved before
    the live taps; here a layer built for maps of any size) loads its centre tap, moments
    included."""
    def model_with(layer, size):
        model = keras.Sequential([keras.Input((size, size, 4)), layer])
        model.compile(optimizer=speedups.FusedAdam(0.01), loss="mse")
        return model
    x = np.random.RandomState(1).randn(8, 1, 1, 4).astype("float32")
    y = np.random.RandomState(2).randn(8, 1, 1, 3).astype("float32")
    whole = model_with(SameConv2D(3, 3), None)
    whole.fit(x, y, epochs=2, verbose=0)
    whole.save_weights(tmp_path / "whole.weights.h5")
    live = model_with(SameConv2D(3, 3), 1)
    assert tuple(whole.layers[0].kernel.shape) == (3, 3, 4, 3)
    live.optimizer.build(live.trainable_variables)
    live.load_weights(tmp_path / "whole.weights.h5")
    np.testing.assert_array_equal(live.layers[0].kernel.numpy(),
                                  whole.layers[0].kernel.numpy()[1:2, 1:2])
    for saved, loaded in zip(whole.optimizer.variables, live.optimizer.variables):
        saved = saved.numpy()
        np.testing.assert_array_equal(loaded.numpy(), saved[1:2, 1:2] if saved.ndim == 4 else saved)
    np.testing.assert_allclose(live.predict(x, verbose=0), whole.predict(x, verbose=0), atol=1e-6)


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


def test_fused_adam_makes_the_step_scalars_once_per_step():
    """Adam's bias corrections beta^t are made once per traced step, not once per variable
    (8 ops a variable, 826 variables in the f-VAE 64: 13-15 s of its start-up in one run);
    a second traced apply makes its own (they depend on the step)."""
    variables = [keras.Variable(np.ones((3,), "float32")) for _ in range(5)]
    optimizer = speedups.FusedAdam(learning_rate=0.01)
    optimizer.build(variables)

    def two_steps(grads):
        optimizer.apply(grads, variables)
        optimizer.apply(grads, variables)

    graph = tf.function(two_steps).get_concrete_function(
        [tf.TensorSpec((3,), "float32")] * len(variables)).graph
    kinds = [op.type for op in graph.get_operations()]
    assert kinds.count("ResourceApplyAdam") == 2 * len(variables)
    assert kinds.count("Pow") == 2 * 2  # beta_1^t and beta_2^t, in each apply


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
@pytest.mark.slow
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
