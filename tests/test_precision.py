"""--precision: which policy `auto` picks (the hardware detection mocked both ways), and that
low precision stays inside the networks: flow layers, their outputs and log-determinants
are float32 under a mixed global policy, the variables are float32, and the coupling's
inverse is as exact as in float32."""

import numpy as np
import pytest
import keras
from keras import ops

import tf_setup  # noqa: F401
from layers import ActNorm, CondActNorm, CoupleWrapper, Permute, SplitChannels, Squeeze
from speedups import SameConv2D
from training import precision


@pytest.mark.parametrize("gpus, flags, expected", [
    ([], {"avx2", "amx_bf16", "amx_tile"}, "mixed_bfloat16"),     # a CPU with AMX
    ([], {"avx2", "avx512f", "avx512_bf16"}, "mixed_bfloat16"),   # AVX512-BF16
    ([], {"avx2", "avx512f", "fma"}, "float32"),                  # neither
    ([], set(), "float32"),                                       # flags unreadable
    ([(8, 0)], set(), "mixed_bfloat16"),                          # A100
    ([(9, 0), (8, 6)], set(), "mixed_bfloat16"),
    ([(7, 5)], {"amx_bf16"}, "float32"),                          # a T4 decides, not the CPU
    ([(8, 0), (7, 0)], set(), "float32"),                         # one GPU without it
])
def test_auto_picks_bfloat16_only_where_the_hardware_runs_it(gpus, flags, expected):
    assert precision.resolve("auto", gpus=gpus, flags=flags) == expected


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    for name in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert precision.resolve(name, gpus=[], flags=set()) == name
    with pytest.raises(ValueError, match="bfloat16'.*expected one of auto, float32"):
        precision.resolve("bfloat16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n\n")
    assert precision.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


def test_the_networks_scope_restores_the_global_policy():
    before = keras.config.dtype_policy().name
    with precision.networks("mixed_bfloat16"):
        inside = keras.layers.Dense(3)
        flow = ActNorm()
    assert keras.config.dtype_policy().name == before
    assert inside.dtype_policy.name == "mixed_bfloat16" and flow.dtype_policy.name == "float32"


def test_the_networks_scope_restores_the_global_policy_when_building_fails():
    before = keras.config.dtype_policy().name
    try:
        with pytest.raises(ValueError, match="cannot be built"):
            with precision.networks("mixed_bfloat16"):
                raise ValueError("a layer that cannot be built")
        assert keras.config.dtype_policy().name == before
    finally:
        keras.config.set_dtype_policy(before)  # the next tests start from it whatever happened


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_flow_layers_compute_in_float32_under_a_mixed_policy(policy):
    x = np.random.RandomState(0).randn(2, 4, 4, 8).astype("float32")
    with precision.networks(policy):
        net = keras.Sequential([SameConv2D(16, 3, activation="relu"), SameConv2D(4, 3)])
        parts = [ActNorm(), Permute(seed=1), CoupleWrapper(net), Squeeze()]
        split, cond_norm = SplitChannels(), CondActNorm()
    h = x
    for part in parts:
        h, logdet = part(h)
        assert h.dtype == "float32" and logdet.dtype == "float32", part.name
    (x1, x2), _ = split(x)
    y, logdet = cond_norm([x2, x1])
    assert y.dtype == "float32" and logdet.dtype == "float32"
    assert net.layers[0].compute_dtype == policy.split("_")[1]  # the network: low precision
    for layer in [*parts, cond_norm, net]:
        assert all(w.dtype in ("float32", "int32") for w in layer.weights), layer.name


def round_trip_error(policy):
    x = np.random.RandomState(1).randn(8, 4, 4, 16).astype("float32")
    with precision.networks(policy):
        net = keras.Sequential([SameConv2D(32, 3, activation="relu"),
                                SameConv2D(8, 3, kernel_initializer="glorot_uniform")])
        coupling = CoupleWrapper(net)
    coupling.build(x.shape)
    for w in net.weights:  # the same weights in both precisions
        w.assign(np.random.RandomState(2).randn(*w.shape).astype("float32") * 0.3)
    y, _ = coupling(x)
    back = coupling.inverse(y)
    return float(np.abs(ops.convert_to_numpy(back) - x).max()), ops.convert_to_numpy(y)


