"""The data: image folders, CIFAR-10 and Tiny ImageNet, and the training streams.

Loaders return uint8 images (N, S, S, 3) and int labels (N,) (-1 when unknown), a training
and a test split. Training streams are functions of their position (`stream_order`): the
same seed gives the same batches, and a resumed run reads on exactly where it stopped. Their
order has a random key of its own, apart from the model's noise (`order_key`).
"""

import glob
import os
import pickle
import sys
import tarfile

import numpy as np
import tensorflow as tf
import keras

import image_files
from common import UsageError, read_run_json
from image_files import load_image
from training.checkpoint import saved_model_config
from training.distribute import shard_by_data


# --------------------------------------------------------------------------- training streams

# A run's `data_order`: how its passes are shuffled (`order_key`). A run keeps the one it
# started with (`run_data_order`).
OWN_STREAM = "own-stream"    # keys no noise draw takes
SHARED_SEED = "shared-seed"  # the keys of runs saved before the data order had its own
DATA_ORDERS = (OWN_STREAM, SHARED_SEED)


def order_key(seed, pass_number, own_stream=True):
    """The stateless seed pair that shuffles pass `pass_number` of the stream of `seed`:
    [seed, 2^32 + pass] with `own_stream`, else [seed, pass].

    A model's noise comes from Keras: the k-th draw of a `keras.random.SeedGenerator(seed)` is
    the pair [seed, k], and `keras.utils.set_random_seed(seed)` seeds Python's generator, from
    which the global SeedGenerator and the initialisers draw their seeds (NumPy's and
    TensorFlow's global seeds besides, which key no stateless op). Keras hands every pair to
    TensorFlow as two int32 numbers in [0, 2^31 - 2) (its backend reduces them modulo
    2^31 - 2), and TensorFlow keys a stateless op on the pair's two 64-bit words: a second
    word from 2^32 on is a key that no noise draw of any run, whatever its seed, can take.
    [seed, pass] is the key of runs saved before: there pass k's shuffle and noise draw k
    came from the same random numbers.
    """
    pass_number = tf.cast(pass_number, tf.int64)
    return tf.stack([tf.constant(int(seed), tf.int64),
                     pass_number + 2**32 if own_stream else pass_number])


def stream_order(count, seed, start=0, own_stream=True):
    """Indices 0..count-1, pass after pass, each pass a fresh permutation that depends only on
    (seed, pass number), from position `start` (the number of items training has used), keyed
    by `order_key` (`own_stream` False: the shared key of runs saved before).

    The stream is a function of its position, not of the process: a run resumed after
    `start` items sees exactly what an uninterrupted run saw next, and getting there costs
    one permutation, not a replay of every earlier pass.
    """
    first_pass, offset = divmod(int(start), int(count))

    def one_pass(number):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=order_key(seed, number, own_stream))
        return tf.data.Dataset.from_tensor_slices(order)

    return tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass).skip(offset)


def run_data_order(run_dir):
    """The `data_order` of the run to train in `run_dir`: the one its config.json names (if
    that is gone, the model configuration its weights record). A run saved before the data
    order had its own key lacks it and keeps the shared key, so that it resumes with the
    batches it would have had; a new run gets its own stream."""
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        saved = read_run_json(path, {"data_order": (str, False)})
    else:
        path, saved = saved_model_config(run_dir)
        if not saved:
            return OWN_STREAM
    order = saved.get("data_order", SHARED_SEED)
    if order not in DATA_ORDERS:
        raise UsageError(f"{path}: key 'data_order' is {order!r}, expected one of "
                         f"{', '.join(DATA_ORDERS)}; damaged or edited by hand? repair it, or "
                         "move the run folder away")
    return order


