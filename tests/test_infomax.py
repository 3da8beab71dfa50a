"""Properties of infomax.py (docs/model.md, "Deep InfoMax with a KL prior")."""

import csv
import json
import os
import pickle
import struct
import tarfile
from unittest import mock

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
import keras

import infomax
from conftest import SHARED_DATA
import datasets
import feature_eval
from training.monitor import count_parameters

CIFAR_SUBSET = os.path.join(SHARED_DATA, "cifar10-subset")
TINY_IMAGENET = os.path.join(SHARED_DATA, "tiny-imagenet-200")


def small_model(seed=0, img_size=8, z_dim=8):
    """A one-stage model (8 px -> 4x4x256) that is quick to build and run."""
    args = infomax.parse_args(["--dataset", "folder", "--img-size", str(img_size), "--z-dim",
                               str(z_dim), "--seed", str(seed), "--no-jit"])
    return infomax.build_model(args.config)


# --------------------------------------------------------------------------- the loss

def numpy_mlp(discriminator, x):
    """Dense(relu) x 3 -> Dense(sigmoid) on the last axis, from the layer's weights."""
    dense = [layer for layer in discriminator.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        x = x @ kernel + bias
        x = np.maximum(x, 0) if i < len(dense) - 1 else 1 / (1 + np.exp(-x))
    return x


def test_loss_matches_spec_formula_computed_by_hand():
    rng = np.random.default_rng(0)
    batch, z_dim, height, channels = 4, 3, 2, 5
    keras.utils.set_random_seed(1)
    global_d = infomax.build_discriminator((2 * z_dim,), "g")
    local_d = infomax.build_discriminator((height, height, z_dim + channels), "l")
    z, mu, logvar = (rng.normal(size=(batch, z_dim)).astype("float32") for _ in range(3))
    local_map = rng.normal(size=(batch, height, height, channels)).astype("float32")
    global_perm, local_perm = np.array([1, 2, 3, 0]), np.array([2, 0, 3, 1])

    terms = infomax.infomax_loss(global_d, local_d, z, mu, logvar, local_map, global_perm, local_perm)

    # docs/model.md: positives [z, z] and [tile(z), C]; negatives use the permuted batch.
    g_pos = numpy_mlp(global_d, np.concatenate([z, z], -1))
    g_neg = numpy_mlp(global_d, np.concatenate([z, z[global_perm]], -1))
    z_map = np.broadcast_to(z[:, None, None, :], (batch, height, height, z_dim))
    l_pos = numpy_mlp(local_d, np.concatenate([z_map, local_map], -1))
    l_neg = numpy_mlp(local_d, np.concatenate([z_map, local_map[local_perm]], -1))
    global_term = -np.mean(np.log(g_pos + 1e-6) + np.log(1 - g_neg + 1e-6))
    local_term = -np.mean(np.log(l_pos + 1e-6) + np.log(1 - l_neg + 1e-6))
    prior = -0.5 * np.mean(1 + logvar - mu ** 2 - np.exp(logvar))
    expected = 0.5 * global_term + 1.5 * local_term + 0.01 * prior

    np.testing.assert_allclose(float(terms["global"]), global_term, rtol=1e-5)
    np.testing.assert_allclose(float(terms["local"]), local_term, rtol=1e-5)
    np.testing.assert_allclose(float(terms["prior"]), prior, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(terms["global_acc_pos"]), np.mean(g_pos > 0.5))
    np.testing.assert_allclose(float(terms["local_acc_neg"]), np.mean(l_neg < 0.5))


@pytest.mark.parametrize("zeroed", ["global", "local"])
def test_a_zero_loss_weight_removes_that_terms_gradient_from_the_encoder(zeroed):
    """The ablation's arms: with one weight 0, the encoder's gradient is exactly the gradient
    of the other weighted terms (computed from the same forward pass), while the zeroed term
    alone would move the encoder."""
    images = np.random.default_rng(1).uniform(-1, 1, (8, 8, 8, 3)).astype("float32")
    model = small_model(seed=2)
    weights = {"global": 0.5, "local": 1.5, "prior": 0.01}
    weights[zeroed] = 0.0
    model.loss_weights_ = (weights["global"], weights["local"], weights["prior"])
    perms = np.array([3, 0, 5, 1, 7, 2, 4, 6]), np.array([1, 2, 0, 4, 5, 3, 7, 6])
    variables = model.encoder.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        terms = model.loss_parts(images, training=True, global_perm=perms[0],
                                    local_perm=perms[1])
        kept = sum(w * terms[name] for name, w in weights.items() if name != zeroed)
    for got, expected, of_zeroed in zip(tape.gradient(terms["loss"], variables),
                                        tape.gradient(kept, variables),
                                        tape.gradient(terms[zeroed], variables)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
    assert max(float(np.abs(g).max()) for g in tape.gradient(terms[zeroed], variables)) > 1e-4

def test_posterior_noise_has_standard_deviation_exp_half_logvar(monkeypatch):
    """z = mu + exp(logvar/2) * eps, eps ~ N(0, I): with logvar fixed per dimension (the logvar
    layer set to a bias alone), z - mu has mean 0 and standard deviation exp(logvar/2), not
    exp(logvar), over a large batch."""
    model = small_model(seed=6)
    std = np.array([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0], "float32")
    logvar_layer = model.encoder.get_layer("logvar")
    logvar_layer.set_weights([np.zeros_like(logvar_layer.get_weights()[0]), 2 * np.log(std)])
    seen, infomax_loss = {}, infomax.infomax_loss

    def spy(global_d, local_d, z, mu, logvar, *rest, **kwargs):  # what the step's loss is given
        seen.update(z=np.asarray(z, "float64"), mu=np.asarray(mu, "float64"),
                    logvar=np.asarray(logvar))
        return infomax_loss(global_d, local_d, z, mu, logvar, *rest, **kwargs)

    monkeypatch.setattr(infomax, "infomax_loss", spy)
    images = np.random.default_rng(1).uniform(-1, 1, (2048, 8, 8, 3)).astype("float32")
    model.loss_parts(images, training=True)
    np.testing.assert_allclose(seen["logvar"], np.broadcast_to(2 * np.log(std), (2048, 8)),
                               rtol=1e-6, atol=1e-6)
    noise = seen["z"] - seen["mu"]
    assert np.all(np.abs(noise.mean(axis=0)) < 0.1 * std), noise.mean(axis=0)
    np.testing.assert_allclose(noise.std(axis=0), std, rtol=0.05)
    assert abs(np.mean(np.abs(noise / std) < 1) - 0.6827) < 0.02  # Gaussian


def test_permutations_are_fresh_permutations_and_rarely_the_identity():
    seed_generator = keras.random.SeedGenerator(3)
    draws = [np.asarray(infomax.random_permutation(16, seed_generator)) for _ in range(5)]
    for perm in draws:
        assert sorted(perm) == list(range(16))
        assert not np.array_equal(perm, np.arange(16))
    assert len({tuple(p) for p in draws}) == 5  # a new one every step


def test_training_loss_scores_negatives_with_the_drawn_permutations():
    """The step's loss equals the loss with the permutations its seed generator draws,
    and those are what make the negatives differ from the positives."""
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype("float32")
    drawn, replayed = small_model(seed=5), small_model(seed=5)
    replay = keras.random.SeedGenerator(5)
    keras.random.normal((8, 8), seed=replay)  # the posterior noise is drawn first
    global_perm = infomax.random_permutation(8, replay)
    local_perm = infomax.random_permutation(8, replay)
    assert not np.array_equal(np.asarray(global_perm), np.arange(8))

    terms = drawn.loss_parts(images)
    same = replayed.loss_parts(images, global_perm=global_perm, local_perm=local_perm)
    np.testing.assert_allclose(float(terms["loss"]), float(same["loss"]), rtol=1e-6)

    identity = small_model(seed=5).loss_parts(images, global_perm=np.arange(8),
                                                 local_perm=np.arange(8))
    assert abs(float(identity["loss"]) - float(terms["loss"])) > 1e-4


def test_a_few_steps_lower_the_loss():
    model = small_model(seed=0)
    images = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 3)).astype("float32")
    stream = infomax.training_stream((images * 127.5 + 127.5).astype("uint8"), 16, (-1.0, 1.0), 0)
    history = model.fit(stream, epochs=6, steps_per_epoch=5, verbose=0, shuffle=False).history
    assert history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("dataset, total, encoder, bn_stats", [
    ("cifar10", 2_210_818, 1_618_688, 1_920),
    ("tiny-imagenet", 2_228_482, 1_636_352, 1_984)])
