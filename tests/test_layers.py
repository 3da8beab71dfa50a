"""Properties of the invertible layers in layers/: exact inverses, log-determinants equal to
log|det J| from autodiff, the special cases of docs/model.md, saving, XLA, and clear errors."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from layers import (ActNorm, CondActNorm, ConcatChannels, CoupleWrapper, InvConv, Permute,
                    Reshape, SplitChannels, Squeeze, UnSqueeze)

RNG = np.random.RandomState(0)


def small_nn(out_channels, hidden=8):
    return keras.Sequential([
        keras.layers.Conv2D(hidden, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(out_channels, 1, padding="same"),
    ])


class Cond:
    """A layer applied as layer([x, cond]) with a fixed conditioning input (the other half)."""

    def __init__(self, layer):
        self.layer = layer
        self.cond = None

    def _cond_for(self, x):
        if self.cond is None or self.cond.shape[0] != x.shape[0] or self.cond.shape[1:3] != x.shape[1:3]:
            self.cond = tf.constant(RNG.randn(*x.shape[:3], 3).astype("float32"))
        return self.cond

    def __call__(self, x, inverse=False):
        return self.layer([x, self._cond_for(x)], inverse=inverse)

    @property
    def trainable_weights(self):
        return self.layer.trainable_weights


class Split:
    """SplitChannels seen as one map x -> concat(x1, x2) (for Jacobians)."""

    def __init__(self):
        self.layer = SplitChannels()

    def __call__(self, x, inverse=False):
        if inverse:
            c = x.shape[-1]
            return self.layer([x[..., : c // 2], x[..., c // 2:]], inverse=True)
        (a, b), logdet = self.layer(x)
        return tf.concat([a, b], -1), logdet

    trainable_weights = []


class Concat:
    def __init__(self):
        self.layer = ConcatChannels()

    def __call__(self, x, inverse=False):
        if inverse:
            (a, b), logdet = self.layer(x, inverse=True)
            return tf.concat([a, b], -1), logdet
        c = x.shape[-1]
        return self.layer([x[..., : c // 2], x[..., c // 2:]])

    trainable_weights = []


class Flat:
    def __init__(self):
        self.layer = Reshape((-1,))
        self.shape = None

    def __call__(self, x, inverse=False):
        if inverse:
            return self.layer(tf.reshape(x, (x.shape[0], -1)), inverse=True)
        y, logdet = self.layer(x)
        return tf.reshape(y, x.shape), logdet

    trainable_weights = []


FACTORIES = {
    "Squeeze": lambda: Squeeze(2),
    "UnSqueeze": lambda: UnSqueeze(2),
    "ActNorm": lambda: ActNorm(),
    "ActNorm_noshift": lambda: ActNorm(use_shift=False),
    "CondActNorm": lambda: Cond(CondActNorm()),
    "Permute_random": lambda: Permute("random", seed=3),
    "Permute_reverse": lambda: Permute("reverse"),
    "InvConv": lambda: InvConv(seed=1),
    "SplitChannels": lambda: Split(),
    "ConcatChannels": lambda: Concat(),
    "Reshape": lambda: Flat(),
    "Couple_additive": lambda: CoupleWrapper(small_nn(2)),
    "Couple_affine": lambda: CoupleWrapper(small_nn(4)),
}
# The coupling nets above give 2 (additive) or 4 (affine) channels: inputs have 4 channels.
SHAPES = [(3, 4, 6, 4), (2, 8, 2, 4)]
TINY = (2, 2, 2, 4)


def randomize(layer, scale=0.3, rng=RNG):
    """Move every trainable weight away from its initial value."""
    for w in layer.trainable_weights:
        w.assign(w + scale * rng.randn(*w.shape).astype("float32"))


def as_list(y):
    return tf.concat(y, -1) if isinstance(y, (list, tuple)) else y


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inverse_undoes_forward(name, shape):
    layer = FACTORIES[name]()
    x = tf.constant(RNG.randn(*shape).astype("float32"))
    y, logdet = layer(x)
    assert logdet.shape == (shape[0],)
    x_back, _ = layer(y, inverse=True)
    assert max_err(x_back, x) < 1e-5
    randomize(layer)
    y, _ = layer(x)
    x_back, _ = layer(y, inverse=True)
    assert max_err(x_back, x) < 1e-5


def jacobian_logdet(fn, x):
    """log|det dy/dx| per example, by autodiff on a tiny input."""
    batch = x.shape[0]
    flat = tf.reshape(x, (batch, -1))
    with tf.GradientTape() as tape:
        tape.watch(flat)
        y = tf.reshape(as_list(fn(tf.reshape(flat, x.shape))), (batch, -1))
    jac = tape.batch_jacobian(y, flat)
    return tf.linalg.slogdet(tf.cast(jac, tf.float64))[1].numpy()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_logdet_matches_autodiff_jacobian(name):
    layer = FACTORIES[name]()
    x = tf.constant(RNG.randn(*TINY).astype("float32"))
    layer(x)
    randomize(layer)
    _, logdet = layer(x)
    expected = jacobian_logdet(lambda t: layer(t)[0], x)
    np.testing.assert_allclose(logdet.numpy(), expected, atol=1e-4)
    # and the inverse map's log-determinant is the negative, at the matching point
    y, _ = layer(x)
    _, logdet_inv = layer(y, inverse=True)
    np.testing.assert_allclose(logdet_inv.numpy(), -logdet.numpy(), atol=1e-4)


def test_random_weights_give_nonzero_logdets():
    """Guards the Jacobian test against passing only because everything is zero."""
    for name in ["ActNorm", "CondActNorm", "InvConv", "Couple_affine"]:
        layer = FACTORIES[name]()
        x = tf.constant(RNG.randn(*TINY).astype("float32"))
        layer(x)
        randomize(layer)
        assert np.all(np.abs(layer(x)[1].numpy()) > 1e-3), name


def squeeze_by_loops(x, f):
    """Output channel (i*f + j)*c + k at (y, x) holds input pixel (f*y + i, f*x + j), channel k."""
    b, h, w, c = x.shape
    y = np.zeros((b, h // f, w // f, f * f * c), x.dtype)
    for row in range(h // f):
        for col in range(w // f):
            for i in range(f):
                for j in range(f):
                    y[:, row, col, (i * f + j) * c:(i * f + j + 1) * c] = x[:, f * row + i, f * col + j]
    return y


@pytest.mark.parametrize("factor, shape", [(2, (2, 4, 6, 3)), (3, (1, 6, 3, 2))])
def test_squeeze_matches_the_channel_order_by_loops(factor, shape):
    x = RNG.randn(*shape).astype("float32")
    y, logdet = Squeeze(factor)(tf.constant(x))
    np.testing.assert_array_equal(y.numpy(), squeeze_by_loops(x, factor))
    np.testing.assert_array_equal(logdet.numpy(), np.zeros(shape[0]))
    np.testing.assert_array_equal(UnSqueeze(factor)(y)[0].numpy(), x)
    np.testing.assert_array_equal(Squeeze(factor).inverse(y).numpy(), x)


def test_permutation_gradient_is_the_inverse_permutation():
    """The custom gradient of Permute (a gather with the inverse permutation) equals the
    Jacobian's transpose, by numpy: d sum(w * x[..., perm]) / dx[..., k] = w[..., perm^-1[k]]."""
    layer = Permute("random", seed=5)
    x = tf.constant(RNG.randn(2, 3, 3, 7).astype("float32"))
    w = RNG.randn(2, 3, 3, 7).astype("float32")
    for inverse in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, inverse=inverse)[0]
            total = tf.reduce_sum(y * w)
        perm = layer.permutation.numpy()
        perm = np.argsort(perm) if inverse else perm
        expected = np.zeros_like(w)
        for out_channel, in_channel in enumerate(perm):
            expected[..., in_channel] += w[..., out_channel]
        np.testing.assert_array_equal(tape.gradient(total, x).numpy(), expected)


