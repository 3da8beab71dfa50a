"""Deep InfoMax, Jianlin Su's variant with a KL prior (SPEC.md section 2), in Keras 3.

An encoder x -> z is trained to make z recognisable: a global discriminator tells
[z, z] from [z, z of another image], and a local discriminator tells z next to every
position of the image's own 4x4x256 feature map from z next to another image's map
(negatives come from shuffling along the batch). Instead of the paper's adversarial
prior matching, z = mu + exp(logvar/2) * eps is a VAE posterior pulled towards N(0, I)
by its KL term. The feature extractor is x -> mu.

    python infomax.py --dataset cifar10 --data-dir data/cifar10 --out runs/dim-cifar10
    python infomax.py evaluate --out runs/dim-cifar10           # metrics again, no training
    python infomax.py search --out runs/dim-cifar10 --folder DIR --query DIR/some.jpg

The story, top to bottom: configuration, data, encoder, discriminators, the loss, the
training model, then what a trained encoder is good for (neighbour pictures, k-NN and
probe accuracies, search by image) and the command line.
"""

import argparse
import glob
import os
import pickle
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels for convolutions and matmuls on x86 CPUs are on by default only
# on recent Intel CPUs; elsewhere (this AMD AVX2 machine) they run these models' training steps
# 1.3-1.5x faster than the default Eigen kernels (README.md, Benchmark). Read once, at import of
# TensorFlow; no effect on GPUs. TF_ENABLE_ONEDNN_OPTS=0 turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np
import tensorflow as tf
import keras
from keras import layers, ops

from layers import BatchNormalization  # the project's layers/ (not keras.layers)

import common
from common import (FusedAdam, UsageError, atomic_save_weights, check_run_config,
                    ensure_writable_dir, fail, find_readable_images, image_dataset, read_json,
                    replica_draw, save_grid, scan_image_folder, write_json, RunCheckpoint)

# --------------------------------------------------------------------------- configuration

# Per-dataset defaults of SPEC.md section 2 (a flag left unset takes these).
DATASETS = {
    "cifar10": dict(img_size=32, batch_size=64, epochs=50, pixel_range=(-0.5, 0.5)),
    "tiny-imagenet": dict(img_size=64, batch_size=100, epochs=100, pixel_range=(-1.0, 1.0)),
    "folder": dict(img_size=64, batch_size=100, epochs=100, pixel_range=(-1.0, 1.0)),
}
MODEL_KEYS = ("dataset", "img_size", "z_dim")  # a resumed run must keep these
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