def test_parameter_counts_equal_spec(dataset, total, encoder, bn_stats):
    model = infomax.build_model(infomax.parse_args(["--dataset", dataset, "--no-jit"]).config)
    assert count_parameters(model.trainable_weights) == total
    assert count_parameters(infomax.feature_extractor(model.encoder).trainable_weights) == encoder
    assert count_parameters(model.non_trainable_weights) == bn_stats
    assert model.encoder.outputs[2].shape[1:] == (4, 4, 256)


def test_local_size_8_pairs_z_with_the_8x8_map_of_the_stage_before_the_last_pooling():
    """--local-size 8 (a named option, not the default): C is the 8x8x128 map after the second
    pooling, the local discriminator takes z next to each of its 64 positions, and only that
    discriminator's first layer changes size (128 fewer input channels)."""
    config = infomax.parse_args(["--dataset", "cifar10", "--no-jit", "--local-size", "8"]).config
    model = infomax.build_model(config)
    assert model.encoder.outputs[2].shape[1:] == (8, 8, 128)
    assert model.local_discriminator.input_shape[1:] == (8, 8, 256 + 128)
    assert count_parameters(model.trainable_weights) == 2_210_818 - 128 * 256
    stages = [layer.output for layer in model.encoder.layers
              if isinstance(layer, keras.layers.MaxPooling2D)]
    assert model.encoder.outputs[2] is stages[1]  # the second of three poolings, not the last
    terms = model.loss_parts(np.zeros((4, 32, 32, 3), "float32"), training=True)
    assert np.isfinite(float(terms["local"]))