def test_the_coupling_inverse_is_as_exact_in_bfloat16_as_in_float32():
    """x2 + t(x1) in float32, then minus the same t(x1): the inverse subtracts exactly what
    was added, so the round trip's error is float32 round-off whatever t computed in."""
    error32, y32 = round_trip_error("float32")
    error16, y16 = round_trip_error("mixed_bfloat16")
    assert error16 <= max(2 * error32, 1e-6), (error16, error32)
    assert not np.array_equal(y16, y32)  # the network did compute in bfloat16


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_the_fused_batch_norm_matches_keras_in_low_precision(policy):
    """speedups.BatchNormalization's fused kernel on a bfloat16 / float16 batch: the output
    Keras' own layer gives (to the precision's rounding) and the same float32 moving
    statistics."""
    from speedups import BatchNormalization
    x = np.random.RandomState(3).randn(8, 6, 6, 16).astype("float32") * 2 + 0.5
    with precision.networks(policy):
        fused, plain = BatchNormalization(), keras.layers.BatchNormalization()
    y_fused = fused(x, training=True)
    assert fused._fused_applies(ops.cast(x, policy.split("_")[1]), True, None)
    y_plain = plain(x, training=True)
    assert y_fused.dtype == y_plain.dtype == policy.split("_")[1]
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(y_fused, "float32")),
                               ops.convert_to_numpy(ops.cast(y_plain, "float32")),
                               atol=0.05 if policy == "mixed_bfloat16" else 0.005)
    for a, b, start in zip(fused.non_trainable_weights, plain.non_trainable_weights, (0.0, 1.0)):
        assert a.dtype == "float32"
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b),
                                   rtol=1e-2, atol=1e-3)
        # the batch's mean and variance each moving statistic took in (momentum 0.99 from its
        # start): both layers see the same rounded batch, so they agree to float32 round-off,
        # and the kernel's unbiased variance, n/(n-1) = 1.0035 times Keras', must be undone
        taken = lambda w: (ops.convert_to_numpy(w) - 0.99 * start) / 0.01  # noqa: E731
        np.testing.assert_allclose(taken(a), taken(b), rtol=5e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_a_narrow_batch_is_normalised_in_float32_under_a_mixed_policy(policy, monkeypatch):
    """Fewer than 16 channels (the f-VAE's 12-channel blocks): the fused kernel gets the batch
    cast to float32, so the output is float32's rounded once to the policy's dtype and the
    moving statistics are float32's exactly; 16 channels or more reach it in the policy's
    dtype."""
    import speedups
    low = policy.split("_")[1]
    seen = []
    fused = speedups.BatchNormalization._fused
    monkeypatch.setattr(speedups.BatchNormalization, "_fused",
                        lambda self, inputs: seen.append(inputs.dtype) or fused(self, inputs))
    for channels, kernel_dtype in [(speedups.FLOAT32_BELOW_CHANNELS - 4, "float32"),
                                   (speedups.FLOAT32_BELOW_CHANNELS, low)]:
        x = ops.cast(np.random.RandomState(4).randn(8, 6, 6, channels) * 3 + 1, low)
        with precision.networks(policy):
            mixed = speedups.BatchNormalization()
        full = speedups.BatchNormalization()
        y_mixed = mixed(x, training=True)
        assert seen[-1] == kernel_dtype and y_mixed.dtype == low
        y_full = full(ops.cast(x, "float32"), training=True)
        if kernel_dtype == "float32":
            np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(y_mixed, "float32")),
                                          ops.convert_to_numpy(ops.cast(ops.cast(y_full, low), "float32")))
            for a, b in zip(mixed.non_trainable_weights, full.non_trainable_weights):
                np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_the_f_vaes_12_channel_maps_are_normalised_in_float32_and_16_channels_are_not(
        policy, monkeypatch):
    """The measured threshold (docs/precision.md) as numbers, not relative to the constant:
    the f-VAE's narrowest batch-norm maps, 12 channels, reach the fused kernel in float32 (its
    bfloat16 kernel is several times slower there), its 48 and 192 channels and a 16-channel
    batch in the policy's dtype."""
    import f_vaes
    import speedups
    low = policy.split("_")[1]
    seen = {}
    fused = speedups.BatchNormalization._fused
    monkeypatch.setattr(speedups.BatchNormalization, "_fused", lambda self, inputs: (
        seen.__setitem__(inputs.shape[-1], inputs.dtype) or fused(self, inputs)))
    keras.utils.set_random_seed(0)
    model = f_vaes.build_model(tiny_config(f_vaes, policy))
    seen.clear()
    model.loss_parts(np.zeros((2, 16, 16, 3), "float32"), training=True)
    assert seen == {12: "float32", 48: low, 192: low}
    with precision.networks(policy):
        norm = speedups.BatchNormalization()
    norm(ops.cast(np.ones((2, 4, 4, 16)), low), training=True)
    assert seen[16] == low