def parse_args(argv=None):
    p = common.ArgumentParser(
        description="Deep InfoMax with a KL prior (SPEC.md section 2): train (default), "
                    "evaluate a saved run, or search a folder by image with a trained encoder.")
    p.add_argument("command", nargs="?", default="train", choices=["train", "evaluate", "search"])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    p.add_argument("--data-dir", help="cifar10: a cifar-10-batches-py folder, the folder holding it, "
                   "or cifar-10-python.tar.gz (default: Keras' downloader); tiny-imagenet: the "
                   "tiny-imagenet-200 folder; folder: any folder of images (class = sub-folder)")
    p.add_argument("--out", default="runs/infomax", help="run folder (the same --out resumes)")
    p.add_argument("--img-size", type=int, help="folder only: images are resized to this (default 64)")
    p.add_argument("--batch-size", type=int, help="default 64 (cifar10) / 100 (others)")
    p.add_argument("--epochs", type=int, help="default 50 (cifar10) / 100 (others)")
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the training images")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--z-dim", type=int, default=256)
    p.add_argument("--global-weight", type=float, default=0.5)
    p.add_argument("--local-weight", type=float, default=1.5)
    p.add_argument("--prior-weight", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the training step with XLA (default: only if a GPU is visible; "
                        "on a CPU TensorFlow's own oneDNN kernels are faster; "
                        "never with --distribute)")
    common.add_run_flags(p)
    p.add_argument("--monitor-knn", type=int, default=5000, metavar="N",
                   help="after every epoch, log the k-NN accuracy of mu with N training images as "
                        "the memory bank and N/5 test queries (0: off)")
    # evaluation
    p.add_argument("--weights", choices=["latest", "best"], default="latest",
                   help="evaluate: which saved weights (best = lowest epoch loss)")
    p.add_argument("--probe-epochs", type=int, default=10)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a randomly initialised encoder")
    p.add_argument("--eval-limit", type=int, help="use only the first N train and N/5 test images "
                   "for the metrics (quick looks; the default is all)")
    # search by image
    p.add_argument("--folder", help="search: the folder of images to index")
    p.add_argument("--query", nargs="+", help="search: one or more query image files")
    p.add_argument("--top", type=int, default=9)
    p.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    args = p.parse_args(argv)

    defaults = DATASETS[args.dataset]
    if args.dataset != "folder" and args.img_size not in (None, defaults["img_size"]):
        p.error(f"--img-size is fixed at {defaults['img_size']} for --dataset {args.dataset}")
    for key in ("img_size", "batch_size", "epochs"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.pixel_range = defaults["pixel_range"]
    if args.jit is None:
        args.jit = bool(tf.config.list_physical_devices("GPU"))
    for flag, value in [("--batch-size", args.batch_size), ("--epochs", args.epochs),
                        ("--z-dim", args.z_dim), ("--top", args.top)]:
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (negatives come from shuffling the batch)")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        p.error(f"--steps-per-epoch must be at least 1, got {args.steps_per_epoch}")
    for flag, value in [("--probe-epochs", args.probe_epochs), ("--eval-limit", args.eval_limit)]:
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    for flag, value in [("--monitor-knn", args.monitor_knn), ("--nan-patience", args.nan_patience)]:
        if value < 0:
            p.error(f"{flag} must be 0 or more, got {value}")
    if not (args.lr > 0 and np.isfinite(args.lr)):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.img_size < 2 * LOCAL_MAP_SIZE or args.img_size & (args.img_size - 1):
        p.error(f"--img-size must be a power of two >= {2 * LOCAL_MAP_SIZE}, got {args.img_size}")
    return args


# --------------------------------------------------------------------------- data
# Every loader returns uint8 images (N, S, S, 3) and int labels (N,) (-1 when unknown) for a
# training and a test split. The model sees them through `to_model_pixels`.

def to_model_pixels(images, pixel_range):
    """uint8 0..255 -> the model's range: x/255 - 0.5 (CIFAR-10) or x/255*2 - 1 (others)."""
    lo, hi = pixel_range
    return ops.cast(images, "float32") / 255.0 * (hi - lo) + lo


def read_cifar_batch(f):
    """One python-pickle CIFAR batch (protocol 2, bytes keys) -> uint8 (n, 32, 32, 3), labels."""
    batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B, row-major
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return images, labels


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


def load_cifar10(data_dir=None):
    """CIFAR-10 from a cifar-10-batches-py folder (or its parent), the official tarball,
    or, without `data_dir`, Keras' own loader (which needs the network once)."""
    if data_dir is None:
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        except Exception as e:  # noqa: BLE001 - offline, proxy, bad cache: all mean the same here
            raise UsageError(
                f"--dataset cifar10: Keras could not download CIFAR-10 ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); pass --data-dir with a local "
                "cifar-10-batches-py folder or cifar-10-python.tar.gz (one can be built with "
                "../shared/tools/cifar10_from_jpeg.py)") from None
        return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1))

    candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
    folder = next((c for c in candidates if os.path.isfile(os.path.join(c, "data_batch_1"))), None)
    tarball = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, "cifar-10-python.tar.gz")
    try:
        if folder is not None:
            def read(names):
                parts = []
                for name in names:
                    with open(os.path.join(folder, name), "rb") as f:
                        parts.append(read_cifar_batch(f))
                return parts
            train, test = read(CIFAR_TRAIN), read(CIFAR_TEST)
        elif os.path.isfile(tarball):
            with tarfile.open(tarball) as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if n not in members]
                if missing:
                    raise ValueError(f"no {', '.join(missing)} inside")
                train = [read_cifar_batch(tar.extractfile(members[n])) for n in CIFAR_TRAIN]
                test = [read_cifar_batch(tar.extractfile(members[n])) for n in CIFAR_TEST]
        else:
            raise UsageError(f"--data-dir {data_dir!r}: expected a cifar-10-batches-py folder "
                             "(data_batch_1..5, test_batch), the folder containing it, or "
                             "cifar-10-python.tar.gz")
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, tarfile.TarError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--data-dir {data_dir!r}: not readable as CIFAR-10 python batches "
                         f"({type(e).__name__}: {e})") from None

    def join(parts):
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return join(train), join(test)


def decode_images(files, img_size, labels=None):
    """Decode image files (in parallel, in order) into uint8 (N, S, S, 3); greyscale -> RGB."""
    if not files:
        return np.zeros((0, img_size, img_size, 3), np.uint8), np.zeros(0, np.int64)
    index = np.arange(len(files))
    ds = image_dataset(files, img_size, batch_size=256, scale=lambda x: x, shuffle=False,
                       repeat=False, seed=0, drop_remainder=False, labels=index)
    images = np.zeros((len(files), img_size, img_size, 3), np.uint8)
    progress = keras.utils.Progbar(len(files), unit_name="image")
    for batch, batch_index in ds:
        images[batch_index.numpy()] = np.round(batch.numpy()).astype(np.uint8)
        progress.add(len(batch_index))
    return images, (np.full(len(files), -1) if labels is None else np.asarray(labels))