def image_stream(files, img_size, batch_size, scale, seed, start=0, own_stream=True):
    """Training batches of image files in `stream_order` (reshuffled every pass, as the
    author's stream), decoded in parallel in a fixed order, from image number `start`."""
    paths = tf.constant(files)
    ds = stream_order(len(files), seed, start, own_stream)
    ds = ds.map(lambda i: scale(load_image(tf.gather(paths, i), img_size)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return finish_stream(ds, first_step=int(start) // batch_size)


def finish_stream(ds, first_step=0):
    """Prefetch a training stream and shard it by data. `ds` yields global batches, the same
    on every worker of a cluster: each keeps its part (`shard_by_data`). `first_step`: the
    run's step number of the first batch (tests/fault_hooks.py poisons steps by number)."""
    return shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def array_stream(images, batch_size, scale, seed, start=0, own_stream=True):
    """Training batches of `scale(images)` (uint8 in memory) in `stream_order`, a new
    permutation every pass, from image number `start`: a resumed run sees what an
    uninterrupted one would, and every worker of a cluster makes the same global batches."""
    images = tf.constant(images)
    order = stream_order(len(images), seed, start, own_stream)
    order = order.batch(batch_size, drop_remainder=True)  # a fixed batch size for the compiled step
    ds = order.map(lambda i: scale(tf.gather(images, i)),
                   num_parallel_calls=tf.data.AUTOTUNE)
    return finish_stream(ds, first_step=int(start) // batch_size)



# --------------------------------------------------------------------------- files and arrays

def image_dataset(files, img_size, batch_size, scale, labels=None):
    """The image files in order, once, as batches (the last one may be smaller) of
    `scale(pixels in [0, 255])` (and their labels, if given); decoded in parallel, prefetched.
    For evaluation and encoding; training reads `image_stream`."""
    items = (files,) if labels is None else (files, np.asarray(labels))

    def decode(path, *label):
        image = scale(load_image(path, img_size))
        return (image, *label) if label else image

    ds = tf.data.Dataset.from_tensor_slices(items)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else. Such a file is a dict of bytes, a list of
    ints and one uint8 array; the only callables it names are those numpy uses to rebuild an
    array (`_reconstruct`, `ndarray`, `dtype`; `_frombuffer` at pickle protocol 5), under
    numpy 1's and numpy 2's module names. Any other (os.system, builtins.exec, ...: a crafted
    file's payload) is refused before it is looked up, so that no code in a data file runs."""

    _reconstruct, _frombuffer = np.array(0).__reduce__()[0], np.arange(1).__reduce_ex__(5)[0]
    ARRAY_PARTS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy.core.numeric", "_frombuffer"): _frombuffer,
                   ("numpy._core.numeric", "_frombuffer"): _frombuffer}

    def find_class(self, module, name):
        if (module, name) not in self.ARRAY_PARTS:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: a CIFAR-10 batch holds only numpy arrays, lists, "
                "bytes and ints (a file that names anything else could run code)")
        return self.ARRAY_PARTS[module, name]


def read_cifar_batch(f):
    """One python-pickle CIFAR batch (protocol 2, bytes keys) -> uint8 (n, 32, 32, 3), labels.
    Read by `CifarUnpickler`; anything but the batch format is a ValueError."""
    try:
        batch = CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # noqa: BLE001 - any way a damaged pickle fails means the same here
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        raise ValueError("not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"b'data' is a {data.dtype} array of shape {data.shape}, expected "
                         "uint8 (n, 3072)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows: 1024 R, G, B, row-major
    labels = np.asarray(batch[b"labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("b'labels' is not a list of integers")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


# Where `--dataset cifar10` without --data-dir looks first: the project's data/cifar10 (the
# README's place for it), then Keras' download cache.
CIFAR_LOCAL = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cifar10"),
               os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                            "datasets", "cifar-10-batches-py"))


def load_cifar10(data_dir=None):
    """CIFAR-10 from a cifar-10-batches-py folder (or its parent), the official tarball,
    or, without `data_dir`, the first of CIFAR_LOCAL that holds it, else Keras' own loader
    (which needs the network once)."""
    if data_dir is None:
        local = next((d for d in CIFAR_LOCAL if os.path.isfile(os.path.join(d, "data_batch_1"))
                      or os.path.isfile(os.path.join(d, "cifar-10-batches-py", "data_batch_1"))),
                     None)
        if local is not None:
            print(f"--dataset cifar10: reading {local}", file=sys.stderr)
            return load_cifar10(local)
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        except Exception as e:  # noqa: BLE001 - offline, proxy, bad cache: all mean the same here
            raise UsageError(
                f"--dataset cifar10: not in {CIFAR_LOCAL[0]} and Keras could not download it "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download "
                "cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) and pass "
                "--data-dir with it, or with a cifar-10-batches-py folder") from None
        return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1))

    candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
    folder = next((c for c in candidates if os.path.isfile(os.path.join(c, "data_batch_1"))), None)
    tarball = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, "cifar-10-python.tar.gz")
    if folder is None and not os.path.isfile(tarball):
        raise UsageError(f"--data-dir {data_dir!r}: expected a cifar-10-batches-py folder "
                         "(data_batch_1..5, test_batch), the folder containing it, or "
                         "cifar-10-python.tar.gz")

    def folder_batches():  # (where, how to open it) of each batch file, in order
        for name in CIFAR_TRAIN + CIFAR_TEST:
            path = os.path.join(folder, name)
            yield path, lambda: open(path, "rb")

    def tarball_batches():
        with tarfile.open(tarball) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if n not in members]
            if missing:
                raise ValueError(f"no {', '.join(missing)} inside")
            for name in CIFAR_TRAIN + CIFAR_TEST:
                yield f"{tarball}:{members[name].name}", lambda: tar.extractfile(members[name])

    where, batches = folder or tarball, []
    try:
        for where, open_batch in (folder_batches() if folder else tarball_batches()):
            with open_batch() as f:
                batches.append(read_cifar_batch(f))
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, tarfile.TarError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"--data-dir {data_dir!r}: {where}: not readable as a CIFAR-10 python "
                         f"batch ({type(e).__name__}: {why})") from None
    train, test = batches[:len(CIFAR_TRAIN)], batches[len(CIFAR_TRAIN):]

    def join(parts):
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return join(train), join(test)