def test_squeeze_factor_3():
    x = tf.constant(RNG.randn(1, 6, 3, 2).astype("float32"))
    y, _ = Squeeze(3)(x)
    assert y.shape == (1, 2, 1, 18)
    np.testing.assert_array_equal(Squeeze(3).inverse(y).numpy(), x.numpy())


def test_actnorm_starts_as_identity_and_logdet_is_hw_sum_log_scale():
    layer = ActNorm()
    x = tf.constant(RNG.randn(2, 3, 5, 4).astype("float32"))
    y, logdet = layer(x)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_array_equal(logdet.numpy(), [0, 0])
    layer.log_scale.assign([0.1, -0.2, 0.3, 0.05])
    layer.shift.assign([1.0, 2.0, 3.0, 4.0])
    y, logdet = layer(x)
    np.testing.assert_allclose(y.numpy(), x.numpy() * np.exp([0.1, -0.2, 0.3, 0.05]) + [1, 2, 3, 4],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logdet.numpy(), [3 * 5 * 0.25] * 2, rtol=1e-6)


def test_condactnorm_is_identity_at_init_and_uses_a_3x3_conv_of_the_condition():
    layer = CondActNorm()
    x = tf.constant(RNG.randn(2, 4, 4, 3).astype("float32"))
    cond = tf.constant(RNG.randn(2, 4, 4, 5).astype("float32"))
    y, logdet = layer([x, cond])
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_array_equal(logdet.numpy(), [0, 0])
    assert layer.conv.kernel.shape == (3, 3, 5, 6)
    randomize(layer)
    log_scale, shift = np.split(layer.conv(cond).numpy(), 2, axis=-1)
    y, logdet = layer([x, cond])
    np.testing.assert_allclose(y.numpy(), np.exp(log_scale) * x.numpy() + shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logdet.numpy(), log_scale.sum(axis=(1, 2, 3)), rtol=1e-5)