@pytest.mark.parametrize("value", ["2", "6", "32"])
def test_a_local_size_the_encoder_does_not_have_is_a_one_line_error(value, capsys):
    assert run_cli("--dataset", "cifar10", "--local-size", value) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --local-size {value}: must be one of the encoder's feature-map sides " \
                  "at 32 px, 4, 8, 16"


def conv3x3_same(x, kernel, bias):
    """A 3x3 convolution with zero padding 'same', by patches: (n, h, w, c) -> (n, h, w, o)."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
    return patches.reshape(n, h, w, 9 * c) @ kernel.reshape(9 * c, -1) + bias


def numpy_encoder(encoder, x):
    """The CIFAR-10 encoder of docs/model.md in numpy from the model's weights:
    3 x (Conv3x3 -> BatchNorm (inference) -> LeakyReLU(0.2) -> MaxPool 2x2) = C,
    2 x (Conv3x3 -> BatchNorm -> LeakyReLU(0.2)), global max pooling, mu = Dense,
    logvar = Dense."""
    convs = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)]
    norms = [layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [conv.filters for conv in convs] == [64, 128, 256, 256, 256] and len(norms) == 5
    x = x.astype("float64")
    for stage, (conv, norm) in enumerate(zip(convs, norms)):
        x = conv3x3_same(x, *conv.get_weights())
        gamma, beta, mean, variance = norm.get_weights()
        x = gamma * (x - mean) / np.sqrt(variance + norm.epsilon) + beta
        x = np.where(x > 0, x, 0.2 * x)
        if stage < 3:
            n, h, w, c = x.shape
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        if stage == 2:
            local_map = x
    pooled = x.max(axis=(1, 2))
    mu, logvar = (pooled @ layer.get_weights()[0] + layer.get_weights()[1]
                  for layer in (encoder.get_layer("mu"), encoder.get_layer("logvar")))
    return mu, logvar, local_map


def test_encoder_is_spec_conv_stages_with_leaky_relu_and_global_max_pooling():
    """The CIFAR-10 encoder computes what docs/model.md describes (LeakyReLU slope 0.2, max
    pooling per stage, global max pooling), checked against numpy with every batch-norm weight
    and statistic moved away from its initial value."""
    config = infomax.parse_args(["--dataset", "cifar10"]).config
    encoder = infomax.build_encoder(config.img_size, config.z_dim)
    rng = np.random.default_rng(2)
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                               rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)])
    x = rng.uniform(-0.5, 0.5, (2, 32, 32, 3)).astype("float32")
    got = encoder(x, training=False)
    for name, value, expected in zip(("mu", "logvar", "C"), got, numpy_encoder(encoder, x)):
        assert value.shape == expected.shape, name
        np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-3, atol=1e-4, err_msg=name)
    assert got[2].shape == (2, 4, 4, 256)


# --------------------------------------------------------------------------- data

class Python2Pickler(pickle._Pickler):
    """Python 2's cPickle at protocol 2, as the official CIFAR-10 files were written: bytes
    as SHORT_BINSTRING/BINSTRING (Python 3's pickler, at protocol 2, stores them through
    `_codecs.encode`, a global the official files never name)."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_str_of_python2(self, obj):
        size = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([size]) if size < 256
                    else pickle.BINSTRING + struct.pack("<i", size)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str_of_python2