def load_tiny_imagenet(data_dir, img_size=64):
    """Official tiny-imagenet-200 layout: train/<wnid>/images/*.JPEG, val/images with
    val/val_annotations.txt, class order from wnids.txt (the test split has no labels)."""
    if data_dir is None:
        raise UsageError("--dataset tiny-imagenet needs --data-dir (the tiny-imagenet-200 folder)")
    root = data_dir
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(
            os.path.join(root, "tiny-imagenet-200", "train")):
        root = os.path.join(root, "tiny-imagenet-200")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not (os.path.isdir(os.path.join(root, "train")) and os.path.isfile(annotations)):
        raise UsageError(f"--data-dir {data_dir!r}: expected the tiny-imagenet-200 layout "
                         "(train/<wnid>/images/*.JPEG, val/images, val/val_annotations.txt)")
    wnids_file = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_file):
        with open(wnids_file) as f:
            wnids = [line.strip() for line in f if line.strip()]
    else:
        wnids = sorted(os.listdir(os.path.join(root, "train")))
    class_of = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid in wnids:
        found = sorted(f for f in glob.glob(os.path.join(root, "train", wnid, "images", "*"))
                       if f.lower().endswith((".jpeg", ".jpg", ".png")))
        train_files += found
        train_labels += [class_of[wnid]] * len(found)
    test_files, test_labels = [], []
    with open(annotations) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1] in class_of:
                test_files.append(os.path.join(root, "val", "images", parts[0]))
                test_labels.append(class_of[parts[1]])
    if not train_files:
        raise UsageError(f"--data-dir {data_dir!r}: no images under train/<wnid>/images/")
    return (_decode_readable(train_files, train_labels, img_size),
            _decode_readable(test_files, test_labels, img_size))


def _decode_readable(files, labels, img_size):
    """Decode the files that decode; unreadable ones are named on stderr and left out."""
    keep = set(find_readable_images(files, img_size)[0])
    kept = [(f, y) for f, y in zip(files, labels) if f in keep]
    return decode_images([f for f, _ in kept], img_size, [y for _, y in kept])


def folder_classes(files, root):
    """Class = first sub-folder below `root` when there are sub-folders, else -1 (no labels)."""
    tops = [os.path.relpath(f, root).split(os.sep) for f in files]
    if all(len(t) == 1 for t in tops):
        return np.full(len(files), -1), []
    names = sorted({t[0] for t in tops if len(t) > 1})
    return np.array([names.index(t[0]) if len(t) > 1 else -1 for t in tops]), names


def load_folder(data_dir, img_size, seed=0, test_fraction=0.1):
    """Any folder of images; a seeded 10% is held out as the test split (queries, metrics)."""
    files = scan_image_folder(data_dir, img_size)
    labels, _ = folder_classes(files, data_dir)
    order = np.random.default_rng(seed).permutation(len(files))
    n_test = int(round(len(files) * test_fraction)) if len(files) >= 10 else 0
    test, train = order[:n_test], order[n_test:]
    return (decode_images([files[i] for i in train], img_size, labels[train]),
            decode_images([files[i] for i in test], img_size, labels[test]))


def load_data(args):
    if args.dataset == "cifar10":
        return load_cifar10(args.data_dir)
    if args.dataset == "tiny-imagenet":
        return load_tiny_imagenet(args.data_dir, args.img_size)
    if args.data_dir is None:
        raise UsageError("--dataset folder needs --data-dir (a folder of images)")
    return load_folder(args.data_dir, args.img_size, args.seed)


