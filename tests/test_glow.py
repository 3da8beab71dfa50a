"""glow.py, the author's Glow baseline of the f-VAE paper (docs/model.md, "Glow, the paper's
baseline"): its flow inverts and its log-determinant is the autodiff one, sampling then encoding
gives z back, the loss is the documented formula, dequantisation noise only in training, the
author's collapse rule, and the command line (train, the commands on a run, one-line errors)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from test_f_vaes import randomise
from test_same_weights import write_pictures
import glow
from layers import MultiScaleFlow
from training.checkpoint import atomic_save_weights
from training.monitor import count_parameters


def tiny_glow(seed=0, img_size=8, level=2, depth=2, width=8):
    model = glow.Glow(img_size, level, depth, width, seed)
    model(np.zeros((1, img_size, img_size, 3), "float32"))
    randomise(model.flow.trainable_weights, seed=seed)
    return model


def images(n, size=8, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


def test_flow_inverts_and_sampling_then_encoding_gives_z_back():
    model = tiny_glow(seed=1)
    x = images(4)
    z = model.latent(x)
    assert z.shape == (4, 8 * 8 * 3)
    np.testing.assert_allclose(model.generate(z).numpy(), x, atol=1e-4)
    noise = 0.9 * np.random.RandomState(2).randn(3, 192).astype("float32")
    np.testing.assert_allclose(model.latent(model.generate(noise)).numpy(), noise, atol=1e-3)


def test_logdet_matches_autodiff_jacobian():
    model = tiny_glow(seed=3, img_size=4, level=2, depth=2)
    x = tf.constant(images(2, size=4, seed=4))
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, logdet = model.flow(x)
    jacobian = tape.batch_jacobian(z, x).numpy().reshape(2, 48, 48)
    expected = np.linalg.slogdet(jacobian.astype(np.float64))[1]
    np.testing.assert_allclose(logdet.numpy(), expected, atol=1e-3)
    assert np.abs(expected).max() > 0.1  # the randomised flow is far from volume-preserving


def test_loss_is_specs_formula_and_noise_is_added_in_training_only():
    model = tiny_glow(seed=5)
    x = images(3, seed=6)
    parts = {k: v.numpy() for k, v in model.loss_parts(x).items()}
    z, logdet = (t.numpy() for t in model.flow(x))
    dims = 8 * 8 * 3
    expected = 0.5 * (z.astype(np.float64) ** 2).sum(1) + 0.5 * np.log(2 * np.pi) * dims - logdet
    np.testing.assert_allclose(parts["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(parts["bits_per_dim"],
                               (expected + dims * np.log(128)) / (dims * np.log(2)), rtol=1e-5)
    np.testing.assert_array_equal(model.loss_parts(x)["loss"], parts["loss"])  # no noise
    noisy = model.loss_parts(x, training=True)["loss"].numpy()
    assert not np.allclose(noisy, parts["loss"])
    # U(0, 1/256) moves every pixel by less than 1/256: the loss moves by a small amount
    assert np.abs(noisy - parts["loss"]).max() < 0.05 * np.abs(parts["loss"]).max()


def test_training_noise_reaching_the_flow_is_uniform_on_0_to_1_over_256(monkeypatch):
    """The author's dequantisation: the flow sees x + U(0, 1/256) in training, x itself
    otherwise. Read at the flow's input, for x = 0 the noise is exact: all of it in
    [0, 1/256), its maximum near 1/256 and its mean 1/512 within 5 standard errors."""
    model = tiny_glow(seed=7)
    seen = []
    flow_call = MultiScaleFlow.call

    def spy(flow, x):
        seen.append(np.asarray(x))
        return flow_call(flow, x)

    monkeypatch.setattr(MultiScaleFlow, "call", spy)
    x = np.zeros((64, 8, 8, 3), "float32")
    model.loss_parts(x, training=True)
    noise = seen[-1].ravel()
    width, n = 1.0 / 256, noise.size
    assert noise.min() >= 0.0 and noise.max() < width
    assert noise.max() > width * (1 - 20 / n)  # P(max below) = (1 - 20/n)^n ~ e^-20
    standard_error = width / np.sqrt(12 * n)
    assert abs(noise.mean() - width / 2) < 5 * standard_error

    clean = images(4, seed=8)
    model.loss_parts(clean, training=False)
    np.testing.assert_array_equal(seen[-1], clean)


def test_collapse_rule_reloads_the_best_weights_with_a_lower_rate(tmp_path):
    model = glow.build_model(glow.Config(img_size=8, level=2, depth=1, coupling_width=8, seed=0))
    model.save_weights(str(tmp_path / "best.weights.h5"))
    best = [w.numpy() for w in model.trainable_weights]
    rule = glow.CollapseRule(str(tmp_path), lr=1e-5)
    rule.set_model(model)
    for epoch, loss in enumerate([-5.0, -6.0, -5.5]):
        rule.on_epoch_end(epoch, {"loss": loss})
    randomise(model.trainable_weights, seed=9)
    model.trainable_weights[0].assign(model.trainable_weights[0] + 1.0)
    logs = {"loss": 3.0}
    rule.on_epoch_end(5, logs)  # positive, but before epoch 11: the author waits
    assert "collapsed" not in logs
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)
    rule.on_epoch_end(11, logs)
    assert logs["collapsed"] == 1.0
    np.testing.assert_allclose(float(model.optimizer.learning_rate.numpy()), 1e-5)
    for weight, saved in zip(model.trainable_weights, best):
        np.testing.assert_array_equal(weight.numpy(), saved)


def test_collapse_rule_remembers_the_lowest_loss_of_a_resumed_run(tmp_path):
    """A run resumed after its best epoch: the first epoch after the resume, positive and not
    the lowest, is a collapse, not the new lowest."""
    model = glow.build_model(glow.Config(img_size=8, level=2, depth=1, coupling_width=8, seed=0))
    atomic_save_weights(model, str(tmp_path / "best.weights.h5"), best=-6.0)
    rule = glow.CollapseRule(str(tmp_path), lr=1e-5)
    rule.set_model(model)
    rule.on_train_begin()
    logs = {"loss": 3.0}
    rule.on_epoch_end(11, logs)
    assert logs["collapsed"] == 1.0


def tiny_config(**overrides):
    return glow.Config(img_size=8, level=2, depth=1, coupling_width=8, seed=0, **overrides)


def collapse_setup(tmp_path, config=None):
    """A tiny Glow compiled as for training, its weights saved as the run's best, and the
    run's CollapseRule on it."""
    config = config or tiny_config()
    model = glow.build_model(config)
    model.save_weights(str(tmp_path / "best.weights.h5"))
    (make_rule,) = glow.GLOW_RUNS.monitors
    rule = make_rule(str(tmp_path), config)
    rule.set_model(model)
    return model, rule