def decode_images(files, img_size, labels=None):
    """Decode image files (in parallel, in order) into uint8 (N, S, S, 3); greyscale -> RGB."""
    if not files:
        return np.zeros((0, img_size, img_size, 3), np.uint8), np.zeros(0, np.int64)
    index = np.arange(len(files))
    ds = image_dataset(files, img_size, batch_size=256, scale=lambda x: x, labels=index)
    images = np.zeros((len(files), img_size, img_size, 3), np.uint8)
    progress = keras.utils.Progbar(len(files), unit_name="image",
                                   verbose=1 if sys.stdout.isatty() else 0)  # no bar in a file
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
    keep = set(image_files.find_readable_images(files, img_size)[0])
    kept = [(f, y) for f, y in zip(files, labels) if f in keep]
    return decode_images([f for f, _ in kept], img_size, [y for _, y in kept])


def folder_classes(files, root):
    """Class = first sub-folder below `root` when there are sub-folders, else -1 (no labels)."""
    tops = [os.path.relpath(f, root).split(os.sep) for f in files]
    if all(len(t) == 1 for t in tops):
        return np.full(len(files), -1), []
    names = sorted({t[0] for t in tops if len(t) > 1})
    return np.array([names.index(t[0]) if len(t) > 1 else -1 for t in tops]), names


def load_folder(data_dir, img_size, seed=0):
    """Any folder of images; a seeded 10% is held out as the test split (queries, metrics)."""
    files = image_files.scan_image_folder(data_dir, img_size)
    labels, _ = folder_classes(files, data_dir)
    order = np.random.default_rng(seed).permutation(len(files))
    n_test = int(round(len(files) * 0.1)) if len(files) >= 10 else 0
    test, train = order[:n_test], order[n_test:]
    return (decode_images([files[i] for i in train], img_size, labels[train]),
            decode_images([files[i] for i in test], img_size, labels[test]))