def write_cifar_batch(path, images, labels, label=b"training batch 1 of 5", extra=None):
    """The official python-pickle format: protocol 2, bytes keys, rows of 1024 R, G, B.
    `extra`: more items of the dict (a crafted file's payload)."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as f:
        batch = {b"batch_label": label, b"labels": list(map(int, labels)), b"data": data}
        Python2Pickler(f, protocol=2).dump({**batch, **(extra or {})})


def make_cifar_fixture(folder, rows=3, seed=0):
    rng = np.random.default_rng(seed)
    batches = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(batches)
    written = {}
    for name in datasets.CIFAR_TRAIN + datasets.CIFAR_TEST:
        images = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, rows)
        labels[:2] = [0, 1]  # both classes of the end-to-end run appear in every batch
        write_cifar_batch(os.path.join(batches, name), images, labels)
        written[name] = images, labels
    return batches, written


def test_cifar_loader_reads_the_pickle_format(tmp_path):
    batches, written = make_cifar_fixture(str(tmp_path), rows=3)
    one = np.zeros((1, 32, 32, 3), np.uint8)
    one[0, 5, 7] = (10, 20, 30)  # red, green, blue planes at row 5, column 7
    write_cifar_batch(os.path.join(batches, "test_batch"), one, [4], b"testing batch 1 of 1")
    raw = pickle.load(open(os.path.join(batches, "test_batch"), "rb"), encoding="bytes")[b"data"]
    assert [raw[0, 5 * 32 + 7 + plane * 1024] for plane in range(3)] == [10, 20, 30]

    for where in (batches, str(tmp_path)):
        (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(where)
        assert x_train.shape == (15, 32, 32, 3) and x_train.dtype == np.uint8
        np.testing.assert_array_equal(x_train[:3], written["data_batch_1"][0])
        np.testing.assert_array_equal(y_train[3:6], written["data_batch_2"][1])
        assert list(x_test[0, 5, 7]) == [10, 20, 30] and list(y_test) == [4]


def test_cifar_loader_reads_the_official_tarball(tmp_path):
    batches, written = make_cifar_fixture(str(tmp_path / "src"), rows=2)
    tarball = str(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    (x_train, _), (x_test, y_test) = datasets.load_cifar10(tarball)
    assert len(x_train) == 10
    np.testing.assert_array_equal(x_test, written["test_batch"][0])
    assert len(datasets.load_cifar10(str(tmp_path))[0][0]) == 10  # the folder holding the tarball


@pytest.mark.skipif(not os.path.isdir(CIFAR_SUBSET), reason=f"{CIFAR_SUBSET} not present")
def test_cifar_loader_reads_the_shared_subset():
    (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(CIFAR_SUBSET)
    assert x_train.shape == (5 * 1017, 32, 32, 3) and x_test.shape == (1017, 32, 32, 3)
    assert list(x_train[0, 0, :3, 0]) == [59, 43, 50]  # data_batch_1 row 0 starts 59, 43, 50 (red)
    assert list(y_train[:10]) == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_cifar_loader_errors_name_the_flag(tmp_path):
    with pytest.raises(infomax.UsageError, match="--data-dir"):
        datasets.load_cifar10(str(tmp_path))
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(infomax.UsageError, match="--data-dir .*not readable"):
        datasets.load_cifar10(str(tmp_path))
    with mock.patch("keras.datasets.cifar10.load_data", side_effect=Exception("offline")):
        with pytest.raises(infomax.UsageError, match="pass --data-dir"):
            datasets.load_cifar10(None)


def make_tiny_imagenet(root, per_class=3):
    rng = np.random.default_rng(0)
    wnids = ["n01", "n02"]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            iio.imwrite(folder / f"{wnid}_{i}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                        extension=".jpeg")
    iio.imwrite(root / "train" / "n02" / "images" / "n02_grey.JPEG",
                rng.integers(0, 256, (64, 64), dtype=np.uint8), extension=".jpeg")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(["n02", "n01"]):
        iio.imwrite(root / "val" / "images" / f"val_{i}.JPEG",
                    rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), extension=".jpeg")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_loader_reads_the_official_layout(tmp_path):
    make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    (x_train, y_train), (x_test, y_test) = datasets.load_tiny_imagenet(str(tmp_path))
    assert x_train.shape == (7, 64, 64, 3) and x_train.dtype == np.uint8
    assert list(y_train) == [0, 0, 0, 1, 1, 1, 1] and list(y_test) == [1, 0]
    grey = x_train[6]  # n02_grey sorts last: the greyscale JPEG became three equal channels
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    with pytest.raises(infomax.UsageError, match="tiny-imagenet-200 layout"):
        datasets.load_tiny_imagenet(str(tmp_path / "tiny-imagenet-200" / "val"))


@pytest.mark.skipif(not os.path.isdir(TINY_IMAGENET), reason=f"{TINY_IMAGENET} not present")
@pytest.mark.slow
def test_tiny_imagenet_loader_reads_the_shared_subset():
    (x_train, y_train), (x_test, y_test) = datasets.load_tiny_imagenet(TINY_IMAGENET)
    assert x_train.shape == (4000, 64, 64, 3) and x_test.shape == (2000, 64, 64, 3)
    assert np.bincount(y_train).tolist() == [20] * 200 and np.bincount(y_test).tolist() == [10] * 200
    assert x_train.std() > 30  # real pictures, not blanks


def test_folder_dataset_takes_classes_from_sub_folders_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for i in range(10):
            iio.imwrite(tmp_path / name / f"{i}.png", rng.integers(0, 256, (12, 16), dtype=np.uint8))
    (tmp_path / "dogs" / "broken.png").write_text("not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        (x_train, y_train), (x_test, y_test) = datasets.load_folder(str(tmp_path), img_size=8)
    assert x_train.shape == (18, 8, 8, 3) and x_test.shape == (2, 8, 8, 3)
    assert sorted(np.concatenate([y_train, y_test]).tolist()) == [0] * 10 + [1] * 10


# --------------------------------------------------------------------------- feature quality

def test_knn_accuracy_on_a_toy_case():
    def at(*degrees):
        return np.array([[np.cos(np.radians(d)), np.sin(np.radians(d))] for d in degrees]) * 3

    bank, bank_labels = at(0, 10, 30, 20, 80, 90), np.array([0, 0, 0, 1, 1, 1])
    queries, labels = at(5, 85, 19), np.array([0, 1, 0])
    # the query at 19 degrees has a class-1 nearest neighbour (20), but its next two (10, 30)
    # are class 0 and outvote it when weighted by exp(cosine / temperature)
    result = feature_eval.knn_accuracy(bank, bank_labels, queries, labels, ks=(1, 3), temperature=1.0)
    assert result[1] == pytest.approx(2 / 3) and result[3] == pytest.approx(1.0)


def knn_bank(rng, dims=8):
    """A query (the first axis) and 264 bank vectors of four classes, at given cosines:
    class 0: 3 vectors at cosine ~0.99 (the few very near ones),
    class 1: 120 at ~0.7 (the most numerous among the 200 nearest),
    class 2: 77 at ~0.5 (the farthest of the 200 nearest),
    class 3: 64 at ~0.4 but 5 times longer (nearest by raw dot product; not among the
    200 nearest by cosine)."""
    query = np.eye(dims)[:1]
    groups = [(0, 3, 0.99, 1.0), (1, 120, 0.7, 1.0), (2, 77, 0.5, 1.0), (3, 64, 0.4, 5.0)]
    vectors, labels = [], []
    for label, count, cosine, length in groups:
        cosines = cosine + rng.uniform(-0.005, 0.005, count)
        side = rng.normal(size=(count, dims))
        side[:, 0] = 0
        side /= np.linalg.norm(side, axis=1, keepdims=True)
        vectors.append(length * (cosines[:, None] * query + np.sqrt(1 - cosines[:, None] ** 2) * side))
        labels += [label] * count
    order = rng.permutation(len(labels))  # the bank's order says nothing
    return query, np.concatenate(vectors)[order], np.array(labels)[order]


def brute_force_vote(query, bank, labels, k, weight, rank_by="cosine"):
    """The class with the largest sum of weight(similarity) over the k nearest, one by one."""
    similarities = []
    for vector in bank:
        dot = float(np.sum(query[0] * vector))
        similarities.append(dot if rank_by == "dot" else
                            dot / np.sqrt(np.sum(query[0] ** 2) * np.sum(vector ** 2)))
    nearest = sorted(range(len(bank)), key=lambda i: -similarities[i])[:k]
    votes = {}
    for i in nearest:
        votes[labels[i]] = votes.get(labels[i], 0.0) + weight(similarities[i])
    return max(votes, key=votes.get)


def test_knn_votes_of_the_200_nearest_are_weighted_by_exp_cosine_over_0_07():
    """k = 200 with temperature 0.07 (the defaults): on a bank where a plain majority, reversed
    weights, the weighted vote and a raw (unnormalised) dot product each pick another class,
    knn_accuracy picks the weighted vote's class, computed here by brute force."""
    query, bank, labels = knn_bank(np.random.default_rng(0))
    temperature = 0.07
    answers = {
        "weighted": brute_force_vote(query, bank, labels, 200, lambda c: np.exp(c / temperature)),
        "majority": brute_force_vote(query, bank, labels, 200, lambda c: 1.0),
        "reversed": brute_force_vote(query, bank, labels, 200, lambda c: np.exp(-c / temperature)),
        "dot product": brute_force_vote(query, bank, labels, 200,
                                        lambda d: np.exp((d - 5) / temperature), rank_by="dot"),
        "temperature 1": brute_force_vote(query, bank, labels, 200, lambda c: np.exp(c)),
    }
    assert answers == {"weighted": 0, "majority": 1, "reversed": 2, "dot product": 3,
                       "temperature 1": 1}  # the bank tells them apart
    for label in range(4):
        result = feature_eval.knn_accuracy(bank, labels, query, np.array([label]))
        assert set(result) == {1, 200}
        assert result[200] == (1.0 if label == answers["weighted"] else 0.0), label
        assert result[1] == (1.0 if label == 0 else 0.0)  # the nearest is class 0
    # the accuracy is the fraction of queries voted right: two of these four
    result = feature_eval.knn_accuracy(bank, labels, np.repeat(query, 4, axis=0),
                                       np.array([0, 1, 0, 3]))
    assert result[200] == pytest.approx(0.5) and result[1] == pytest.approx(0.5)



