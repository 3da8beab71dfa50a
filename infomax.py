"""Deep InfoMax, Jianlin Su's variant with a KL prior (docs/model.md), in Keras 3.

An encoder x -> z is trained to make z recognisable: a global discriminator tells
[z, z] from [z, z of another image], and a local discriminator tells z next to every
position of the image's own 4x4x256 feature map from z next to another image's map
(negatives come from shuffling along the batch). Instead of the paper's adversarial
prior matching, z = mu + exp(logvar/2) * eps is a VAE posterior pulled towards N(0, I)
by its KL term. The feature extractor is x -> mu.

    python infomax.py --dataset cifar10 --data-dir data/cifar10 --out runs/dim-cifar10
    python infomax.py evaluate --out runs/dim-cifar10           # metrics again, no training
    python infomax.py index --out runs/dim-cifar10 --folder DIR  # search by image: index once
    python infomax.py search --out runs/dim-cifar10 --folder DIR --query DIR/some.jpg
    python infomax.py COMMAND --help                             # its flags

The story, top to bottom: configuration, data, encoder, discriminators, the loss, the
training model, training, the command line. What a trained encoder is good for (k-NN and
probe accuracies, neighbour pictures) is in feature_eval.py, search by image over an index of
a folder in search/ (which takes this file's encoder as a `search.Encoder`); the data sets are
in datasets.py.
"""

import argparse
import dataclasses
import functools
import os
import sys

import tf_setup  # first: TensorFlow's environment (oneDNN), imported without start-up noise
import imageio.v3 as iio
import numpy as np
import tensorflow as tf
import keras
from keras import ops

import common
import image_files
import cli
import datasets
import feature_eval
import search
from common import UsageError
from cli import option
from speedups import BatchNormalization, FusedAdam
from training import distribute, guards, monitor
from training.checkpoint import atomic_save_weights, load_weights
from training.precision import full_precision, networks, to_float32, wrap_optimizer
from training.run import RunSettings, fit_run, prepare_run

# =========================================================================== configuration

# Per-dataset defaults (docs/model.md, "Deep InfoMax with a KL prior", "Training and
# evaluation"); a flag left unset takes these.
DATASETS = {
    "cifar10": dict(img_size=32, batch_size=64, epochs=50, pixel_range=(-0.5, 0.5)),
    "tiny-imagenet": dict(img_size=64, batch_size=100, epochs=100, pixel_range=(-1.0, 1.0)),
    "folder": dict(img_size=64, batch_size=100, epochs=100, pixel_range=(-1.0, 1.0)),
}
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
PRETRAINED = os.path.join(SHIPPED, "dim-cifar10")  # the default of load_encoder
LOCAL_MAP_SIZE = 4          # the encoder pools down to a 4x4 local feature map ...
LOCAL_CHANNELS = 256        # ... of 256 channels, whatever the image size
DISCRIMINATOR_UNITS = 256
EPSILON = 1e-6              # inside the logs of the discriminator loss, as in the original

# Deep InfoMax paper (Hjelm et al. 2018, table 1/2), frozen encoder + 200-unit MLP with
# dropout, top-1 %: "conv" = last conv feature map, "fc" = fully connected layer, "Y" = code.
PAPER = {
    "cifar10": {"DIM(L) JSD": {"conv": 73.25, "fc": 73.62, "Y": 66.96},
                "DIM(G) JSD": {"conv": 52.2, "fc": 52.84, "Y": 43.17},
                "supervised": 75.39},
    "tiny-imagenet": {"DIM(L) JSD": {"conv": 33.54, "fc": 36.88, "Y": 31.66},
                      "supervised": 36.60},
}