def training_stream(images, batch_size, pixel_range, seed, start=0):
    """Batches of model pixels, a new permutation of the images every pass, from image number
    `start` of that stream (`common.stream_order`: a resumed run sees what an uninterrupted
    one would; every worker of a cluster makes the same global batches and keeps its part),
    prefetched."""
    images = tf.constant(images)
    order = common.stream_order(len(images), seed, start)
    order = order.batch(batch_size, drop_remainder=True)  # a fixed batch size for the compiled step
    ds = order.map(lambda i: to_model_pixels(tf.gather(images, i), pixel_range),
                   num_parallel_calls=tf.data.AUTOTUNE)
    return common.finish_stream(ds, first_step=int(start) // batch_size)


# --------------------------------------------------------------------------- encoder

def stage_channels(img_size):
    """Channels of the conv + pool stages that bring img_size down to the 4x4 local map:
    (64, 128, 256) at 32 px and (32, 64, 128, 256) at 64 px, halving further back."""
    stages = int(np.log2(img_size // LOCAL_MAP_SIZE))
    return [LOCAL_CHANNELS // 2 ** (stages - 1 - i) for i in range(stages)]


def conv_bn_lrelu(x, channels, sync_bn=False):
    x = layers.Conv2D(channels, 3, padding="same")(x)
    # keras' own, with the fused kernel in training (layers/norm.py) unless synchronised; the
    # same variables either way
    x = BatchNormalization(synchronized=sync_bn)(x)
    return layers.LeakyReLU(negative_slope=0.2)(x)


def build_encoder(img_size, z_dim, sync_bn=False):
    """x -> (mu, logvar, local feature map C of 4x4x256). The feature extractor is x -> mu.
    `sync_bn`: batch statistics over all replicas' images."""
    images = keras.Input((img_size, img_size, 3), name="images")
    x = images
    for channels in stage_channels(img_size):
        x = layers.MaxPooling2D(2)(conv_bn_lrelu(x, channels, sync_bn))
    local_map = x
    for _ in range(2):
        x = conv_bn_lrelu(x, LOCAL_CHANNELS, sync_bn)
    x = layers.GlobalMaxPooling2D()(x)
    mu = layers.Dense(z_dim, name="mu")(x)
    logvar = layers.Dense(z_dim, name="logvar")(x)
    return keras.Model(images, [mu, logvar, local_map], name="encoder")


def feature_extractor(encoder):
    """x -> mu, sharing the encoder's layers (the model whose size SPEC.md quotes)."""
    return keras.Model(encoder.input, encoder.outputs[0], name="feature_extractor")


# --------------------------------------------------------------------------- discriminators

def build_discriminator(input_shape, name):
    """Dense(256, relu) x 3 -> Dense(1, sigmoid) on the last axis. On (4, 4, 512) inputs this
    is the local discriminator: the same MLP at every position (= 1x1 convolutions)."""
    return keras.Sequential(
        [keras.Input(input_shape)]
        + [layers.Dense(DISCRIMINATOR_UNITS, activation="relu") for _ in range(3)]
        + [layers.Dense(1, activation="sigmoid")], name=name)


# --------------------------------------------------------------------------- the loss

def score_pairs(discriminator, left, right, perm):
    """The discriminator's scores of the positive pairs [left, right] and of the negatives
    [left, right[perm]], where `left` is broadcast over `right`'s positions (z next to each
    pixel of the feature map).

    The same function as concatenating, computed with less work: the first Dense layer of
    [a, b] is a @ W_a + b @ W_b + bias, so z is multiplied once per image (not once per pixel
    and pair), and the negatives reuse the feature map's product, gathered. That is a
    quarter of the local discriminator's first-layer FLOPs, and no tiled copies of z.
    """
    first, rest = discriminator.layers[0], discriminator.layers[1:]
    kernel_left, kernel_right = ops.split(first.kernel, [left.shape[-1]], axis=0)
    left = ops.matmul(left, kernel_left)
    right = ops.matmul(right, kernel_right) + first.bias
    positives = first.activation(left + right)
    negatives = first.activation(left + ops.take(right, perm, axis=0))
    for layer in rest:
        positives, negatives = layer(positives), layer(negatives)
    return positives, negatives


def infomax_loss(global_discriminator, local_discriminator, z, mu, logvar, local_map,
                 global_perm, local_perm, weights=(0.5, 1.5, 0.01)):
    """SPEC.md section 2:
        global = -mean(log(T_g([z, z]) + 1e-6) + log(1 - T_g([z, z[perm]]) + 1e-6))
        local  = the same with T_l on [tile(z), C] vs [tile(z), C[perm']], mean over batch and 4x4
        prior  = -0.5 * mean(1 + logvar - mu^2 - exp(logvar))
        loss   = 0.5 * global + 1.5 * local + 0.01 * prior
    `global_perm` and `local_perm` are two independent permutations of the batch: the
    negatives pair z with another image's code / feature map.
    Returns the loss, its three parts and the discriminators' accuracies (threshold 0.5).
    """
    global_pos, global_neg = score_pairs(global_discriminator, z, z, global_perm)
    local_pos, local_neg = score_pairs(local_discriminator, z[:, None, None, :], local_map, local_perm)

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


# --------------------------------------------------------------------------- training model

def random_permutation(n, seed_generator, groups=1):
    """A fresh permutation of range(n): argsort of uniform noise (XLA-friendly), within each of
    `groups` equal blocks of consecutive images (so an image is only paired inside its block).

    On several replicas, n is the replica's part of the batch and its keys are its rows of the
    keys one device draws for the global batch (`common.replica_draw`): negatives come from the
    replica's own part, and one device with `groups` = the number of replicas draws exactly the
    same pairs.
    """
    keys = replica_draw(lambda shape: keras.random.uniform(shape, seed=seed_generator), (n,))
    block_order = ops.argsort(ops.reshape(keys, (groups, -1)), axis=-1)
    block_size = ops.cast(n // groups, block_order.dtype)
    block_start = ops.arange(groups, dtype=block_order.dtype)[:, None] * block_size
    return ops.reshape(block_order + block_start, (-1,))


class InfoMax(keras.Model):
    """Encoder + global and local discriminators, trained end to end on the InfoMax loss."""

    METRICS = ("loss", "global", "local", "prior",
               "global_acc_pos", "global_acc_neg", "local_acc_pos", "local_acc_neg")

    def __init__(self, img_size, z_dim=256, loss_weights=(0.5, 1.5, 0.01), seed=None,
                 sync_bn=False, negative_groups=1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = build_encoder(img_size, z_dim, sync_bn)
        self.global_discriminator = build_discriminator((2 * z_dim,), "global_discriminator")
        self.local_discriminator = build_discriminator(
            (LOCAL_MAP_SIZE, LOCAL_MAP_SIZE, z_dim + LOCAL_CHANNELS), "local_discriminator")
        self.loss_weights_ = tuple(loss_weights)
        self.negative_groups = negative_groups  # negatives within blocks of each replica's part
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = [common.AppliedMean(name=name) for name in self.METRICS]
        self.skipped = common.SkippedSteps()

    @property
    def metrics(self):
        return [*self.trackers, self.skipped]

    def call(self, images, training=False):
        return self.encoder(images, training=training)[0]

    def infomax_terms(self, images, training=False, global_perm=None, local_perm=None):
        """Sample z from the posterior, draw the two negative permutations, score the loss.
        On several replicas each scores its own part of the batch (with its rows of the global
        batch's noise), drawing negatives from that part."""
        mu, logvar, local_map = self.encoder(images, training=training)
        noise = replica_draw(lambda shape: keras.random.normal(shape, seed=self.seed_generator),
                             ops.shape(mu))
        z = mu + ops.exp(logvar / 2) * noise
        batch = ops.shape(images)[0]
        if global_perm is None:
            global_perm = random_permutation(batch, self.seed_generator, self.negative_groups)
        if local_perm is None:
            local_perm = random_permutation(batch, self.seed_generator, self.negative_groups)
        return infomax_loss(self.global_discriminator, self.local_discriminator, z, mu, logvar,
                            local_map, global_perm, local_perm, self.loss_weights_)

    def train_step(self, images):
        """One Adam step, applied only if the loss and gradients are finite (else undone,
        batch-norm statistics included, and counted in `skipped_steps`)."""
        statistics = common.snapshot(self.non_trainable_variables)
        with tf.GradientTape() as tape:
            terms = self.infomax_terms(images, training=True)
            loss = common.replica_share(terms["loss"])  # the mean over the global batch
        grads = tape.gradient(loss, self.trainable_variables)
        applied = common.apply_if_finite(self.optimizer, loss, grads, self.trainable_variables,
                                         restore=statistics)
        for tracker in self.trackers:
            tracker.update_state(terms[tracker.name], applied)
        self.skipped.update_state(applied)
        return common.step_logs({metric.name: metric.result() for metric in self.metrics})


def build_model(args):
    keras.utils.set_random_seed(args.seed)  # the same seed gives the same initial weights
    model = InfoMax(args.img_size, args.z_dim,
                    (args.global_weight, args.local_weight, args.prior_weight), seed=args.seed,
                    sync_bn=args.sync_bn)
    model.compile(optimizer=FusedAdam(args.lr), jit_compile=args.jit)
    model.build((None, args.img_size, args.img_size, 3))
    model.optimizer.build(model.trainable_variables)  # so that a resume can load its state
    return model


def benchmark_setup(dataset="cifar10", batch_size=64, quick=False):
    """For bench/bench.py: the model of `dataset` at SPEC.md's size, compiled as for training,
    and one batch of random images in the model's pixel range (batch 8 with `quick`)."""
    args = parse_args(["--dataset", dataset, "--batch-size", str(8 if quick else batch_size)])
    model = build_model(args)
    shape = (args.batch_size, args.img_size, args.img_size, 3)
    images = np.random.RandomState(0).randint(0, 256, shape).astype("uint8")
    return model, to_model_pixels(tf.constant(images), args.pixel_range)


def count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def random_encoder(args):
    """The same architecture with the same initial weights as a fresh run (the baseline)."""
    return build_model(args).encoder


# --------------------------------------------------------------------------- feature quality

def encode(encoder, images, pixel_range, batch_size=500):
    """uint8 images -> (mu (N, z_dim), flattened local map (N, 4*4*256)), in inference mode."""
    model = keras.Model(encoder.input, [encoder.outputs[0], layers.Flatten()(encoder.outputs[2])])
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    ds = ds.map(lambda x: to_model_pixels(x, pixel_range)).prefetch(tf.data.AUTOTUNE)
    verbose = 1 if len(images) > 5 * batch_size else 0
    mu, local = model.predict(ds, verbose=verbose)
    return {"mu": mu, "local": local}


def l2_normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(queries, bank, k, metric="cosine", chunk=512):
    """Indices (Q, k) of the k nearest rows of `bank`, best first, and their similarities
    (cosine) or negated squared Euclidean distances."""
    if metric == "cosine":
        queries, bank = l2_normalise(queries), l2_normalise(bank)
    bank_t = tf.constant(bank.T)
    bank_sq = tf.constant(np.sum(bank ** 2, axis=1))
    k = min(k, len(bank))
    indices, scores = [], []
    for start in range(0, len(queries), chunk):
        q = tf.constant(queries[start:start + chunk])
        sim = tf.matmul(q, bank_t)
        if metric == "euclidean":  # -|q - b|^2 up to the per-query constant |q|^2
            sim = 2 * sim - bank_sq[None, :]
        top = tf.math.top_k(sim, k)
        indices.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(indices), np.concatenate(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, ks=(1, 200),
                 temperature=0.07, num_classes=None):
    """Cosine k-NN classification accuracy. k = 1: the nearest neighbour's label. Larger k:
    each of the k nearest votes with weight exp(cosine / 0.07) (Wu et al. 2018, InstDisc)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    indices, sims = nearest(test_features, train_features, max(ks), "cosine")
    result = {}
    for k in ks:
        neighbour_labels = train_labels[indices[:, :k]]
        votes = np.zeros((len(test_features), num_classes))
        np.add.at(votes, (np.arange(len(test_features))[:, None], neighbour_labels),
                  np.exp((sims[:, :k] - 1.0) / temperature))  # -1: same ranking, no overflow
        result[k] = float(np.mean(votes.argmax(axis=1) == test_labels))
    return result


def probe_accuracy(train_features, train_labels, test_features, test_labels, hidden=200,
                   dropout=0.1, epochs=10, batch_size=256, seed=0):
    """Top-1 of a classifier trained on frozen, standardised features: linear (hidden=0) or
    the DIM paper's one hidden layer of 200 ReLU units with dropout."""
    keras.utils.set_random_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    num_classes = int(train_labels.max()) + 1
    stack = [keras.Input((train_features.shape[1],))]
    if hidden:
        stack += [layers.Dense(hidden, activation="relu"), layers.Dropout(dropout)]
    classifier = keras.Sequential(stack + [layers.Dense(num_classes)])
    classifier.compile(keras.optimizers.Adam(1e-3),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    classifier.fit((train_features - mean) / std, train_labels, batch_size=batch_size,
                   epochs=epochs, verbose=0, shuffle=True)
    return float(classifier.evaluate((test_features - mean) / std, test_labels,
                                     batch_size=1024, verbose=0)[1])


def feature_quality(train_features, train_labels, test_features, test_labels, args, label=""):
    """k-NN (k = 1, k = 200 weighted) and probe (linear, MLP-200) accuracies, mu and local map."""
    result = {}
    for name in ("mu", "local"):
        start = time.time()
        knn = knn_accuracy(train_features[name], train_labels, test_features[name], test_labels)
        scores = {"knn_k1": knn[1], "knn_k200_weighted": knn[200]}
        for probe, hidden in (("linear_probe", 0), ("mlp_probe", 200)):
            scores[probe] = probe_accuracy(train_features[name], train_labels, test_features[name],
                                           test_labels, hidden=hidden, epochs=args.probe_epochs,
                                           seed=args.seed)
        print(f"  {label}{name}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
              + f" ({time.time() - start:.0f} s)", flush=True)
        result[name] = scores
    return result


class KnnMonitor(keras.callbacks.Callback):
    """Adds the cosine k-NN accuracy of mu on a fixed subset to each epoch's logs (and CSV)."""

    def __init__(self, train, test, pixel_range, size, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        pick_train = rng.permutation(len(train[0]))[:size]
        pick_test = rng.permutation(len(test[0]))[:max(size // 5, 1)]
        self.train = train[0][pick_train], train[1][pick_train]
        self.test = test[0][pick_test], test[1][pick_test]
        self.pixel_range = pixel_range

    def on_epoch_end(self, epoch, logs=None):
        bank = encode(self.model.encoder, self.train[0], self.pixel_range)["mu"]
        queries = encode(self.model.encoder, self.test[0], self.pixel_range)["mu"]
        knn = knn_accuracy(bank, self.train[1], queries, self.test[1], num_classes=None)
        logs["subset_knn_k1"], logs["subset_knn_k200"] = knn[1], knn[200]


def save_neighbour_pictures(run_dir, train_mu, test_mu, train_images, test_images, seed,
                            queries=10, neighbours=9):
    """10 random test images, each followed by its 9 nearest training images by mu, by
    Euclidean distance and by cosine similarity; true pixels."""
    picked = np.random.default_rng(seed).choice(len(test_mu), min(queries, len(test_mu)),
                                                replace=False)
    paths = []
    for metric in ("euclidean", "cosine"):
        indices, _ = nearest(test_mu[picked], train_mu, neighbours, metric)
        rows = [np.concatenate([test_images[i:i + 1], train_images[found]])
                for i, found in zip(picked, indices)]
        path = os.path.join(run_dir, f"neighbours_{metric}.png")
        save_grid(path, np.concatenate(rows), rows=len(rows), cols=1 + indices.shape[1],
                  value_range=(0, 255))
        paths.append(path)
    return paths


def evaluate_run(run_dir, encoder, train, test, args):
    """Everything SPEC.md and issue 4 ask of a trained encoder; writes and prints it."""
    held_out = len(test[0]) > 0
    if not held_out:
        print("no test images: the queries come from the training split")
        test = train
    if args.eval_limit:
        train = train[0][:args.eval_limit], train[1][:args.eval_limit]
        test = test[0][:max(args.eval_limit // 5, 1)], test[1][:max(args.eval_limit // 5, 1)]
    print(f"encoding {len(train[0])} training and {len(test[0])} test images")
    train_features = encode(encoder, train[0], args.pixel_range)
    test_features = encode(encoder, test[0], args.pixel_range)
    mu = train_features["mu"]
    write_json(os.path.join(run_dir, "mu_stats.json"), {
        "mean": float(mu.mean()), "std": float(mu.std()),
        "mean_per_dim": mu.mean(0).round(5).tolist(), "std_per_dim": mu.std(0).round(5).tolist()})
    pictures = save_neighbour_pictures(run_dir, mu, test_features["mu"], train[0], test[0], args.seed)
    print(f"mu over the training set: mean {mu.mean():.4f}, std {mu.std():.4f} (mu_stats.json); "
          f"wrote " + ", ".join(pictures))
    if not held_out or (train[1] < 0).any() or (test[1] < 0).any() or len(set(train[1])) < 2:
        print("no labelled test split with two or more classes: skipping the accuracy metrics")
        return None
    state_path = os.path.join(run_dir, "state.json")
    metrics = {"epochs_done": read_json(state_path)["epochs_done"] if os.path.exists(state_path) else 0,
               "train_images": len(train[0]), "test_images": len(test[0]),
               "knn": "cosine similarity on raw features; k=1 nearest label; k=200 votes "
                      "weighted by exp(cos/0.07) (InstDisc)",
               "probes": f"Adam 1e-3, {args.probe_epochs} epochs on standardised frozen features; "
                         "linear = softmax regression, mlp = Dense(200, relu) + dropout 0.1",
               "features": {"mu": f"the global code mu ({args.z_dim})",
                            "local": "the local feature map C flattened (4x4x256 = 4096)"},
               "paper": PAPER.get(args.dataset)}
    print("feature quality of the trained encoder:")
    metrics["trained"] = feature_quality(train_features, train[1], test_features, test[1], args)
    if args.baseline:
        print("feature quality of a randomly initialised encoder:")
        baseline = random_encoder(args)
        metrics["random_encoder"] = feature_quality(
            encode(baseline, train[0], args.pixel_range), train[1],
            encode(baseline, test[0], args.pixel_range), test[1], args, "random ")
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print(metrics_table(metrics))
    return metrics


def metrics_table(metrics):
    columns = ("knn_k1", "knn_k200_weighted", "linear_probe", "mlp_probe")
    lines = [f"{'encoder / feature':28s}" + "".join(f"{c:>19s}" for c in columns)]
    for who in ("trained", "random_encoder"):
        for name, scores in metrics.get(who, {}).items():
            lines.append(f"{who + ' / ' + name:28s}"
                         + "".join(f"{100 * scores[c]:18.2f}%" for c in columns))
    for method, numbers in (metrics.get("paper") or {}).items():
        if isinstance(numbers, dict):
            lines.append(f"DIM paper {method} (MLP probe): conv {numbers['conv']}, "
                         f"fc {numbers['fc']}, Y {numbers['Y']}")
        else:
            lines.append(f"paper, supervised encoder: {numbers}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- search by image

def search(args):
    """Index every image under --folder with the run's encoder; print and draw the nearest
    neighbours (by mu) of each --query image."""
    config_path = os.path.join(args.out, "config.json")
    weights_path = os.path.join(args.out, "encoder.weights.h5")
    if not os.path.isfile(weights_path) or not os.path.isfile(config_path):
        raise UsageError(f"--out {args.out!r}: no trained encoder there (expected config.json and "
                         "encoder.weights.h5 from a training run)")
    if not args.query:
        raise UsageError("search needs --query FILE [FILE ...]")
    config = read_json(config_path)
    img_size, pixel_range = config["img_size"], tuple(config["pixel_range"])
    encoder = build_encoder(img_size, config["z_dim"])
    encoder.load_weights(weights_path)

    files = scan_image_folder(args.folder, img_size, "--folder")
    for q in args.query:
        if not os.path.isfile(q):
            raise UsageError(f"--query {q!r}: no such file")
    queries, bad = find_readable_images(args.query, img_size, verbose=False)
    if bad:
        raise UsageError(f"--query {bad[0]!r}: not a readable image")
    print(f"indexing {len(files)} images under {args.folder}")
    images, _ = decode_images(files, img_size)
    query_images, _ = decode_images(queries, img_size)
    bank = encode(encoder, images, pixel_range)["mu"]
    query_mu = encode(encoder, query_images, pixel_range)["mu"]
    indices, scores = nearest(query_mu, bank, args.top, args.metric)
    for q, query_image, query_code, found, score in zip(queries, query_images, query_mu,
                                                         indices, scores):
        print(f"query {q}:")
        for rank, (i, s) in enumerate(zip(found, score), 1):
            if args.metric == "cosine":
                value = f"cosine {s:.4f}"
            else:  # `nearest` scores -|q-b|^2 + |q|^2
                value = f"distance {np.sqrt(max(np.sum(query_code ** 2) - s, 0.0)):.4f}"
            print(f"  {rank:3d}. {files[i]}  ({value})")
        stem = os.path.splitext(os.path.basename(q))[0]
        picture = os.path.join(args.out, f"search_{stem}_{args.metric}.png")
        save_grid(picture, np.concatenate([query_image[None], images[found]]), rows=1,
                  cols=1 + len(found), value_range=(0, 255))
        print(f"  picture: {picture}")


# --------------------------------------------------------------------------- main

def run_config(args):
    return {k: getattr(args, k) for k in (
        "dataset", "data_dir", "img_size", "z_dim", "batch_size", "epochs", "steps_per_epoch",
        "lr", "global_weight", "local_weight", "prior_weight", "seed", "jit", "sync_bn",
        "nan_patience")} | {
        "pixel_range": list(args.pixel_range)}


def train(args):
    strategy = common.make_strategy(args.distribute, args.devices)  # before any other TF op
    common.check_workers_agree(strategy, args.seed, "--seed", "give every worker the same --seed")
    args.jit = common.xla_allowed(args.jit, args.distribute, "--jit")
    run_dir = common.writable_run_dir(args.out, strategy)  # --out on the chief only
    ensure_writable_dir(run_dir, "--out" if run_dir == args.out else "TMPDIR")
    common.check_global_batch(args.batch_size, strategy, per_replica_minimum=2)  # 2: a negative
    train_split, test_split = load_data(args)
    if len(train_split[0]) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size}: larger than the "
                         f"{len(train_split[0])} training images")
    before = check_run_config(run_dir, run_config(args), must_match=MODEL_KEYS)
    print(f"{args.dataset}: {len(train_split[0])} training and {len(test_split[0])} test images "
          f"of {args.img_size}x{args.img_size}")

    with strategy.scope():  # variables, optimiser slots and metrics on every replica
        model = build_model(args)
    print(f"parameters: {count(model.trainable_weights):,} trainable (feature extractor x -> mu "
          f"{count(feature_extractor(model.encoder).trainable_weights):,}), "
          f"{count(model.non_trainable_weights):,} batch-norm statistics")
    steps = args.steps_per_epoch or len(train_split[0]) // args.batch_size
    checkpoint = RunCheckpoint(run_dir, batch_size=args.batch_size, steps_per_epoch=steps,
                               model_config={k: getattr(args, k) for k in MODEL_KEYS})
    common.restore_run(model, checkpoint, strategy, args.lr, before.get("lr"))
    save_encoder = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: (
        atomic_save_weights(model.encoder, os.path.join(run_dir, "encoder.weights.h5"))))
    callbacks = common.guarded_callbacks(checkpoint, args.nan_patience) + [save_encoder]
    if args.monitor_knn and (train_split[1] >= 0).all() and len(test_split[0]):
        callbacks.insert(1, KnnMonitor(train_split, test_split, args.pixel_range,
                                       args.monitor_knn, args.seed))  # its numbers go to the CSV
    if checkpoint.epochs_done < args.epochs:
        common.fit_resumable(model, lambda images_seen: training_stream(
            train_split[0], args.batch_size, args.pixel_range, args.seed, start=images_seen),
            checkpoint, args.epochs, steps, callbacks)
    else:
        print(f"{args.out} already has {checkpoint.epochs_done} epochs (--epochs {args.epochs})")
    if common.is_chief(strategy):
        evaluate_run(run_dir, model.encoder, train_split, test_split, args)
    else:
        print("the chief evaluates the encoder and writes the pictures")
    common.wait_for_all_workers(strategy)
    return model


def evaluate(args):
    """Rebuild the saved run's model from its config.json and weights; no training."""
    config_path = os.path.join(args.out, "config.json")
    weights = os.path.join(args.out, f"{args.weights}.weights.h5")
    if not os.path.isfile(config_path) or not os.path.isfile(weights):
        raise UsageError(f"--out {args.out!r}: no saved run there (expected config.json and "
                         f"{args.weights}.weights.h5)")
    config = read_json(config_path)
    for key in ("dataset", "img_size", "z_dim", "lr", "seed", "global_weight", "local_weight",
                "prior_weight"):
        setattr(args, key, config[key])
    args.pixel_range = tuple(config["pixel_range"])
    args.data_dir = args.data_dir or config["data_dir"]
    train_split, test_split = load_data(args)
    model = build_model(args)
    try:
        model.load_weights(weights)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{weights}: cannot load ({e})") from None
    evaluate_run(args.out, model.encoder, train_split, test_split, args)


def main(argv=None):
    args = parse_args(argv)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        {"train": train, "evaluate": evaluate, "search": search}[args.command](args)
    except UsageError as e:
        fail(str(e))
    except common.TrainingStopped as e:
        common.stop(e)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: nothing new saved
        common.stop(common.Interrupted("nothing saved since the last save"))


if __name__ == "__main__":
    main()