# --------------------------------------------------------------------------- command line

def run_cli(*argv):
    with pytest.raises(SystemExit) as exit_info:
        infomax.main(list(argv))
    return exit_info.value.code


def test_command_line_trains_writes_everything_resumes_and_searches(tmp_path, capsys):
    make_cifar_fixture(str(tmp_path / "data"), rows=16)
    out = str(tmp_path / "run")
    common = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", out,
              "--batch-size", "8", "--steps-per-epoch", "2", "--monitor-knn", "40",
              "--probe-epochs", "1"]
    infomax.main(common + ["--epochs", "1"])
    for name in ("latest.weights.h5", "best.weights.h5", "encoder.weights.h5", "log.csv",
                 "config.json", "mu_stats.json", "metrics.json", "neighbours_euclidean.png",
                 "neighbours_cosine.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    # 10 rows of a framed query (32 + 2 x 2 px), a 6 px gap and 9 neighbours
    assert iio.imread(os.path.join(out, "neighbours_cosine.png")).shape == (360, 36 + 6 + 9 * 32, 3)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for who in ("trained", "random_encoder"):
        assert set(metrics[who]) == {"mu", "local"}
        assert set(metrics[who]["mu"]) == {"knn_k1", "knn_k200_weighted", "linear_probe", "mlp_probe"}
    assert len(json.load(open(os.path.join(out, "mu_stats.json")))["std_per_dim"]) == 256
    encoder = infomax.build_encoder(32, 256)
    encoder.load_weights(os.path.join(out, "encoder.weights.h5"))
    loaded, config = infomax.load_encoder(out)  # the one-call loader of a run's features
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(infomax.embed(images, loaded, config),
                               encoder(images / 255.0 - 0.5, training=False)[0], atol=1e-5)

    infomax.main(common + ["--epochs", "2"])  # the same command, more epochs: resumes
    assert "resuming" in capsys.readouterr().err
    rows = list(csv.DictReader(open(os.path.join(out, "log.csv"))))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("loss", "global", "local", "prior", "global_acc_pos", "global_acc_neg",
                   "local_acc_pos", "local_acc_neg", "subset_knn_k1"):
        assert np.isfinite(float(rows[-1][column])), column

    infomax.main(["evaluate", "--out", out, "--probe-epochs", "1", "--no-baseline"])
    assert "trained / local" in capsys.readouterr().out

    pictures = tmp_path / "pictures" / "cats"
    pictures.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        iio.imwrite(pictures / f"{i}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    infomax.main(["search", "--out", out, "--folder", str(tmp_path / "pictures"),
                  "--query", str(pictures / "2.png"), "--top", "3"])
    printed = capsys.readouterr().out
    assert "1. " + str(pictures / "2.png") in printed  # an image is its own nearest neighbour
    assert os.path.isfile(os.path.join(out, "search_2_cosine.png"))

    # a different model in the same folder is refused and nothing saved is touched
    before = open(os.path.join(out, "latest.weights.h5"), "rb").read()
    assert run_cli(*common, "--epochs", "3", "--z-dim", "64") == 2
    assert "--z-dim" in capsys.readouterr().err
    assert open(os.path.join(out, "latest.weights.h5"), "rb").read() == before


