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
    for a, b in zip(fused.non_trainable_weights, plain.non_trainable_weights):
        assert a.dtype == "float32"
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b),
                                   rtol=1e-2, atol=1e-3)


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
