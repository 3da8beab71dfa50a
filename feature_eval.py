"""What a trained feature extractor is good for, and how good it is: encode images, find
nearest neighbours (cosine or Euclidean), k-NN and probe accuracies on a labelled split,
neighbour pictures. Search by image over an index of a folder is in search/"""

import os
import sys
import time
import weakref

import numpy as np
import tensorflow as tf
import keras

from training.precision import in_float32
from common import write_json
from pictures import label_strip, neighbour_grid, write_png
from training.checkpoint import read_state


_FEATURE_MODELS = weakref.WeakKeyDictionary()  # encoder -> its (mu, flattened local map) model


def encode(encoder, images, scale, batch_size=500):
    """uint8 images -> {"mu": (N, z_dim), "local": the flattened local map (N, 4*4*256)}, in
    inference mode; `scale` maps uint8 pixels to the model's range. The two-output model is
    made once per encoder (a new one per call would retrace its predict function). An encoder
    trained in low precision is measured through a float32 copy of its current weights."""
    if encoder not in _FEATURE_MODELS:
        twin = in_float32(encoder)
        _FEATURE_MODELS[encoder] = twin, keras.Model(
            twin.input, [twin.outputs[0], keras.layers.Flatten()(twin.outputs[2])])
    twin, model = _FEATURE_MODELS[encoder]
    if twin is not encoder:
        twin.set_weights(encoder.get_weights())
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    ds = ds.map(scale).prefetch(tf.data.AUTOTUNE)
    verbose = 1 if len(images) > 5 * batch_size and sys.stdout.isatty() else 0  # no bar in a file
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
                 temperature=0.07):
    """Cosine k-NN classification accuracy. k = 1: the nearest neighbour's label. Larger k:
    each of the k nearest votes with weight exp(cosine / 0.07) (Wu et al. 2018, InstDisc)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
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
        stack += [keras.layers.Dense(hidden, activation="relu"), keras.layers.Dropout(dropout)]
    classifier = keras.Sequential(stack + [keras.layers.Dense(num_classes)])
    classifier.compile(keras.optimizers.Adam(1e-3),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    classifier.fit((train_features - mean) / std, train_labels, batch_size=batch_size,
                   epochs=epochs, verbose=0, shuffle=True)
    return float(classifier.evaluate((test_features - mean) / std, test_labels,
                                     batch_size=1024, verbose=0)[1])


def feature_quality(train_features, train_labels, test_features, test_labels, probe_epochs=10,
                    seed=0, label="", features=("mu", "local"), mlp=True):
    """k-NN (k = 1, k = 200 weighted) and probe (linear, and MLP-200 unless `mlp` is False)
    accuracies of each of `features` (default: mu and the local map)."""
    probes = (("linear_probe", 0), ("mlp_probe", 200))[:2 if mlp else 1]
    result = {}
    for name in features:
        start = time.time()
        knn = knn_accuracy(train_features[name], train_labels, test_features[name], test_labels)
        scores = {"knn_k1": knn[1], "knn_k200_weighted": knn[200]}
        for probe, hidden in probes:
            scores[probe] = probe_accuracy(train_features[name], train_labels, test_features[name],
                                           test_labels, hidden=hidden, epochs=probe_epochs, seed=seed)
        print(f"  {label}{name}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
              + f" ({time.time() - start:.0f} s)", flush=True)
        result[name] = scores
    return result


class KnnMonitor(keras.callbacks.Callback):
    """Adds the cosine k-NN accuracy of mu on a fixed subset to each epoch's logs (and CSV)."""

    def __init__(self, training_set, test_set, scale, size, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        pick_bank = rng.permutation(len(training_set[0]))[:size]
        pick_queries = rng.permutation(len(test_set[0]))[:max(size // 5, 1)]
        self.bank = training_set[0][pick_bank], training_set[1][pick_bank]
        self.queries = test_set[0][pick_queries], test_set[1][pick_queries]
        self.scale = scale

    def on_epoch_end(self, epoch, logs=None):
        bank = encode(self.model.encoder, self.bank[0], self.scale)["mu"]
        queries = encode(self.model.encoder, self.queries[0], self.scale)["mu"]
        knn = knn_accuracy(bank, self.bank[1], queries, self.queries[1])
        logs["subset_knn_k1"], logs["subset_knn_k200"] = knn[1], knn[200]


def save_neighbour_pictures(run_dir, train_mu, test_mu, train_images, test_images, seed,
                            queries=10, neighbours=9):
    """10 random test images, each (in a red frame, pictures.neighbour_grid) followed by its 9
    nearest training images by mu, by Euclidean distance and by cosine similarity; true
    pixels."""
    picked = np.random.default_rng(seed).choice(len(test_mu), min(queries, len(test_mu)),
                                                replace=False)
    paths = []
    for metric in ("euclidean", "cosine"):
        indices, _ = nearest(test_mu[picked], train_mu, neighbours, metric)
        picture, _ = neighbour_grid(test_images[picked], [train_images[indices]], (0, 255))
        paths.append(write_png(os.path.join(run_dir, f"neighbours_{metric}.png"), picture))
    return paths


def save_neighbour_comparison(path, codes, bank_images, query_images, seed, queries=8,
                              neighbours=5):
    """One picture, the same `queries` random test images for every model: per row the query
    (in a red frame, pictures.neighbour_grid), then for each model (`codes`: {label: (bank
    codes, query codes)}, left to right) its `neighbours` nearest training images by cosine
    similarity, a white gap between blocks and the labels on top; true pixels."""
    picked = np.random.default_rng(seed).choice(len(query_images),
                                                min(queries, len(query_images)), replace=False)
    blocks = [bank_images[nearest(query_codes[picked], bank, neighbours, "cosine")[0]]
              for bank, query_codes in codes.values()]
    grid, offsets = neighbour_grid(query_images[picked], blocks, (0, 255))
    header = label_strip(grid.shape[1], query_images.shape[1],
                         [("query", 0)] + list(zip(codes, offsets)))
    write_png(path, np.concatenate([header, grid]))
    return path


def evaluate_encoder(run_dir, encoder, training_set, test_set, scale, probe_epochs=10, seed=0,
                     limit=None, baseline=None, about=None):
    """Everything docs/model.md asks of a trained encoder ("Deep InfoMax with a KL prior",
    "Training and evaluation"), written to `run_dir` and printed: mu's statistics over the
    training set (mu_stats.json), the neighbour pictures, and (with a labelled test split) k-NN
    and probe accuracies of mu and of the local map, for the encoder and for `baseline` (a
    randomly initialised one), in metrics.json with `about` merged in.

    The training split is the memory bank and the probes' training set; the test split gives
    the queries. `limit`: only the first N training and N/5 test images (quick looks)."""
    held_out = len(test_set[0]) > 0
    if not held_out:
        print("no test images: the queries come from the training split")
        test_set = training_set
    if limit:
        training_set = training_set[0][:limit], training_set[1][:limit]
        test_set = test_set[0][:max(limit // 5, 1)], test_set[1][:max(limit // 5, 1)]
    (bank_images, bank_labels), (query_images, query_labels) = training_set, test_set
    print(f"encoding {len(bank_images)} training and {len(query_images)} test images")
    bank = encode(encoder, bank_images, scale)
    queries = encode(encoder, query_images, scale)
    mu = bank["mu"]
    write_json(os.path.join(run_dir, "mu_stats.json"), {
        "mean": float(mu.mean()), "std": float(mu.std()),
        "mean_per_dim": mu.mean(0).round(5).tolist(), "std_per_dim": mu.std(0).round(5).tolist()})
    pictures = save_neighbour_pictures(run_dir, mu, queries["mu"], bank_images, query_images, seed)
    print(f"mu over the training set: mean {mu.mean():.4f}, std {mu.std():.4f} (mu_stats.json); "
          f"wrote " + ", ".join(pictures))
    if (not held_out or (bank_labels < 0).any() or (query_labels < 0).any()
            or len(set(bank_labels)) < 2):
        print("no labelled test split with two or more classes: skipping the accuracy metrics")
        return None
    state_path = os.path.join(run_dir, "state.json")
    metrics = {"epochs_done": read_state(state_path)["epochs_done"] if os.path.exists(state_path) else 0,
               "train_images": len(bank_images), "test_images": len(query_images),
               "knn": "cosine similarity on raw features; k=1 nearest label; k=200 votes "
                      "weighted by exp(cos/0.07) (InstDisc)",
               "probes": f"Adam 1e-3, {probe_epochs} epochs on standardised frozen features; "
                         "linear = softmax regression, mlp = Dense(200, relu) + dropout 0.1",
               **(about or {})}
    print("feature quality of the trained encoder:")
    metrics["trained"] = feature_quality(bank, bank_labels, queries, query_labels, probe_epochs,
                                         seed)
    if baseline is not None:
        print("feature quality of a randomly initialised encoder:")
        metrics["random_encoder"] = feature_quality(
            encode(baseline, bank_images, scale), bank_labels,
            encode(baseline, query_images, scale), query_labels, probe_epochs, seed, "random ")
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