def test_permute_is_a_fixed_permutation_saved_as_a_weight():
    layer = Permute("random", seed=7)
    x = tf.constant(RNG.randn(2, 3, 3, 16).astype("float32"))
    y, _ = layer(x)
    perm = layer.permutation.numpy()
    assert sorted(perm) == list(range(16)) and not np.array_equal(perm, np.arange(16))
    np.testing.assert_array_equal(y.numpy(), x.numpy()[..., perm])
    assert not layer.permutation.trainable and layer.count_params() == 16
    np.testing.assert_array_equal(Permute("reverse")(x)[0].numpy(), x.numpy()[..., ::-1])
    # the same seed gives the same permutation; no seed draws one and keeps it in the config
    assert np.array_equal(Permute("random", seed=7)(x)[0].numpy(), y.numpy())
    assert isinstance(Permute().get_config()["seed"], int)


def test_invconv_starts_orthogonal_from_lu_and_logdet_is_hw_sum_log_abs_s():
    layer = InvConv(seed=0)
    x = tf.constant(RNG.randn(2, 3, 5, 6).astype("float32"))
    y, logdet = layer(x)
    w = layer.kernel().numpy()
    np.testing.assert_allclose(w @ w.T, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ w, atol=1e-5)
    np.testing.assert_allclose(logdet.numpy(), [15 * layer.log_abs_s.numpy().sum()] * 2, rtol=1e-5)
    np.testing.assert_allclose(abs(np.linalg.det(w)), 1.0, atol=1e-5)
    # P and sign are fixed; L, U and log|s| train
    trainable = sorted(v.name for v in layer.trainable_weights)
    assert trainable == ["l", "log_abs_s", "u"]


