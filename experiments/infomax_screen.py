"""A quick screen of Deep InfoMax settings at a small budget (docs/infomax.md, "Why the
author's setting starts below a random encoder"): train one setting for a few passes of CIFAR-10, then report
cosine k-NN (k=1, k=200 weighted) and a linear probe on the first 10,000 training and 2,000
test images, for mu, for the pooled layer before mu and for the local map.

    python experiments/infomax_screen.py NAME EPOCHS '{"lr": 1e-4}' --data-dir data/cifar10
    python experiments/infomax_screen.py random 0 --data-dir data/cifar10   # the random encoder

Each result is one JSON line, printed and appended to --results.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_setup  # noqa: F401,E402  (first: TensorFlow's environment, quietly)
import keras  # noqa: E402

import feature_eval  # noqa: E402
import infomax  # noqa: E402

BANK, QUERIES = 10_000, 2_000


def features(encoder, images, scale):
    """mu, the global-max-pooled layer before mu, and the flattened local map."""
    result = feature_eval.encode(encoder, images, scale)
    pooled = keras.Model(encoder.input, encoder.get_layer("mu").input)
    result["pooled"] = pooled.predict(scale(images), batch_size=500, verbose=0)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a name for the setting; 'random' measures the random encoder")
    parser.add_argument("epochs", type=int, help="passes over the training images")
    parser.add_argument("overrides", nargs="?", default="{}",
                        help="Config fields as JSON, e.g. '{\"local_size\": 8}'")
    parser.add_argument("--data-dir", default=None, help="as infomax.py's --data-dir")
    parser.add_argument("--results", default="screen.jsonl", help="JSON lines appended here")
    args = parser.parse_args()
    overrides = json.loads(args.overrides)
    config = infomax.resolve(infomax.Config(dataset="cifar10", data_dir=args.data_dir, **overrides))
    (train_images, train_labels), (test_images, test_labels) = infomax.load_data(config)
    scale = infomax.pixel_scale(config)
    start = time.time()
    if args.name == "random":
        encoder = infomax.random_encoder(config)
    else:
        model = infomax.build_model(config)
        stream = infomax.training_stream(train_images, config.batch_size, config.pixel_range,
                                         config.seed)
        model.fit(stream, epochs=args.epochs, steps_per_epoch=len(train_images) // config.batch_size,
                  verbose=2)
        encoder = model.encoder
    result = {"name": args.name, "epochs": args.epochs, "overrides": overrides,
              "train_s": round(time.time() - start),
              f"(k-NN k=1, k=200, linear probe) on {BANK}/{QUERIES}": {
                  name: [round(100 * score, 1) for score in scores.values()]
                  for name, scores in feature_eval.feature_quality(
                      features(encoder, train_images[:BANK], scale), train_labels[:BANK],
                      features(encoder, test_images[:QUERIES], scale), test_labels[:QUERIES],
                      features=("mu", "pooled", "local"), mlp=False).items()}}
    print(json.dumps(result), flush=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