@pytest.mark.slow
def test_ablation_command_writes_its_table_and_picture(tmp_path, capsys):
    """`infomax.py ablation` at a tiny size: three arms trained with the same seed and budget,
    the random encoder measured once, one table row per model and feature, one picture."""
    make_cifar_fixture(str(tmp_path / "data"), rows=16)
    out = tmp_path / "ablation"
    infomax.main(["ablation", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                  "--out", str(out), "--batch-size", "8", "--steps-per-epoch", "2",
                  "--epochs", "1", "--monitor-knn", "0", "--probe-epochs", "1"])
    for arm, (global_weight, local_weight) in {"global": (0.5, 0.0), "local": (0.0, 1.5),
                                               "both": (0.5, 1.5)}.items():
        saved = json.load(open(out / arm / "config.json"))
        assert (saved["global_weight"], saved["local_weight"], saved["prior_weight"]) == (
            global_weight, local_weight, 0.01)
        assert saved["seed"] == 0 and saved["epochs"] == 1
        assert (out / arm / "metrics.json").is_file()
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [(r["model"], r["feature"]) for r in rows] == [
        (m, f) for m in ("global", "local", "both", "random") for f in ("mu", "local")]
    for row in rows:
        for column in ("knn_k1", "knn_k200_weighted", "linear_probe", "mlp_probe"):
            assert 0.0 <= float(row[column]) <= 100.0
    assert "| both | mu |" in (out / "ablation.md").read_text()
    picture = iio.imread(out / "ablation_neighbours.png")
    # 8 rows of a framed query (32 + 2 x 2 px) under a label strip; query + 3 x (6 px gap +
    # 5 neighbours)
    assert picture.shape[1] == 36 + 3 * (6 + 5 * 32) and picture.shape[0] == 8 * 36 + 16