def test_collapse_rule_fires_after_keras_epoch_10_as_the_authors_epoch_greater_than_10(tmp_path):
    """The author's `logs['loss'] > 0 and epoch > 10`, Keras counting epochs from 0: positive
    losses at epochs 9 and 10 (log.csv's 10 and 11) are let through, the one at epoch 11
    reloads; a loss of exactly 0 is not positive; a new lowest loss is never a collapse, a
    positive loss after it is."""
    _, rule = collapse_setup(tmp_path)
    history = [-1.0 - epoch for epoch in range(9)] + [2.0, 3.0, 1.0, 0.0, -20.0, 4.0]
    collapsed = []
    for epoch, loss in enumerate(history):
        logs = {"loss": loss}
        rule.on_epoch_end(epoch, logs)
        if logs.get("collapsed"):
            collapsed.append(epoch)
    assert collapsed == [11, 14]


def test_collapse_rule_reloads_the_weights_but_not_the_optimiser_state(tmp_path):
    """As the author's Keras 2 `load_weights`: the best epoch's weights come back, Adam's
    step count and moments go on from where the collapse left them."""
    model, rule = collapse_setup(tmp_path)
    best = [w.numpy() for w in model.weights]
    adam = model.optimizer
    adam.iterations.assign(7)
    randomise([v for v in adam.variables if v.dtype == "float32"], seed=10)  # the moments
    randomise(model.trainable_weights, seed=11)
    moments = {v.path: v.numpy() for v in adam.variables if v.path != adam.learning_rate.path}
    rule.on_epoch_end(0, {"loss": -5.0})
    logs = {"loss": 3.0}
    rule.on_epoch_end(11, logs)
    assert logs["collapsed"] == 1.0
    for weight, saved in zip(model.weights, best):
        np.testing.assert_array_equal(weight.numpy(), saved, err_msg=weight.path)
    assert int(adam.iterations.numpy()) == 7
    for variable in adam.variables:
        if variable.path in moments:
            np.testing.assert_array_equal(variable.numpy(), moments[variable.path],
                                          err_msg=variable.path)