@dataclasses.dataclass
class Config(RunSettings):
    """Hyperparameters, named as in docs/model.md, "Deep InfoMax with a KL prior"; None takes
    the dataset's default."""
    dataset: str = option("cifar10", "the training images", choices=sorted(DATASETS))
    data_dir: str = option(None, "cifar10: a cifar-10-batches-py folder, the folder holding it, "
                           "or cifar-10-python.tar.gz (default: Keras' downloader); "
                           "tiny-imagenet: the tiny-imagenet-200 folder; folder: any folder of "
                           "images (class = sub-folder)", type=str)
    img_size: int = option(None, "folder only: images are resized to this (default 64; 32 for "
                           "cifar10, 64 for tiny-imagenet)", type=int)
    batch_size: int = option(None, "images per step (default 64 for cifar10, 100 for the others)",
                             type=int)
    epochs: int = option(None, "train until this epoch (default 50 for cifar10, 100 for the "
                         "others)", type=int)
    steps_per_epoch: int = option(None, "steps between checkpoints and CSV lines (default: one "
                                  "pass over the training images)", type=int)
    lr: float = option(1e-3, "Adam learning rate")
    z_dim: int = option(256, "size of the code z (and of mu)")
    global_weight: float = option(0.5, "weight of the global mutual-information term")
    local_weight: float = option(1.5, "weight of the local mutual-information term")
    prior_weight: float = option(0.01, "weight of the KL prior term")
    local_size: int = option(LOCAL_MAP_SIZE, "side of the feature map the local term pairs z "
                             "with: 4, the author's (after the last pooling, 4x4x256), or an "
                             "earlier stage's (8: 8x8x128 at 32 px)")
    seed: int = option(0, "seed of the initial weights, the noise and the data order")
    monitor_knn: int = option(5000, "after every epoch, log the k-NN accuracy of mu with N "
                              "training images as the memory bank and N/5 test queries (0: off)",
                              metavar="N")
    pixel_range: tuple = None    # the model's pixel range, from the dataset (docs/model.md)
    data_order: str = datasets.OWN_STREAM  # no flag: the run folder decides (`train`)

    # a resumed run keeps these; runs saved before local_size existed lack it (they have 4),
    # and those saved before data_order existed had the shared key
    MODEL_KEYS = ("dataset", "img_size", "z_dim", "local_size", "data_order")
    ADDED_KEYS = ("local_size", "data_order")
    ASSUMED_BEFORE = {"data_order": datasets.SHARED_SEED}

    @property
    def loss_weights(self):
        return self.global_weight, self.local_weight, self.prior_weight


def resolve(config):
    """A new Config: `config` with the dataset's defaults filled in, every value checked (a
    one-line UsageError naming the flag, before anything is built)."""
    defaults = DATASETS[config.dataset]
    if config.dataset != "folder" and config.img_size not in (None, defaults["img_size"]):
        raise UsageError(f"--img-size {config.img_size}: fixed at {defaults['img_size']} for "
                         f"--dataset {config.dataset}")
    config = dataclasses.replace(config, pixel_range=defaults["pixel_range"], **{
        key: defaults[key] for key in ("img_size", "batch_size", "epochs")
        if getattr(config, key) is None})
    cli.check_at_least(config, 1, "epochs", "z_dim", "steps_per_epoch")
    cli.check_at_least(config, 2, "batch_size")  # negatives come from shuffling the batch
    cli.check_at_least(config, 0, "monitor_knn", "nan_patience")
    cli.check_positive(config, "lr")
    if config.img_size < 2 * LOCAL_MAP_SIZE or config.img_size & (config.img_size - 1):
        raise UsageError(f"--img-size {config.img_size}: must be a power of two >= "
                         f"{2 * LOCAL_MAP_SIZE}")
    sizes = [config.img_size >> i for i in range(1, len(stage_channels(config.img_size)) + 1)]
    if config.local_size not in sizes:
        raise UsageError(f"--local-size {config.local_size}: must be one of the encoder's "
                         f"feature-map sides at {config.img_size} px, "
                         f"{', '.join(map(str, sorted(sizes)))}")
    return config


# =========================================================================== data
# Loaders (datasets.py) give uint8 images and int labels; the model sees `to_model_pixels`.

def to_model_pixels(images, pixel_range):
    """uint8 0..255 -> the model's range: x/255 - 0.5 (CIFAR-10) or x/255*2 - 1 (others)."""
    lo, hi = pixel_range
    return ops.cast(images, "float32") / 255.0 * (hi - lo) + lo


def pixel_scale(config):
    """`to_model_pixels` for this configuration's data set, as a one-argument function."""
    return lambda images: to_model_pixels(images, config.pixel_range)


def training_stream(images, batch_size, pixel_range, seed, start=0, own_stream=True):
    """Training batches of model pixels from uint8 `images`, reshuffled every pass, from image
    number `start` of the stream (`datasets.array_stream`)."""
    return datasets.array_stream(images, batch_size,
                                 lambda x: to_model_pixels(x, pixel_range), seed, start,
                                 own_stream)


def load_data(config):
    """(training images, labels), (test images, labels) of the configured data set."""
    if config.dataset == "cifar10":
        return datasets.load_cifar10(config.data_dir)
    if config.dataset == "tiny-imagenet":
        return datasets.load_tiny_imagenet(config.data_dir, config.img_size)
    if config.data_dir is None:
        raise UsageError("--dataset folder needs --data-dir (a folder of images)")
    return datasets.load_folder(config.data_dir, config.img_size, config.seed)


# =========================================================================== encoder