def test_bad_paths_exit_with_status_2_and_a_clear_message(tmp_path, capsys):
    assert run_cli("--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                   "--out", str(tmp_path / "run")) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert run_cli("--dataset", "tiny-imagenet", "--out", str(tmp_path / "run")) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert run_cli("evaluate", "--out", str(tmp_path / "empty")) == 2
    assert "no saved run" in capsys.readouterr().err
    assert run_cli("search", "--out", str(tmp_path / "empty"), "--folder", str(tmp_path),
                   "--query", "x.png") == 2
    assert "no trained encoder" in capsys.readouterr().err


@pytest.mark.parametrize("name, local_size", [(None, 4), ("dim-cifar10-local8", 8)])
@pytest.mark.slow
def test_a_shipped_cifar10_encoder_loads_in_one_call_and_beats_a_random_one(name, local_size):
    """pretrained/dim-cifar10 (the default: the author's setting, 50 epochs) and
    pretrained/dim-cifar10-local8 (`--local-size 8`, 50 epochs), loaded by name. On the
    bit-exact CIFAR-10 subset (5,085 training images as the bank, 1,017 test queries) their mu
    gave k-NN k=200 44.6 % and 45.4 % against 34.1 % for the random encoder (2026-12-01,
    2026-12-04)."""
    subset = os.path.join(SHARED_DATA, "cifar10-subset")
    if not os.path.isdir(subset):
        pytest.skip(f"no CIFAR-10 subset at {subset}")
    encoder, config = infomax.load_encoder() if name is None else infomax.load_encoder(name)
    assert (config.dataset, config.img_size, config.z_dim, config.epochs, config.local_size) == (
        "cifar10", 32, 256, 50, local_size)
    (train_x, train_y), (test_x, test_y) = datasets.load_cifar10(subset)
    bank, queries = (infomax.embed(x, encoder, config) for x in (train_x, test_x))
    assert bank.shape == (5085, 256)
    trained = feature_eval.knn_accuracy(bank, train_y, queries, test_y)
    random = infomax.random_encoder(config)
    baseline = feature_eval.knn_accuracy(infomax.embed(train_x, random, config), train_y,
                                         infomax.embed(test_x, random, config), test_y)
    assert trained[200] > 0.42 and trained[200] > baseline[200] + 0.05, (trained, baseline)