def test_couple_wrapper_modes_and_formula():
    x = tf.constant(RNG.randn(2, 3, 3, 4).astype("float32"))
    add = CoupleWrapper(small_nn(2))
    y, logdet = add(x)
    assert not add.affine
    np.testing.assert_array_equal(y[..., :2].numpy(), x[..., :2].numpy())
    np.testing.assert_allclose(y[..., 2:].numpy(), (x[..., 2:] + add.nn(x[..., :2])).numpy(), atol=1e-6)
    np.testing.assert_array_equal(logdet.numpy(), [0, 0])
    aff = CoupleWrapper(small_nn(4))
    y, logdet = aff(x)
    log_scale, shift = np.split(aff.nn(x[..., :2]).numpy(), 2, axis=-1)
    assert aff.affine
    np.testing.assert_allclose(y[..., 2:].numpy(), np.exp(log_scale) * x[..., 2:].numpy() + shift,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logdet.numpy(), log_scale.sum(axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="nn must give 2 channels"):
        CoupleWrapper(small_nn(3))(x)


# ---------------------------------------------------------------- a small stack, as a whole

def build_stack(input_shape=(4, 4, 8), seed=0):
    """ActNorm -> Permute -> InvConv -> coupling -> split -> CondActNorm -> squeeze, as a
    functional model: outputs the squeezed kept half, the flattened factored-out half and
    the summed log-determinant."""
    keras.utils.set_random_seed(seed)  # the coupling net's initial weights
    inp = keras.Input(input_shape)
    h, ld1 = ActNorm()(inp)
    h, ld2 = Permute(seed=seed)(h)
    h, ld3 = InvConv(seed=seed)(h)
    h, ld4 = CoupleWrapper(small_nn(input_shape[-1]))(h)
    (kept, out), _ = SplitChannels()(h)
    out, ld5 = CondActNorm()([out, kept])
    flat, _ = Reshape((-1,))(out)
    kept, _ = Squeeze(2)(kept)
    logdet = keras.layers.Add()([ld1, ld2, ld3, ld4, ld5])
    return keras.Model(inp, [kept, flat, logdet])


def invert_stack(model, kept, flat):
    layers = {type(layer).__name__: layer for layer in model.layers}
    kept = layers["Squeeze"].inverse(kept)
    out = layers["Reshape"].inverse(flat)
    out, _ = layers["CondActNorm"]([out, kept], inverse=True)
    h = layers["SplitChannels"].inverse([kept, out])
    for name in ["CoupleWrapper", "InvConv", "Permute", "ActNorm"]:
        h = layers[name].inverse(h)
    return h


def randomize_model(model, seed=0):
    """Deterministic, moderate moves (a stack of randomly perturbed layers can be badly
    conditioned enough for float32 round-off to exceed 1e-5, which is not what is tested)."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        randomize(layer, 0.1, rng)


@pytest.mark.parametrize("shape", [(4, 4, 8), (2, 6, 4)])
def test_stack_is_invertible(shape):
    model = build_stack(shape)
    randomize_model(model)
    x = tf.constant(RNG.randn(3, *shape).astype("float32"))
    kept, flat, _ = model(x)
    assert max_err(invert_stack(model, kept, flat), x) < 1e-5


def test_stack_logdet_matches_autodiff_jacobian():
    model = build_stack((2, 2, 4))
    randomize_model(model)
    x = tf.constant(RNG.randn(2, 2, 2, 4).astype("float32"))

    def whole(t):
        kept, flat, _ = model(t)
        return tf.concat([tf.reshape(kept, (t.shape[0], -1)), flat], -1)

    _, _, logdet = model(x)
    np.testing.assert_allclose(logdet.numpy(), jacobian_logdet(whole, x), atol=1e-4)
    assert np.all(np.abs(logdet.numpy()) > 1e-3)


@pytest.mark.parametrize("squeeze_first", [False, True], ids=["fvae", "glow"])
def test_multiscale_flow_logdet_matches_autodiff_jacobian(squeeze_first):
    """The f-VAE's and Glow's MultiScaleFlow alone: two levels, so every kind of part (steps,
    the factor-out's CondActNorm, the final ActNorm) adds to the log-determinant; the
    factor-out's share is far above the tolerance."""
    from layers import MultiScaleFlow
    shape = (4, 4, 3) if squeeze_first else (4, 4, 2)
    flow = MultiScaleFlow(shape, level=2, depth=1, width=8, seed=0, squeeze_first=squeeze_first)
    x = tf.constant(np.random.RandomState(0).randn(2, *shape).astype("float32"))
    flow(x)
    randomize(flow, 0.1, np.random.RandomState(1))
    _, logdet = flow(x)
    np.testing.assert_allclose(logdet.numpy(), jacobian_logdet(lambda t: flow(t)[0], x),
                               atol=1e-4)
    level_input = flow.squeezes[0](x)[0] if squeeze_first else x
    _, share = flow.factor_outs[0](flow.steps[0](level_input)[0])
    assert np.all(np.abs(share.numpy()) > 1e-2)


def test_save_and_load_round_trip(tmp_path):
    model = build_stack()
    randomize_model(model)
    x = tf.constant(RNG.randn(2, 4, 4, 8).astype("float32"))
    path = str(tmp_path / "stack.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model(x), loaded(x)):
        assert max_err(a, b) == 0.0
    perm = lambda m: [l for l in m.layers if isinstance(l, Permute)][0].permutation.numpy()  # noqa: E731
    np.testing.assert_array_equal(perm(model), perm(loaded))
    assert max_err(invert_stack(loaded, *loaded(x)[:2]), x) < 1e-5
    # weights alone into a model built with another seed: the saved permutation wins
    other = build_stack(seed=99)
    weights = str(tmp_path / "stack.weights.h5")
    model.save_weights(weights)
    other.load_weights(weights)
    np.testing.assert_array_equal(perm(other), perm(model))
    assert max_err(model(x)[1], other(x)[1]) == 0.0


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_runs_in_tf_function_with_xla(name):
    layer = FACTORIES[name]()
    x = tf.constant(RNG.randn(*SHAPES[0]).astype("float32"))
    layer(x)
    randomize(layer)

    @tf.function(jit_compile=True)
    def round_trip(t):
        y, logdet = layer(t)
        back, _ = layer(as_list(y) if name != "SplitChannels" else y, inverse=True)
        return y, logdet, back

    if name == "SplitChannels":  # the wrapper already concatenates
        round_trip = tf.function(lambda t: (lambda y: (y[0], y[1], layer(y[0], inverse=True)[0]))(layer(t)),
                                 jit_compile=True)
    y, logdet, back = round_trip(x)
    eager_y, eager_logdet = layer(x)
    # XLA and the eager kernels sum in different orders: float32 round-off relative to the size
    scale = lambda t: max(1.0, float(np.max(np.abs(np.asarray(t)))))  # noqa: E731
    assert max_err(y, as_list(eager_y)) < 1e-5 * scale(as_list(eager_y))
    assert max_err(logdet, eager_logdet) < 1e-5 * scale(eager_logdet)
    assert max_err(back, x) < 1e-5 * scale(x)


@pytest.mark.parametrize("name", ["Squeeze", "ActNorm", "CondActNorm", "Permute", "InvConv",
                                  "CoupleWrapper", "Reshape", "ConcatChannels"])
def test_get_config_round_trip(name):
    """A layer rebuilt from its config computes what the original computes: at once where the
    config alone fixes the function (factor, seeds of the permutation and of InvConv's
    initial W, shapes, split), and for every layer once given the original's weights, moved."""
    layer = {"Squeeze": Squeeze(3), "ActNorm": ActNorm(use_shift=False), "CondActNorm": CondActNorm(),
             "Permute": Permute("random", seed=5), "InvConv": InvConv(seed=4),
             "CoupleWrapper": CoupleWrapper(small_nn(2)), "Reshape": Reshape((2, -1), (2, 2, 4)),
             "ConcatChannels": ConcatChannels(split=3)}[name]
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    rng = np.random.RandomState(7)
    channels = {"Squeeze": 9, "Permute": 12}.get(name, 4)  # 12! permutations: no match by chance
    x = tf.constant(rng.randn(2, 6, 6, channels).astype("float32"))
    inputs = {"CondActNorm": [x, tf.constant(rng.randn(2, 6, 6, 3).astype("float32"))],
              "ConcatChannels": [x[..., :3], x[..., 3:]], "Reshape": x[:, :2, :2]}.get(name, x)
    outputs = lambda l: [np.asarray(t) for t in tf.nest.flatten(l(inputs))]  # noqa: E731

    original, rebuilt = outputs(layer), outputs(clone)
    if name != "CoupleWrapper":  # its inner network's initial weights are random, not configured
        for a, b in zip(original, rebuilt):
            np.testing.assert_array_equal(a, b)
    randomize(layer, rng=rng)
    clone.set_weights(layer.get_weights())
    original, rebuilt = outputs(layer), outputs(clone)
    for a, b in zip(original, rebuilt):
        np.testing.assert_array_equal(a, b)
    if name not in ("ConcatChannels", "CondActNorm"):  # one-input layers: the inverses agree too
        y = layer(inputs)[0]
        np.testing.assert_array_equal(layer(y, inverse=True)[0], clone(y, inverse=True)[0])


# ---------------------------------------------------------------- bad input

def test_squeeze_rejects_odd_height_or_width():
    with pytest.raises(ValueError, match=r"divisible by factor 2.*\(2, 5, 4, 3\)"):
        Squeeze(2)(tf.zeros((2, 5, 4, 3)))
    with pytest.raises(ValueError, match=r"divisible by factor 2.*\(2, 4, 3, 3\)"):
        Squeeze(2)(tf.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="divisible by factor 2"):
        UnSqueeze(2).inverse(tf.zeros((1, 3, 4, 4)))


def test_unsqueeze_rejects_channels_not_divisible_by_factor_squared():
    with pytest.raises(ValueError, match=r"factor\*\*2 = 4.*\(1, 2, 2, 6\)"):
        UnSqueeze(2)(tf.zeros((1, 2, 2, 6)))
    with pytest.raises(ValueError, match=r"factor\*\*2 = 4"):
        Squeeze(2).inverse(tf.zeros((1, 2, 2, 6)))


@pytest.mark.parametrize("layer", [Squeeze(2), UnSqueeze(2)])
def test_image_layers_reject_other_ranks(layer):
    with pytest.raises(ValueError, match=r"rank 4.*\(2, 8, 4\)"):
        layer(tf.zeros((2, 8, 4)))


def test_condactnorm_rejects_non_image_inputs():
    with pytest.raises(ValueError, match="rank 4"):
        CondActNorm()([tf.zeros((2, 8)), tf.zeros((2, 8))])
    with pytest.raises(ValueError, match=r"two inputs \[x, cond\]"):
        CondActNorm()(tf.zeros((2, 4, 4, 8)))


# ---------------------------------------------------------------- SameConv2D

def assert_same_outputs_and_gradients(fast, plain, x, perturbation, **call_kwargs):
    """A drop-in faster layer: with the (perturbed) weights of the Keras layer it replaces,
    the same outputs and the same gradients for the input and every weight."""
    fast.build(x.shape)
    plain.build(x.shape)
    plain.set_weights([w + perturbation(*w.shape) for w in plain.get_weights()])
    fast.set_weights(plain.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_fast, y_plain = fast(x, **call_kwargs), plain(x, **call_kwargs)
        loss_fast, loss_plain = tf.reduce_sum(tf.sin(y_fast)), tf.reduce_sum(tf.sin(y_plain))
    np.testing.assert_allclose(y_fast.numpy(), y_plain.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(tape.gradient(loss_fast, [x] + fast.trainable_weights),
                    tape.gradient(loss_plain, [x] + plain.trainable_weights)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 2), (2, 1), (3, 3), (4, 4), (3, 5)])
def test_same_conv_equals_keras_conv_with_the_same_weights(hw, kernel_size):
    """SameConv2D keeps the taps that can touch data on an h x w map (at most 2h-1 x 2w-1,
    centred): with those taps of a Keras kernel, the same outputs, the same input gradient
    and the same kernel gradient there; Keras' gradient of every other tap is exactly 0."""
    from speedups import SameConv2D
    x = tf.constant(RNG.randn(3, *hw, 5).astype("float32"))
    fast = SameConv2D(7, kernel_size, activation="relu")
    plain = keras.layers.Conv2D(7, kernel_size, padding="same", activation="relu")
    fast.build(x.shape)
    plain.build(x.shape)
    plain.set_weights([w + 0.1 * RNG.randn(*w.shape) for w in plain.get_weights()])
    live_h, live_w = (min(kernel_size, 2 * n - 1) for n in hw)
    top, left = (kernel_size - live_h) // 2, (kernel_size - live_w) // 2
    live = (slice(top, top + live_h), slice(left, left + live_w))
    assert tuple(fast.kernel.shape) == (live_h, live_w, 5, 7)
    fast.set_weights([plain.kernel.numpy()[live], plain.bias.numpy()])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_fast, y_plain = fast(x), plain(x)
        loss_fast, loss_plain = tf.reduce_sum(tf.sin(y_fast)), tf.reduce_sum(tf.sin(y_plain))
    np.testing.assert_allclose(y_fast.numpy(), y_plain.numpy(), rtol=1e-5, atol=1e-5)
    (dx_fast, dk_fast, db_fast), (dx_plain, dk_plain, db_plain) = (
        tape.gradient(loss_fast, [x, fast.kernel, fast.bias]),
        tape.gradient(loss_plain, [x, plain.kernel, plain.bias]))
    for a, b in ((dx_fast, dx_plain), (dk_fast, dk_plain.numpy()[live]), (db_fast, db_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    dead = np.ones((kernel_size, kernel_size), bool)
    dead[live] = False
    assert np.all(dk_plain.numpy()[dead] == 0)  # the taps left out never learn
    assert fast.count_params() == plain.count_params() - int(dead.sum()) * 5 * 7
    assert SameConv2D.from_config(fast.get_config()).get_config() == fast.get_config()


def test_same_conv_takes_only_same_padding_stride_1():
    from speedups import SameConv2D
    with pytest.raises(ValueError, match="padding='same', strides 1"):
        SameConv2D(4, 3, strides=2)


# ---------------------------------------------------------------- BatchNormalization

@pytest.mark.parametrize("shape", [(8, 5, 6, 7), (3, 1, 1, 4)])
def test_fused_batch_norm_equals_keras_batch_norm(shape):
    from speedups import BatchNormalization
    x = tf.constant(RNG.randn(*shape).astype("float32") * 3 + 1)
    fused, plain = BatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    assert_same_outputs_and_gradients(fused, plain, x, lambda *shape: 0.3 * RNG.rand(*shape),
                                      training=True)
    for a, b in zip(fused.get_weights(), plain.get_weights()):  # moving mean and variance
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), rtol=1e-5,
                               atol=1e-5)
    assert fused.name.startswith("batch_normalization")  # weights files keep their paths


@pytest.mark.parametrize("squeeze", [True, False])
def test_factor_out_keeps_the_flow_layers_shape(squeeze):
    """`(next_x, set_aside), logdet = factor_out(x)` and `factor_out.inverse((next_x,
    set_aside))` gives x back, as every flow piece's `(y, logdet)`."""
    from layers import FactorOut
    rng = np.random.RandomState(8)
    x = tf.constant(rng.randn(3, 4, 4, 8).astype("float32"))
    factor_out = FactorOut((4, 4, 8), squeeze=squeeze)
    factor_out(x)
    randomize(factor_out, rng=rng)
    (next_x, set_aside), logdet = factor_out(x)
    assert logdet.shape == (3,) and set_aside.shape == (3, 4 * 4 * 4)
    assert next_x.shape == ((3, 2, 2, 16) if squeeze else (3, 4, 4, 4))
    assert max_err(factor_out.inverse((next_x, set_aside)), x) < 1e-4  # float32 round-off