def test_the_commands_on_a_low_precision_run_compute_in_float32(tmp_path):
    """`load_run` (sample, evaluate, ... on a run) builds a run trained in bfloat16 in float32:
    bounds and pictures do not depend on the precision it trained in."""
    import common
    import dataclasses
    import face_runs
    import glow
    config = tiny_config(glow, "mixed_bfloat16")
    common.write_json(str(tmp_path / "config.json"), dataclasses.asdict(config))
    trained = glow.build_model(config)
    assert "bfloat16" in {layer.compute_dtype for layer in trained._flatten_layers()}
    trained.save_weights(str(tmp_path / "best.weights.h5"))
    loaded_config, model = face_runs.load_run(glow.GLOW_RUNS, str(tmp_path))
    assert loaded_config.precision == "float32"
    assert {layer.compute_dtype for layer in model._flatten_layers()} == {"float32"}
    for a, b in zip(model.weights, trained.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def small_model(policy):
    from speedups import FusedAdam
    with precision.networks(policy):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=precision.wrap_optimizer(FusedAdam(1e-2), policy), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("saved_in, resumed_in", [("float32", "mixed_float16"),
                                                  ("mixed_float16", "mixed_bfloat16"),
                                                  ("mixed_bfloat16", "float32")])
def test_a_save_resumes_in_another_precision_with_its_adam_state(tmp_path, saved_in, resumed_in):
    from training.checkpoint import load_weights
    x, y = np.ones((8, 4), "float32"), np.ones((8, 3), "float32")
    first = small_model(saved_in)
    first.fit(x, y, epochs=3, verbose=0)
    first.save_weights(str(tmp_path / "run.weights.h5"))
    second = small_model(resumed_in)
    load_weights(second, str(tmp_path / "run.weights.h5"))
    adam = lambda m: getattr(m.optimizer, "inner_optimizer", m.optimizer)  # noqa: E731
    assert int(adam(second).iterations.numpy()) == int(adam(first).iterations.numpy()) > 0
    for a, b in zip(adam(first).variables, adam(second).variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    for a, b in zip(first.weights, second.weights):
        assert b.dtype == "float32"
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


# ----------------------------------------------------------------------------- the models

def tiny_config(module, precision, **overrides):
    """The script's config at a tiny size, in `precision`."""
    import dataclasses
    sizes = {"f_vaes": dict(img_size=16, level=2, depth=2, res_steps=1, coupling_width=8,
                            batch_size=4),
             "glow": dict(img_size=8, level=2, depth=2, coupling_width=8, batch_size=4),
             "infomax": dict(dataset="folder", img_size=16, z_dim=8, batch_size=4)}[module.__name__]
    config = module.Config(seed=0, precision=precision, jit_compile=False)
    config = dataclasses.replace(config, **{**sizes, **overrides})
    return module.resolve(config) if module.__name__ == "infomax" else config


def models():
    import f_vaes
    import glow
    import infomax
    return [f_vaes, glow, infomax]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["fvae", "glow", "infomax"])
@pytest.mark.slow
def test_each_model_trains_a_step_in_each_precision_with_float32_parts(index, policy):
    """A training step is finite; the variables are float32; every loss part, the flow's
    latent and log-determinant are float32; the networks compute in the precision."""
    module = models()[index]
    config = tiny_config(module, policy)
    keras.utils.set_random_seed(0)
    model = module.build_model(config)
    x = np.random.RandomState(0).uniform(-1, 1, (4, config.img_size, config.img_size, 3))
    x = x.astype("float32")
    logs = model.train_step(x)
    if policy == "mixed_float16":  # the first steps may overflow while the loss scale settles
        for _ in range(16):
            if np.isfinite(float(logs["loss"])):
                break
            logs = model.train_step(x)
    assert np.isfinite(float(logs["loss"]))
    assert float(logs["skipped_steps"]) == 0 or policy == "mixed_float16"
    assert all(w.dtype in ("float32", "int32", "int64") for w in model.weights)
    assert all(w.dtype in ("float32", "int32", "int64") for w in model.optimizer.variables)
    parts = model.loss_parts(x, training=False)
    assert {t.dtype.name for t in parts.values()} == {"float32"}, {
        k: t.dtype.name for k, t in parts.items()}
    low = policy.split("_")[-1]
    computes = {layer.compute_dtype for layer in model._flatten_layers()}
    assert computes == ({"float32"} if policy == "float32" else {"float32", low})
    if index < 2:  # the flow's latent and log-determinant
        shape = model.encoder.output.shape[1:] if index == 0 else x.shape[1:]
        z, logdet = model.flow(np.zeros((2, *shape), "float32"))
        assert z.dtype == logdet.dtype == "float32"


@pytest.mark.parametrize("policy", ["mixed_bfloat16"])
def test_the_loss_of_the_same_weights_and_batch_is_close_to_float32s(policy):
    """The f-VAE's loss of one batch with the same weights and noise: within 0.2 % of
    float32's, and the flow's round trip F^-1(F(v)) as exact as in float32."""
    import f_vaes
    losses, errors = {}, {}
    for name in ("float32", policy):
        keras.utils.set_random_seed(0)
        model = f_vaes.build_model(tiny_config(f_vaes, name, coupling_width=32))
        if name == "float32":
            weights = [ops.convert_to_numpy(w) for w in model.weights]
        else:
            for w, value in zip(model.weights, weights):
                w.assign(value)
        x = np.random.RandomState(1).uniform(-1, 1, (4, 16, 16, 3)).astype("float32")
        noise = np.random.RandomState(2).randn(4, 2, 2, 192).astype("float32")
        losses[name] = float(ops.mean(model.loss_parts(x, noise=noise)["loss"]))
        v = np.random.RandomState(3).randn(4, 2, 2, 192).astype("float32")
        errors[name] = float(np.abs(ops.convert_to_numpy(
            model.flow.inverse(model.flow(v)[0])) - v).max())
    assert abs(losses[policy] - losses["float32"]) <= 0.002 * abs(losses["float32"]), losses
    assert errors[policy] <= max(2 * errors["float32"], 1e-5), errors


def test_mixed_float16_survives_an_overflowing_step():
    """A step whose float16 gradients overflow (a loss scale of 2^40) is skipped: no weight
    moves, batch-norm statistics are put back, the loss scale is halved, the step is counted;
    at a scale that fits, the next step trains."""
    import f_vaes
    keras.utils.set_random_seed(0)
    model = f_vaes.build_model(tiny_config(f_vaes, "mixed_float16"))
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    x = np.random.RandomState(0).uniform(-1, 1, (4, 16, 16, 3)).astype("float32")
    before = [ops.convert_to_numpy(w) for w in model.weights]
    optimizer.dynamic_scale.assign(2.0 ** 40)
    logs = model.train_step(x)
    assert float(logs["skipped_steps"]) == 1
    assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 39
    for w, value in zip(model.weights, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(w), value, err_msg=w.path)
    optimizer.dynamic_scale.assign(2.0 ** 8)
    logs = model.train_step(x)
    assert float(logs["skipped_steps"]) == 1 and np.isfinite(float(logs["loss"]))
    assert any(not np.array_equal(ops.convert_to_numpy(w), value)
               for w, value in zip(model.trainable_weights, before))


def test_evaluation_measures_a_low_precision_encoder_in_float32():
    """feature_eval.encode of an encoder trained in bfloat16 gives the codes of a float32
    encoder with the same weights (k-NN and probes do not depend on the training precision)."""
    import feature_eval
    import infomax
    keras.utils.set_random_seed(0)
    low = infomax.build_model(tiny_config(infomax, "mixed_bfloat16")).encoder
    high = infomax.build_model(tiny_config(infomax, "float32")).encoder
    high.set_weights(low.get_weights())
    images = np.random.RandomState(0).randint(0, 256, (6, 16, 16, 3)).astype("uint8")
    scale = lambda x: ops.cast(x, "float32") / 255.0 - 0.5  # noqa: E731
    codes, expected = feature_eval.encode(low, images, scale), feature_eval.encode(high, images, scale)
    assert codes["mu"].dtype == np.float32
    np.testing.assert_allclose(codes["mu"], expected["mu"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gpus, flags, expected", [
    ([], {"avx2", "fma"}, "float32 (--precision auto: this CPU has no bfloat16 units)"),
    ([], {"amx_bf16", "avx512_bf16"},
     "mixed_bfloat16 (--precision auto: this CPU has amx_bf16 and avx512_bf16)"),
    ([(7, 5)], {"amx_bf16"}, "float32 (--precision auto: GPU compute capabilities 7.5)"),
])
def test_auto_says_why_it_chose_its_policy(gpus, flags, expected):
    """The line a run prints at its start (`precision: ...`) names what decided `auto`."""
    assert precision.describe("auto", gpus=gpus, flags=flags) == expected
    assert precision.describe("float32", gpus=gpus, flags=flags) == "float32"