def test_a_run_gives_the_collapse_rule_its_collapse_lr_not_its_lr(tmp_path):
    model, rule = collapse_setup(tmp_path, tiny_config(lr=1e-3, collapse_lr=2e-6))
    rule.on_epoch_end(0, {"loss": -5.0})
    logs = {"loss": 3.0}
    rule.on_epoch_end(11, logs)
    assert logs["collapsed"] == 1.0
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(2e-6)


@pytest.mark.slow
def test_paper_configuration_parameter_count():
    """The author's 64x64 Glow (3 levels x 10 steps, width 512) counted by hand: per step an
    ActNorm (2c) and the coupling NN (3x3 c/2->512, 1x1 512->512, 3x3 512->c/2, with biases)
    at c = 12, 24, 48 channels; a CondActNorm 3x3 conv (c/2 -> c) at the first two factor-outs;
    the final ActNorm on 48 channels."""
    expected = 2 * 48
    for level, c in enumerate((12, 24, 48)):
        half = c // 2
        step = 2 * c + (9 * half * 512 + 512) + (512 * 512 + 512) + (9 * 512 * half + half)
        expected += 10 * step + ((9 * half * c + c) if level < 2 else 0)
    model = glow.build_model(glow.Config(img_size=64, seed=0))
    assert count_parameters(model.trainable_weights) == expected == 11_771_232


def test_command_line_trains_resumes_and_runs_the_commands(tmp_path):
    pictures = write_pictures(str(tmp_path / "pictures"), n=12)
    run = str(tmp_path / "run")
    argv = ["--img-size", "16", "--level", "2", "--depth", "1", "--coupling-width", "8",
            "--batch-size", "4", "--steps-per-epoch", "2", "--holdout", "4", "--seed", "3",
            "--data-dir", pictures, "--out", run]
    assert glow.main([*argv, "--epochs", "1"]) == 0
    assert glow.main([*argv, "--epochs", "2"]) == 0  # resumes
    assert json.load(open(os.path.join(run, "state.json")))["epochs_done"] == 2
    assert os.path.isfile(os.path.join(run, "samples_T0.9_latest.png"))
    for command in (["sample"], ["interpolate", "--rows", "1", "--cols", "3"],
                    ["sweep", "--rows", "1"], ["evaluate"]):
        assert glow.main([*command, "--out", run]) == 0, command
    evaluated = json.load(open(os.path.join(run, "evaluate.json")))
    assert evaluated["images"] == 4 and 0 < evaluated["bits_per_dim"] < 20


@pytest.mark.parametrize("flags, message", [
    (["--img-size", "20"], "--img-size 20: must be a positive multiple of 2^level = 8"),
    (["--depth", "0"], "--depth 0: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
])
@pytest.mark.slow
def test_bad_flags_are_one_line_errors(flags, message, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "glow.py"), *flags,
                             "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and not (tmp_path / "run").exists()