def stage_channels(img_size):
    """Channels of the conv + pool stages that bring img_size down to the 4x4 local map:
    (64, 128, 256) at 32 px and (32, 64, 128, 256) at 64 px, halving further back."""
    stages = int(np.log2(img_size // LOCAL_MAP_SIZE))
    return [LOCAL_CHANNELS // 2 ** (stages - 1 - i) for i in range(stages)]


def conv_bn_lrelu(x, channels, sync_bn=False):
    x = keras.layers.Conv2D(channels, 3, padding="same")(x)
    x = BatchNormalization(synchronized=sync_bn)(x)  # Keras', with the fused kernel (speedups.py)
    return keras.layers.LeakyReLU(negative_slope=0.2)(x)


def build_encoder(img_size, z_dim, sync_bn=False, local_size=LOCAL_MAP_SIZE):
    """x -> (mu, logvar, local feature map C of 4x4x256). The feature extractor is x -> mu.
    `sync_bn`: batch statistics over all replicas' images. `local_size`: C is the map after the
    pooling that brings it to this side (4, the author's: the last one)."""
    images = keras.Input((img_size, img_size, 3), name="images")
    x, local_map = images, None
    for channels in stage_channels(img_size):
        x = keras.layers.MaxPooling2D(2)(conv_bn_lrelu(x, channels, sync_bn))
        if x.shape[1] == local_size:
            local_map = x
    if local_map is None:
        raise ValueError(f"no {local_size}x{local_size} feature map at {img_size} px")
    for _ in range(2):
        x = conv_bn_lrelu(x, LOCAL_CHANNELS, sync_bn)
    x = keras.layers.GlobalMaxPooling2D()(x)
    mu = keras.layers.Dense(z_dim, name="mu")(x)
    logvar = keras.layers.Dense(z_dim, name="logvar")(x)
    return keras.Model(images, [mu, logvar, local_map], name="encoder")


def feature_extractor(encoder):
    """x -> mu, sharing the encoder's layers (the model whose size docs/model.md quotes)."""
    return keras.Model(encoder.input, encoder.outputs[0], name="feature_extractor")


# =========================================================================== discriminators

def build_discriminator(input_shape, name):
    """Dense(256, relu) x 3 -> Dense(1, sigmoid) on the last axis. On (4, 4, 512) inputs this
    is the local discriminator: the same MLP at every position (= 1x1 convolutions). The
    score, which goes into a log, is computed in float32 whatever the precision."""
    return keras.Sequential(
        [keras.Input(input_shape)]
        + [keras.layers.Dense(DISCRIMINATOR_UNITS, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(1, activation="sigmoid", dtype=full_precision())], name=name)


# =========================================================================== the loss

def concatenated_scores(discriminator, left, right, perm):
    """The form of docs/model.md ("Deep InfoMax with a KL prior", "Architecture"): the
    discriminator on the concatenated pairs, positives [left, right] and negatives
    [left, right[perm]], with `left` tiled over `right`'s positions (z next to each pixel of
    the feature map). `score_pairs` computes the same with less work."""
    if len(right.shape) == 4:
        left = ops.tile(left, (1, right.shape[1], right.shape[2], 1))
    return (discriminator(ops.concatenate([left, right], axis=-1)),
            discriminator(ops.concatenate([left, ops.take(right, perm, axis=0)], axis=-1)))


def score_pairs(discriminator, left, right, perm):
    """`concatenated_scores`, the same function with less work (tests/test_speed.py,
    test_infomax_pair_scores_and_gradients_equal_the_concatenation, checks that the loss and
    all gradients are equal): the first Dense layer of [a, b] is a @ W_a + b @ W_b + bias, so
    z is multiplied once per image (not once per pixel and pair), and the negatives reuse the
    feature map's product, gathered. That is a quarter of the local discriminator's
    first-layer FLOPs, and no tiled copies of z. `left` is (B, z) or (B, 1, 1, z)."""
    first, rest = discriminator.layers[0], discriminator.layers[1:]
    dtype = first.compute_dtype  # the layer's own precision, as when Keras calls it
    kernel = ops.cast(first.kernel, dtype)
    kernel_left, kernel_right = ops.split(kernel, [left.shape[-1]], axis=0)
    left = ops.matmul(ops.cast(left, dtype), kernel_left)
    right = ops.matmul(ops.cast(right, dtype), kernel_right) + ops.cast(first.bias, dtype)
    positives = first.activation(left + right)
    negatives = first.activation(left + ops.take(right, perm, axis=0))
    for layer in rest:
        positives, negatives = layer(positives), layer(negatives)
    return positives, negatives


def infomax_loss(global_discriminator, local_discriminator, z, mu, logvar, local_map,
                 global_perm, local_perm, weights=(0.5, 1.5, 0.01)):
    """docs/model.md, "Deep InfoMax with a KL prior", "The loss":
        global = -mean(log(T_g([z, z]) + 1e-6) + log(1 - T_g([z, z[perm]]) + 1e-6))
        local  = the same with T_l on [tile(z), C] vs [tile(z), C[perm']], mean over batch and 4x4
        prior  = -0.5 * mean(1 + logvar - mu^2 - exp(logvar))
        loss   = 0.5 * global + 1.5 * local + 0.01 * prior
    `global_perm` and `local_perm` are two independent permutations of the batch: the
    negatives pair z with another image's code / feature map. The pairs are scored by
    `score_pairs` (equal to `concatenated_scores`, the form docs/model.md describes).
    Returns the loss, its three parts and the discriminators' accuracies (threshold 0.5).
    """
    global_pos, global_neg = score_pairs(global_discriminator, z, z, global_perm)
    local_pos, local_neg = score_pairs(local_discriminator, z[:, None, None, :], local_map,
                                       local_perm)

    global_term = -ops.mean(ops.log(global_pos + EPSILON) + ops.log(1.0 - global_neg + EPSILON))
    local_term = -ops.mean(ops.log(local_pos + EPSILON) + ops.log(1.0 - local_neg + EPSILON))
    prior_term = -0.5 * ops.mean(1.0 + logvar - ops.square(mu) - ops.exp(logvar))
    global_weight, local_weight, prior_weight = weights
    loss = global_weight * global_term + local_weight * local_term + prior_weight * prior_term

    def accuracy(scores, positive):
        return ops.mean(ops.cast(scores > 0.5 if positive else scores < 0.5, "float32"))
    return {"loss": loss, "global": global_term, "local": local_term, "prior": prior_term,
            "global_acc_pos": accuracy(global_pos, True), "global_acc_neg": accuracy(global_neg, False),
            "local_acc_pos": accuracy(local_pos, True), "local_acc_neg": accuracy(local_neg, False)}


# =========================================================================== training model

def random_permutation(n, seed_generator, groups=1):
    """A fresh permutation of range(n): argsort of uniform noise (XLA-friendly), within each of
    `groups` equal blocks of consecutive images (so an image is only paired inside its block).

    On several replicas, n is the replica's part of the batch and its keys are its rows of the
    keys one device draws for the global batch (`distribute.replica_draw`): negatives come from
    the replica's own part, and one device with `groups` = the number of replicas draws exactly
    the same pairs.
    """
    keys = distribute.replica_draw(lambda shape: keras.random.uniform(shape, seed=seed_generator),
                                   (n,))
    block_order = ops.argsort(ops.reshape(keys, (groups, -1)), axis=-1)
    block_size = ops.cast(n // groups, block_order.dtype)
    block_start = ops.arange(groups, dtype=block_order.dtype)[:, None] * block_size
    return ops.reshape(block_order + block_start, (-1,))


class InfoMax(guards.GuardedModel):
    """Encoder + global and local discriminators, trained end to end on the InfoMax loss by
    GuardedModel's step (a non-finite step is undone and counted, the epoch means of LOG_NAMES
    are logged)."""

    LOG_NAMES = ("loss", "global", "local", "prior",
                 "global_acc_pos", "global_acc_neg", "local_acc_pos", "local_acc_neg")

    def __init__(self, img_size, z_dim=256, loss_weights=(0.5, 1.5, 0.01), seed=None,
                 sync_bn=False, negative_groups=1, local_size=LOCAL_MAP_SIZE,
                 precision="float32", **kwargs):
        super().__init__(dtype=full_precision(), **kwargs)  # the loss and its parts: float32
        with networks(precision):  # the encoder and discriminators: in `precision`
            self.encoder = build_encoder(img_size, z_dim, sync_bn, local_size)
            self.global_discriminator = build_discriminator((2 * z_dim,), "global_discriminator")
            side, _, channels = self.encoder.outputs[2].shape[1:]
            self.local_discriminator = build_discriminator((side, side, z_dim + channels),
                                                           "local_discriminator")
        self.loss_weights_ = tuple(loss_weights)
        self.negative_groups = negative_groups  # negatives within blocks of each replica's part
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.init_trackers()

    def call(self, images, training=False):
        return self.encoder(images, training=training)[0]

    def loss_parts(self, images, training=False, global_perm=None, local_perm=None):
        """Sample z from the posterior, draw the two negative permutations, score the loss.
        On several replicas each scores its own part of the batch (with its rows of the global
        batch's noise), drawing negatives from that part."""
        mu, logvar, local_map = map(to_float32, self.encoder(images, training=training))
        noise = distribute.replica_draw(
            lambda shape: keras.random.normal(shape, seed=self.seed_generator), ops.shape(mu))
        z = mu + ops.exp(logvar / 2) * noise
        batch = ops.shape(images)[0]
        if global_perm is None:
            global_perm = random_permutation(batch, self.seed_generator, self.negative_groups)
        if local_perm is None:
            local_perm = random_permutation(batch, self.seed_generator, self.negative_groups)
        return infomax_loss(self.global_discriminator, self.local_discriminator, z, mu, logvar,
                            local_map, global_perm, local_perm, self.loss_weights_)


def build_model(config):
    """The InfoMax model of `config`, compiled and built (weights, optimiser slots)."""
    keras.utils.set_random_seed(config.seed)  # the same seed gives the same initial weights
    model = InfoMax(config.img_size, config.z_dim, config.loss_weights, seed=config.seed,
                    sync_bn=config.sync_bn, local_size=config.local_size,
                    precision=config.precision)
    model.compile(optimizer=wrap_optimizer(FusedAdam(config.lr), config.precision),
                  jit_compile=bool(config.jit_compile))
    model.build((None, config.img_size, config.img_size, 3))
    model.optimizer.build(model.trainable_variables)  # so that a resume can load its state
    return model


def benchmark_setup(dataset="cifar10", batch_size=64, quick=False, precision="float32"):
    """For bench/bench.py: the model of `dataset` at its documented size (docs/model.md) in
    `precision`, compiled as for training, and one batch of random images in the model's pixel
    range (batch 8 with `quick`)."""
    config = resolve(Config(dataset=dataset, batch_size=8 if quick else batch_size,
                            jit_compile=bool(tf_setup.visible_gpus()), precision=precision))
    model = build_model(config)
    shape = (config.batch_size, config.img_size, config.img_size, 3)
    images = np.random.RandomState(0).randint(0, 256, shape).astype("uint8")
    return model, to_model_pixels(tf.constant(images), config.pixel_range)


def random_encoder(config):
    """The same architecture with the same initial weights as a fresh run (the baseline)."""
    return build_model(config).encoder


# =========================================================================== training

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How a trained encoder is measured after training (`evaluate_encoder`): epochs of the
    linear and MLP probes, whether to measure the randomly initialised encoder too, and N
    for only the first N train and N/5 test images (None: all)."""
    probe_epochs: int = 10
    baseline: bool = True
    eval_limit: int = None

    @classmethod
    def from_args(cls, args):
        return cls(args.probe_epochs, args.baseline, args.eval_limit)


class SaveEncoder(keras.callbacks.Callback):
    """After every epoch: the encoder alone, `encoder.weights.h5` (loads into `build_encoder`).
    `save` again at the end of a command: a save that a full disk stopped after the epoch's
    checkpoint is made up for by the same command, even when that epoch was the last."""

    def __init__(self, run_dir):
        super().__init__()
        self.path = os.path.join(run_dir, "encoder.weights.h5")

    def on_epoch_end(self, epoch, logs=None):
        self.save(self.model.encoder, kept=f"epoch {epoch + 1} is saved; the previous "
                                           "encoder.weights.h5 is intact")

    def save(self, encoder, kept=None):
        atomic_save_weights(encoder, self.path, kept=kept)


def train(config, out, evaluation):
    """Train (or resume) the run in `out` (in the data order it started with,
    `datasets.run_data_order`), then evaluate its encoder (metrics, pictures) as `evaluation`
    (an Evaluation) says."""
    config = dataclasses.replace(config, data_order=datasets.run_data_order(out))

    def checked_data():
        training_set, test_set = load_data(config)
        if len(training_set[0]) < config.batch_size:
            raise UsageError(f"--batch-size {config.batch_size}: larger than the "
                             f"{len(training_set[0])} training images")
        return training_set, test_set

    with prepare_run(config, out, Config.MODEL_KEYS, per_replica_minimum=2,  # 2: a negative
                     load_data=checked_data) as run:                        # in every replica
        config = run.config  # XLA decided
        training_set, test_set = run.data
        print(f"{config.dataset}: {len(training_set[0])} training and {len(test_set[0])} test "
              f"images of {config.img_size}x{config.img_size}")
        steps = config.steps_per_epoch or len(training_set[0]) // config.batch_size

        def build():
            model = build_model(config)
            count = monitor.count_parameters
            print(f"parameters: {count(model.trainable_weights):,} trainable (feature extractor "
                  f"x -> mu {count(feature_extractor(model.encoder).trainable_weights):,}), "
                  f"{count(model.non_trainable_weights):,} batch-norm statistics")
            return model

        def stream(images_seen):
            return training_stream(training_set[0], config.batch_size, config.pixel_range,
                                   config.seed, start=images_seen,
                                   own_stream=config.data_order == datasets.OWN_STREAM)

        monitors = []
        if config.monitor_knn and (training_set[1] >= 0).all() and len(test_set[0]):
            monitors.append(feature_eval.KnnMonitor(training_set, test_set, pixel_scale(config),
                                                    config.monitor_knn, config.seed))
        save_encoder = SaveEncoder(run.dir)
        model = fit_run(run, config, Config.MODEL_KEYS, build, stream, steps, monitors=monitors,
                        callbacks=[save_encoder])
        if distribute.is_chief(run.strategy):
            save_encoder.save(model.encoder)
            evaluate_encoder(run.dir, model.encoder, config, training_set, test_set, evaluation)
            for metric in ("cosine", "euclidean"):
                picture = os.path.join(run.dir, f"neighbours_{metric}.png")
                monitor.log_picture(run.dir, f"neighbours_{metric}", iio.imread(picture),
                                    int(model.optimizer.iterations.numpy()))
        else:
            print("the chief evaluates the encoder and writes the pictures")
        distribute.wait_for_all_workers(run.strategy)
        return model


def evaluate_encoder(run_dir, encoder, config, training_set, test_set, evaluation):
    """feature_eval.evaluate_encoder with this run's pixels, baseline and the paper's numbers."""
    return feature_eval.evaluate_encoder(
        run_dir, encoder, training_set, test_set, pixel_scale(config),
        probe_epochs=evaluation.probe_epochs, seed=config.seed, limit=evaluation.eval_limit,
        baseline=random_encoder(config) if evaluation.baseline else None,
        about={"features": {"mu": f"the global code mu ({config.z_dim})",
                            "local": "the local feature map C flattened ({} = {})".format(
                                "x".join(map(str, encoder.outputs[2].shape[1:])),
                                int(np.prod(encoder.outputs[2].shape[1:])))},
               "paper": PAPER.get(config.dataset)})


# =========================================================================== the article's experiment

# Arms of the article's comparison: only the global term, only the local term, both. Each
# keeps the configured weights of the terms it has (the author's 0.5 / 1.5 / 0.01 by default).
ABLATION = {"global": dict(local_weight=0.0), "local": dict(global_weight=0.0), "both": {}}
ABLATION_COLUMNS = ("knn_k1", "knn_k200_weighted", "linear_probe", "mlp_probe")


def ablation(config, out, evaluation):
    """The article's global-versus-local comparison: one run per arm of ABLATION in
    `out/<arm>` (the same data, seed, initial weights and budget; each resumable as any run),
    the randomly initialised encoder measured once (`out/random`), then one table of k-NN and
    probe accuracies of mu and of the local map (ablation.md, .csv, .json) and one picture of
    each arm's cosine neighbours of the same query images side by side."""
    arms = dataclasses.replace(evaluation, baseline=False)
    encoders = {}
    for arm, weights in ABLATION.items():
        print(f"--- ablation arm {arm!r}: global {weights.get('global_weight', config.global_weight)}, "
              f"local {weights.get('local_weight', config.local_weight)}, prior "
              f"{config.prior_weight}", flush=True)
        arm_config = dataclasses.replace(config, **weights)
        encoders[arm] = train(arm_config, os.path.join(out, arm), arms).encoder
    training_set, test_set = load_data(config)
    random_dir = common.ensure_writable_dir(os.path.join(out, "random"))
    print("--- the randomly initialised encoder (the arms' initial weights)", flush=True)
    encoders["random"] = random_encoder(config)
    evaluate_encoder(random_dir, encoders["random"], config, training_set, test_set, arms)
    rows = []
    for arm in encoders:
        metrics_path = os.path.join(out, arm, "metrics.json")
        trained = common.read_json(metrics_path)["trained"] if os.path.exists(metrics_path) else {}
        for feature in [f for f in ("mu", "local") if f in trained]:
            rows.append({"model": arm, "feature": feature,
                         **{c: round(100 * trained[feature][c], 2) for c in ABLATION_COLUMNS}})
    write_ablation_table(out, rows, config)
    scale = pixel_scale(config)
    queries = test_set[0] if len(test_set[0]) else training_set[0]
    codes = {f"{arm} only" if arm in ("global", "local") else arm:
             (feature_eval.encode(encoder, training_set[0], scale)["mu"],
              feature_eval.encode(encoder, queries, scale)["mu"])
             for arm, encoder in encoders.items() if arm != "random"}
    print(feature_eval.save_neighbour_comparison(
        os.path.join(out, "ablation_neighbours.png"), codes, training_set[0], queries,
        config.seed))
    return rows


def write_ablation_table(out, rows, config):
    """ablation.csv and ablation.json (the rows), ablation.md (a Markdown table), printed."""
    header = ["model", "feature", *ABLATION_COLUMNS]
    with open(os.path.join(out, "ablation.csv"), "w") as f:
        f.write(",".join(header) + "\n")
        f.writelines(",".join(str(row[h]) for h in header) + "\n" for row in rows)
    common.write_json(os.path.join(out, "ablation.json"), {
        "rows": rows, "config": dataclasses.asdict(config),
        "columns": "top-1 % on the test split: cosine k-NN k=1 and k=200 (votes exp(cos/0.07)), "
                   "linear and MLP probes on frozen standardised features"})
    lines = ["| model | feature | k-NN k=1 | k-NN k=200 | linear probe | MLP probe |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['model']} | {row['feature']} | "
              + " | ".join(f"{row[c]:.2f}" for c in ABLATION_COLUMNS) + " |" for row in rows]
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# =========================================================================== commands on a run

def load_run_config(out, weights):
    """The Config saved in `out` (and the path of its `weights` file), or a UsageError."""
    config_path = os.path.join(out, "config.json")
    weights_path = os.path.join(out, f"{weights}.weights.h5")
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise UsageError(f"--out {out!r}: no saved run there (expected config.json and "
                         f"{weights}.weights.h5)")
    config = cli.read_run_config(config_path, Config)
    return dataclasses.replace(config, pixel_range=tuple(config.pixel_range),
                               jit_compile=False), weights_path


def evaluate(args):
    """Rebuild the saved run's model from its config.json and weights; no training."""
    config, weights = load_run_config(args.out, args.weights)
    config = dataclasses.replace(config, data_dir=args.data_dir or config.data_dir)
    training_set, test_set = load_data(config)
    model = build_model(config)
    try:
        load_weights(model, weights)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{weights}: cannot load ({e})") from None
    evaluate_encoder(args.out, model.encoder, config, training_set, test_set,
                     Evaluation.from_args(args))


def encoder_run_config(folder):
    """(config, encoder weights path) of a trained run (a folder, or the name of an encoder
    shipped in pretrained/), or a one-line UsageError."""
    if not os.path.isdir(folder) and os.path.isdir(os.path.join(SHIPPED, folder)):
        folder = os.path.join(SHIPPED, folder)
    if not os.path.isfile(os.path.join(folder, "encoder.weights.h5")) or not os.path.isfile(
            os.path.join(folder, "config.json")):
        raise UsageError(f"--out {folder!r}: no trained encoder there (expected config.json and "
                         "encoder.weights.h5 from a training run)")
    return load_run_config(folder, "encoder")


def load_encoder(folder=PRETRAINED):
    """(encoder, config) of a run folder's config.json and encoder.weights.h5, or of an encoder
    shipped in pretrained/ by its name; by default the author's setting trained 50 epochs on
    CIFAR-10 (pretrained/dim-cifar10/). The encoder maps model pixels to (mu, logvar, local
    map); `embed` takes uint8 images."""
    config, weights = encoder_run_config(folder)
    encoder = build_encoder(config.img_size, config.z_dim, local_size=config.local_size)
    encoder.load_weights(weights)
    return encoder, config


def embed(images, encoder, config):
    """mu of uint8 images (N, S, S, 3) at the encoder's size, in inference mode: the features."""
    return feature_eval.encode(encoder, np.asarray(images, np.uint8), pixel_scale(config))["mu"]


def code_function(encoder, config):
    """uint8 images (B, S, S, 3) -> mu (B, z_dim), in inference mode, one compiled graph for
    every batch size (what search by image encodes with)."""
    extractor = feature_extractor(encoder)
    spec = tf.TensorSpec((None, config.img_size, config.img_size, 3), tf.uint8)
    return tf.function(lambda images: extractor(to_model_pixels(images, config.pixel_range),
                                                training=False), input_signature=[spec])


def search_encoder(folder=PRETRAINED):
    """The encoder of a trained run as search by image takes it (a search.Encoder): uint8
    images to mu, fingerprinted by its encoder.weights.h5 and config; the weights are loaded
    on the first images (an index that is up to date needs none)."""
    config, weights = encoder_run_config(folder)

    @functools.cache
    def compiled():
        return code_function(*load_encoder(folder))

    return search.Encoder(
        codes_of=lambda images: compiled()(images).numpy(),
        fingerprint=search.fingerprint(weights, config.img_size, config.pixel_range, config.z_dim),
        source=os.path.abspath(folder))


def index(args):
    """Index every image under --folder with the run's encoder, or bring that index up to
    date (search/)."""
    return search.index_command(args, search_encoder)


def search_command(args):
    """The nearest indexed images (by mu) of each --query image (search/)."""
    return search.search_command(args, search_encoder, default_out="runs/infomax")


def encode_folder(args):
    """mu of every image under --folder, in file order: `<dest>.npy` and `<dest>.csv` (file, row)."""
    encoder, config = load_encoder(args.out)
    files = image_files.scan_image_folder(args.folder, config.img_size, "--folder")
    dest = args.dest or os.path.join(args.out, "encoded",
                                     os.path.basename(os.path.normpath(args.folder)))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    images, _ = datasets.decode_images(files, config.img_size)
    np.save(dest + ".npy", embed(images, encoder, config).astype(np.float32))
    with open(dest + ".csv", "w") as f:
        f.write("file,row\n")
        f.writelines(f"{os.path.relpath(path, args.folder)},{row}\n" for row, path in enumerate(files))
    print(f"{dest}.npy: mu of {len(files)} images ({config.z_dim} numbers each); {dest}.csv")


def export(args):
    """`<dest>/feature_extractor`, a TensorFlow SavedModel (tf.saved_model.load(...).embed(
    uint8 images) -> mu), beside the run's encoder.weights.h5 (the weights without optimiser)."""
    encoder, config = load_encoder(args.out)
    dest = args.dest or os.path.join(args.out, "export")
    size = config.img_size
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint("embed", lambda images: encoder(to_model_pixels(images, config.pixel_range),
                                                         training=False)[0],
                         [tf.TensorSpec((None, size, size, 3), tf.uint8)])
    archive.write_out(os.path.join(dest, "feature_extractor"), verbose=False)
    print(f"{dest}/feature_extractor (embed(images) -> mu); inference weights: "
          f"{os.path.join(args.out, 'encoder.weights.h5')}")


# =========================================================================== command line

COMMANDS = {"train": "train a run, or resume the one in --out (the default command)",
            "evaluate": "the metrics and pictures of a saved run again, without training",
            "index": "index a folder's images with a run's encoder, or bring its index up "
                     "to date (only new and changed files are encoded)",
            "search": "search by image: the nearest indexed images of query images",
            "ablation": "the article's experiment: global only, local only and both, the same "
                        "data, seed and budget; one table and one neighbour picture",
            "encode": "mu of every image of a folder, to .npy and .csv",
            "export": "a SavedModel of the feature extractor (uint8 images to mu)"}


def add_evaluation_flags(parser):
    parser.add_argument("--probe-epochs", type=int, default=10,
                        help="epochs of the linear and MLP probes")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure a randomly initialised encoder")
    parser.add_argument("--eval-limit", type=int, default=None, metavar="N",
                        help="use only the first N train and N/5 test images for the metrics "
                             "(quick looks; default: all)")


def parse_args(argv=None):
    """The command and its flags; for `train`, `args.config` is the resolved Config."""
    parser, commands = cli.command_parser(__doc__, COMMANDS)
    for name, out in (("train", "runs/infomax"), ("ablation", "runs/infomax-ablation")):
        cli.add_config_flags(commands[name], Config)
        commands[name].add_argument("--out", default=out,
                                    help="run folder (the same --out resumes)")
        add_evaluation_flags(commands[name])

    evaluate_flags = commands["evaluate"]
    evaluate_flags.add_argument("--out", default="runs/infomax", help="the run folder")
    evaluate_flags.add_argument("--weights", choices=("latest", "best"), default="latest",
                                help="which saved weights (best = lowest epoch loss)")
    evaluate_flags.add_argument("--data-dir", default=None,
                                help="where the run's data set is now (default: as saved)")
    add_evaluation_flags(evaluate_flags)

    search.add_index_flags(commands["index"], default_out="runs/infomax")
    search.add_search_flags(commands["search"], default_out="runs/infomax")

    for name in ("encode", "export"):
        commands[name].add_argument("--out", default="runs/infomax", help="the run folder")
        commands[name].add_argument("--dest", default=None,
                                    help="where to write (default: in --out: encoded/<folder "
                                         "name> for encode, export/ for export)")
    commands["encode"].add_argument("--folder", required=True,
                                    help="the images to encode (recursively)")

    args = parser.parse_args(argv)
    cli.check_at_least(args, 1, *[f for f in ("probe_epochs", "eval_limit", "top")
                                     if hasattr(args, f)])
    if args.command == "index":
        cli.check_at_least(args, 1, "batch_size", "commit_every")
    if args.command == "search":
        cli.check_at_least(args, 0, "max_pictures")
    if args.command in ("train", "ablation"):
        args.config = resolve(cli.config_from_args(Config, args))
    return args


def main(argv=None):
    def command():
        args = parse_args(argv)
        if args.command in ("train", "ablation"):
            {"train": train, "ablation": ablation}[args.command](args.config, args.out,
                                                                 Evaluation.from_args(args))
        else:
            {"evaluate": evaluate, "index": index, "search": search_command,
             "encode": encode_folder, "export": export}[args.command](args)
    return common.run_main(command)


if __name__ == "__main__":
    sys.exit(main())
