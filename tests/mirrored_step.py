"""One training step of each tiny model on one device and under MirroredStrategy on two logical
CPU devices, from the same weights on the same global batch; writes everything to compare.

Run by tests/test_distribute.py in its own process, because the CPU must be split into logical
devices before TensorFlow starts them (the test process has started them long before):

    python tests/mirrored_step.py OUT.npz [float64|float32]

In float64 (the default) both runs agree to ~1e-14. In float32 the loss still agrees to ~1e-7,
but Adam's first step, lr * g / (|g| + 1e-7), turns rounding noise into visible weight changes
where g is mathematically zero (conv biases right before batch norm) and where a max-pool
window nearly ties (its gradient jumps); the same happens on one device between
BatchNormalization(synchronized=True) and (synchronized=False), so it is not a property of the
distribution.

OUT.npz holds, per model (`fvae_...`, `infomax_...`): the logged metrics of the step, every
model weight and every optimiser variable afterwards, for `one` device and `two` replicas;
and `noise_one` / `noise_two`, the posterior noise one device and two replicas draw.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import training.distribute  # noqa: E402

STRATEGY = training.distribute.make_strategy("mirrored", ["CPU:0", "CPU:1"])  # first: splits the CPU

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import f_vaes  # noqa: E402
import infomax  # noqa: E402

GLOBAL_BATCH = 8


def randomise_zero_weights(model, seed=0):
    """Give zero-initialised weights other than biases (ActNorm, CondActNorm, the last coupling
    and residual convs, ...) random values, so that every part of the model takes part in the
    step. Biases stay zero: those right before a batch norm have a gradient of exactly zero,
    which Adam's first step would turn from rounding noise into a visible change."""
    rng = np.random.RandomState(seed)
    for w in model.trainable_weights:
        if not w.path.endswith("bias") and not np.any(w.numpy()):
            w.assign(0.05 * rng.randn(*w.shape))


def build_fvae():
    config = f_vaes.Config(img_size=16, level=2, depth=1, res_steps=1, coupling_width=8,
                           batch_size=GLOBAL_BATCH, lr=1e-3, seed=0, sync_bn=True)
    model = f_vaes.build_model(config)
    model.log_precision.assign(0.3)
    model.log_noise_scale.assign(-0.7)
    return model


def build_infomax(negative_groups):
    args = infomax.parse_args(["--dataset", "folder", "--img-size", "8", "--z-dim", "8",
                               "--seed", "0", "--no-jit", "--sync-bn"])
    model = infomax.build_model(args.config)
    model.negative_groups = negative_groups
    return model


def one_step(model, images):
    """One `model.fit` step on exactly this global batch; its logs, weights and optimiser state."""
    history = model.fit(tf.data.Dataset.from_tensors(images).repeat(), steps_per_epoch=1,
                        epochs=1, verbose=0, shuffle=False).history
    result = {f"log_{name}": np.float64(values[-1]) for name, values in history.items()}
    result.update({f"weight_{i}": w.numpy() for i, w in enumerate(model.weights)})
    result.update({f"optimizer_{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
    return result


def compare(name, build_one, build_two, images):
    one = build_one()
    randomise_zero_weights(one)
    with STRATEGY.scope():
        two = build_two()
    two.set_weights(one.get_weights())
    two.seed_generator.state.assign(one.seed_generator.state.numpy())
    results = {}
    for device, model in (("one", one), ("two", two)):
        results.update({f"{name}_{device}_{k}": v for k, v in one_step(model, images).items()})
    return results


def noise_draws():
    """The noise one device draws for the global batch, and what each of two replicas draws."""
    draw = lambda generator: lambda shape: keras.random.normal(shape, seed=generator)  # noqa: E731
    one = training.distribute.replica_draw(draw(keras.random.SeedGenerator(7)), (GLOBAL_BATCH, 3))
    with STRATEGY.scope():
        generator = keras.random.SeedGenerator(7)
    two = STRATEGY.run(lambda: training.distribute.replica_draw(draw(generator), (GLOBAL_BATCH // 2, 3)))
    return {"noise_one": one.numpy(),
            "noise_two": np.stack([t.numpy() for t in STRATEGY.experimental_local_results(two)])}


def main(out, dtype="float64"):
    assert STRATEGY.num_replicas_in_sync == 2
    keras.config.set_floatx(dtype)
    rng = np.random.RandomState(0)
    results = noise_draws()
    results.update(compare("fvae", build_fvae, build_fvae,
                           rng.uniform(-1, 1, (GLOBAL_BATCH, 16, 16, 3)).astype(dtype)))
    results.update(compare("infomax", lambda: build_infomax(2), lambda: build_infomax(1),
                           rng.uniform(-1, 1, (GLOBAL_BATCH, 8, 8, 3)).astype(dtype)))
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
