"""The numbers of docs/model.md that have no equation to test: both command lines' defaults
(loss weights, learning rates, batch sizes, epochs, temperatures), the optimiser each model is
built with, and the per-dataset pixel scaling, each against the documented numbers or numpy."""

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
import keras

import cli
import datasets
import f_vaes
import face_runs
import infomax


# --------------------------------------------------------------------------- f-VAEs

def test_fvae_train_defaults_are_the_scripts():
    """docs/model.md, "The f-VAE": 128 pixels, batch 32, Adam 1e-4, 1000 epochs of 1000 steps, a
    flow of L = 4 levels of K = 12 steps with 256-channel couplings, 12 residual steps per
    block."""
    args = face_runs.parse_args(f_vaes.FVAE_RUNS, [])
    assert args.command == "train"
    config = cli.config_from_args(f_vaes.Config, args)
    assert (config.img_size, config.batch_size, config.lr, config.epochs,
            config.steps_per_epoch) == (128, 32, 1e-4, 1000, 1000)
    assert (config.level, config.depth, config.coupling_width, config.res_steps) == (4, 12, 256, 12)


def test_fvae_pictures_default_to_spec_temperatures():
    """Samples at T = 1.0 and 0.8 (after every epoch and from `sample`); the sweep runs from 0
    to 1.0 and passes 0.5."""
    assert face_runs.parse_args(f_vaes.FVAE_RUNS, ["sample"]).temperatures == [1.0, 0.8]
    assert tuple(face_runs.SampleGrids("run").temperatures) == (1.0, 0.8)
    sweep = face_runs.parse_args(f_vaes.FVAE_RUNS, ["sweep"]).sweep
    assert sweep[0] == 0.0 and sweep[-1] == 1.0 and 0.5 in sweep and sweep == sorted(sweep)


def test_fvae_is_built_with_adam_at_the_configured_rate():
    config = f_vaes.Config(img_size=16, level=2, depth=1, res_steps=1, coupling_width=8, seed=0)
    model = f_vaes.build_model(config)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)


def test_fvae_pixels_are_scaled_to_minus_one_one():
    """x/255*2 - 1 (docs/model.md, "The f-VAE"), on every 8-bit value and on a PNG read by the
    loader."""
    values = np.arange(256, dtype="float32")
    np.testing.assert_allclose(face_runs.scale_pixels(tf.constant(values)),
                               values / 255.0 * 2.0 - 1.0, atol=1e-6)


def test_fvae_training_images_reach_the_model_in_minus_one_one(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3)).astype("uint8")
    files = []
    for i, image in enumerate(pixels):
        files.append(str(tmp_path / f"{i}.png"))
        iio.imwrite(files[-1], image)
    batch = next(iter(datasets.image_stream(files, 16, 2, face_runs.scale_pixels, seed=0)))
    expected = pixels.astype("float64") / 255.0 * 2.0 - 1.0
    found = sorted(np.asarray(batch), key=lambda image: float(image.sum()))
    for image, reference in zip(found, sorted(expected, key=lambda image: float(image.sum()))):
        np.testing.assert_allclose(image, reference, atol=1e-6)


# --------------------------------------------------------------------------- Deep InfoMax

@pytest.mark.parametrize("dataset, img_size, batch_size, epochs", [
    ("cifar10", 32, 64, 50), ("tiny-imagenet", 64, 100, 100), ("folder", 64, 100, 100)])
def test_infomax_train_defaults_are_spec_numbers(dataset, img_size, batch_size, epochs):
    """docs/model.md, "Deep InfoMax with a KL prior": batch 64 and 50 epochs on CIFAR-10,
    batch 100 and 100 epochs on Tiny ImageNet (and folders of images); Adam 1e-3; loss
    weights 0.5 / 1.5 / 0.01; z of 256."""
    config = infomax.parse_args(["--dataset", dataset]).config
    assert (config.img_size, config.batch_size, config.epochs) == (img_size, batch_size, epochs)
    assert config.lr == 1e-3 and config.z_dim == 256
    assert config.loss_weights == (0.5, 1.5, 0.01)
    assert (config.global_weight, config.local_weight, config.prior_weight) == (0.5, 1.5, 0.01)


def test_infomax_default_command_trains_on_cifar10():
    args = infomax.parse_args([])
    assert args.command == "train" and args.config.dataset == "cifar10"


def test_infomax_model_uses_the_configured_rate_and_loss_weights():
    """The model built from the default flags: Adam at 1e-3, and its training loss is
    0.5 * global + 1.5 * local + 0.01 * prior of the terms it reports."""
    config = infomax.parse_args(["--dataset", "folder", "--img-size", "8", "--z-dim", "8",
                                 "--no-jit"]).config
    model = infomax.build_model(config)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype("float32")
    terms = {k: float(v) for k, v in model.loss_parts(images).items()}
    assert min(terms["global"], terms["local"], terms["prior"]) > 1e-3  # all three count
    assert terms["loss"] == pytest.approx(
        0.5 * terms["global"] + 1.5 * terms["local"] + 0.01 * terms["prior"], rel=1e-6)


@pytest.mark.parametrize("dataset, scale", [
    ("cifar10", lambda x: x / 255.0 - 0.5),
    ("tiny-imagenet", lambda x: x / 255.0 * 2.0 - 1.0),
    ("folder", lambda x: x / 255.0 * 2.0 - 1.0)], ids=["cifar10", "tiny-imagenet", "folder"])
def test_infomax_pixels_are_scaled_per_dataset(dataset, scale):
    """x/255 - 0.5 for CIFAR-10, x/255*2 - 1 otherwise (docs/model.md, "Deep InfoMax with a KL
    prior"): on every 8-bit value,
    through `pixel_scale` (evaluation, k-NN) and through the training stream."""
    config = infomax.parse_args(["--dataset", dataset]).config
    values = np.arange(256, dtype="uint8").reshape(1, 16, 16, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(infomax.pixel_scale(config)(tf.constant(values)),
                               scale(values.astype("float64")), atol=1e-6)

    images = np.stack([np.full((4, 4, 3), 17 * i, "uint8") for i in range(16)])  # image i: 17*i
    batch = np.asarray(next(iter(infomax.training_stream(images, 16, config.pixel_range, seed=0))))
    np.testing.assert_allclose(np.sort(batch[:, 0, 0, 0]), scale(17.0 * np.arange(16)), atol=1e-6)
    assert np.all(batch == batch[:, :1, :1, :1])  # each image keeps its one value
