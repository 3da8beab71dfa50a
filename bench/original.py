"""Times the author's original Keras 2 scripts on this machine, for `bench.py --original-src`.

    python bench/original.py --src DIR --model infomax_cifar10 [--steps 20 --warmup 3]

DIR holds Jianlin Su's files as published: `f-VAEs.py`, `glow.py` and `flow_layers.py` from
github.com/bojone/flow, `infomax_cifar10.py` and `infomax_tiny_imagenet.py` from
github.com/bojone/infomax. They are read, never written and never copied into this
repository. They need the legacy Keras 2 package (`pip install tf_keras==2.21.0`, optional,
not in requirements.txt); `import keras` in them is pointed at it.

What it runs, in this process (bench.py starts one per model and kernel setting, with
`TF_ENABLE_ONEDNN_OPTS` unset for TensorFlow's default kernels or set to 1 for oneDNN):
1. the script's text with the fixes below applied in memory, each a regular expression that
   must match exactly as often as expected, else an error naming the file (another version
   of it);
2. cut right after the statement that compiles the training model (`vae`, `model_train`,
   `encoder`): the
   data set, the model, its losses and its Adam optimizer are the author's; training,
   sampling and saving after that line are not run;
3. one batch of random data of the right shape and range, held in memory (the script's own
   batch size, read from its `batch_size=` and checked against bench.py's);
4. the compiled tf_keras `train_function` (the tf.function that `fit` calls once per step,
   reading the batch from a repeated `tf.data` of it, as `fit` reads its data) called for
   warm-up steps, then for timed steps, waiting for the loss after each.
It prints one JSON line: median and minimum s/step, images/s, trainable parameters, whether
oneDNN was on, the fixes applied.

The fixes (`FIXES`), and why each is needed:
- Python 3 (the scripts are Python 2): `/` between ints gives floats, which Conv2D and Input
  refuse as channel counts (-> `//`); `np.random.shuffle` cannot shuffle a `range` in place
  (-> a list). Keras 2.2's `K.tf` (TensorFlow 1) is gone (-> TensorFlow 2's
  `tf.random.shuffle`).
- tf_keras builds functional models from KerasTensors: the log-determinant each flow layer
  stores in its `call()` has no Keras history, and `add_loss` refuses it. Adding a callable
  that reads the attribute instead gives the same terms: Keras calls it when the training step
  collects the losses, right after the forward pass that set them.
- Data: no data set is read. `scipy.misc` (imread, imresize) and `tqdm` serve only the data
  loading and are gone or optional, so their imports go; CIFAR-10 and Tiny ImageNet are
  replaced by random images of their shape; the f-VAE's crop size, read from the first
  CelebA-HQ image, is CelebA-HQ's 1024x1024.
- Configuration: `img_dim` selects 64x64 or 128x128 for the f-VAE (the file has 128). Glow's
  2018 versions train at batch 32, its 2019 version (and ours) at 64: all are timed at 64.
- Glow: its `os.mkdir('samples')` would write into the current folder (-> `pass`); its
  training targets are the images flattened, as its data generator yields them.
Every fix keeps the line count, so tracebacks point at the lines of the user's file.
"""

import argparse
import contextlib
import io
import json
import os
import re
import resource
import statistics
import sys
import time
import types
from dataclasses import dataclass

FLOW_LAYERS = "flow_layers.py"
# bench.py's name: (the author's script, f-VAE image size or None)
SCRIPTS = {
    "fvae64": ("f-VAEs.py", 64),
    "fvae128": ("f-VAEs.py", 128),
    "infomax_cifar10": ("infomax_cifar10.py", None),
    "infomax_tiny": ("infomax_tiny_imagenet.py", None),
    "glow64": ("glow.py", None),
}
REPOSITORY = {"f-VAEs.py": "bojone/flow", FLOW_LAYERS: "bojone/flow", "glow.py": "bojone/flow",
              "infomax_cifar10.py": "bojone/infomax", "infomax_tiny_imagenet.py": "bojone/infomax"}
# The port's counts (README, tests/test_f_vaes.py, tests/test_infomax.py); the original's must
# be the same for the comparison to be of the same model.
TRAINABLE_PARAMS = {"fvae64": 95_830_082, "fvae128": 95_830_082,
                    "infomax_cifar10": 2_210_818, "infomax_tiny": 2_228_482,
                    "glow64": 11_771_232}


@dataclass(frozen=True)
class Fix:
    pattern: str  # regular expression, re.MULTILINE; matches within one line
    replacement: str
    count: int  # how often it must match in the author's file
    why: str
    # Published versions differ: a version that has this (the fix written in already), or
    # matches `optional` (a version that never had the problem), needs no fix.
    already: str = None
    optional: bool = False


PY3_RANDOM_SHUFFLE = Fix(r"\b(K\.)?tf\.random_shuffle\b", "tf.random.shuffle", 1,
                         "tf.random_shuffle (TensorFlow 1; K.tf in the first versions) is "
                         "tf.random.shuffle in TensorFlow 2")
PY3_FILTER_COUNT = Fix(r"\bz_dim / 2\*\*", "z_dim // 2**", 1,
                       "Python 3: / gives a float filter count", already=r"\bz_dim // 2\*\*")
LOGDET_LOSS = Fix(r"\.add_loss\((\w+)\.logdet\)", r".add_loss(lambda \1=\1: \1.logdet)", 1,
                  "tf_keras: a log-determinant set in call() has no Keras history; a callable "
                  "reads it after each forward pass (the first versions add none)",
                  optional=True)
NO_SCIPY_MISC = Fix(r"^from scipy import misc$", "", 1,
                    "scipy.misc (imread, imresize) is gone from SciPy; it only reads the data set")


def fixes_for(script, img_dim=None):
    if script == FLOW_LAYERS:
        return [Fix(r"(idxs = )range\((shape\[0\])\)", r"\1list(range(\2))", 2,
                    "Python 3: np.random.shuffle cannot shuffle a range in place")]
    if script == "f-VAEs.py":
        return [
            NO_SCIPY_MISC,
            Fix(r"\bmisc\.imread\(imgs\[0\]\)\.shape\[:2\]", "1024, 1024", 1,
                "no data set read: the crop size is CelebA-HQ's 1024x1024"),
            Fix(r"^img_dim = \d+$", f"img_dim = {img_dim}", 1,
                "the 64x64 or 128x128 configuration"),
            Fix(r"(?<=in_size\[1\])/|(?<=in_size\[-1\])/", "//", 2,
                "Python 3: / gives float channel counts to the coupling networks"),
            LOGDET_LOSS,
        ]
    if script == "glow.py":
        return [
            NO_SCIPY_MISC,
            Fix(r"^    os\.mkdir\('samples'\)$", "    pass", 1,
                "no samples/ folder written into the current folder"),
            Fix(r"^(def data_generator\(batch_size=)32\):$", r"\g<1>64):", 1,
                "the 2018 versions' batch of 32 -> the 2019 version's 64", optional=True),
            LOGDET_LOSS,
        ]
    if script == "infomax_cifar10.py":
        return [
            Fix(r"\bcifar10\.load_data\(\)", "_bench_random_cifar10()", 1,
                "no download: random uint8 images and labels of CIFAR-10's shape"),
            PY3_FILTER_COUNT,
            PY3_RANDOM_SHUFFLE,
        ]
    if script == "infomax_tiny_imagenet.py":
        return [
            NO_SCIPY_MISC,
            Fix(r"^from tqdm import tqdm$", "", 1,
                "tqdm only shows the progress of the data loading replaced below"),
            Fix(r"^x_train = np\.array\(.*$", "x_train = _bench_random_tiny_imagenet()", 1,
                "no data set read: random images in [-1, 1] (its imread's range) of its shape"),
            PY3_FILTER_COUNT,
            PY3_RANDOM_SHUFFLE,
        ]
    raise ValueError(script)


class SourceError(ValueError):
    """The author's files are missing, of another version, or tf_keras is missing."""


def read_source(src_dir, script):
    path = os.path.join(src_dir, script)
    if not os.path.isfile(path):
        raise SourceError(f"--original-src: {path} does not exist (git clone "
                          f"https://github.com/{REPOSITORY[script]} and put {script} in "
                          f"{src_dir})")
    with open(path, encoding="utf-8") as f:
        return path, f.read()


def apply_fixes(text, fixes, path):
    applied = []
    for fix in fixes:
        text, found = re.subn(fix.pattern, fix.replacement, text, flags=re.MULTILINE)
        if found == 0 and (fix.optional or fix.already and re.search(fix.already, text,
                                                                       flags=re.MULTILINE)):
            continue  # this version needs no such fix
        if found != fix.count:
            raise SourceError(f"--original-src: {path} is not the version this bench knows: "
                              f"/{fix.pattern}/ matches {found} times, expected {fix.count} "
                              f"({fix.why})")
        applied.append({"file": os.path.basename(path), "count": found, "why": fix.why})
    return text, applied


@dataclass
class Prepared:
    """One of the author's scripts, fixed and cut after its compile line, ready to run."""
    path: str
    source: str
    model_variable: str  # the compiled training model's name in the script
    batch_size: int
    flow_layers: tuple | None  # (path, fixed source) for the f-VAE
    fixes: list


def prepare(src_dir, name):
    """Reads, fixes and cuts the script of bench model `name`; raises SourceError."""
    script, img_dim = SCRIPTS[name]
    flow_layers, fixes = None, []
    path, text = read_source(src_dir, script)
    if re.search(r"^(from flow_layers import|import flow_layers\b)", text, flags=re.MULTILINE):
        fl_path, fl_text = read_source(src_dir, FLOW_LAYERS)
        fl_text, fixes = apply_fixes(fl_text, fixes_for(FLOW_LAYERS), fl_path)
        flow_layers = (fl_path, fl_text)
    text, applied = apply_fixes(text, fixes_for(script, img_dim), path)
    batch_sizes = re.findall(r"\bbatch_size=(\d+)", text)
    compiles = list(re.finditer(r"^(\w+)\.compile\(.*$", text, flags=re.MULTILINE))
    if len(batch_sizes) != 1 or len(compiles) != 1:
        raise SourceError(f"--original-src: {path} is not the version this bench knows: "
                          f"{len(batch_sizes)} batch_size= and {len(compiles)} .compile( "
                          f"lines, expected one of each")
    end = statement_end(text, compiles[0].start() + len(compiles[0].group(1)) + len(".compile"))
    return Prepared(path, text[:end] + "\n", compiles[0].group(1),
                    int(batch_sizes[0]), flow_layers, fixes + applied)


def statement_end(text, open_paren):
    """The index after the parenthesis that closes the one at `open_paren` (a call that may
    span lines, as Glow's `encoder.compile(` does)."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise SourceError("--original-src: unbalanced parentheses after .compile(")


def check_tf_keras():
    """tf_keras importable and of TensorFlow's version; raises SourceError. Imports neither."""
    import importlib.metadata
    import importlib.util

    def installed(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    tf_version = installed("tensorflow") or installed("tensorflow-cpu")
    wanted = ".".join(tf_version.split(".")[:2]) + ".0" if tf_version else "2.21.0"
    if importlib.util.find_spec("tf_keras") is None:
        raise SourceError(f"--original-src needs the legacy Keras 2 package, which is not "
                          f"installed: pip install tf_keras=={wanted} (optional, not in "
                          f"requirements.txt; it leaves Keras 3 as it is)")
    version = installed("tf_keras")
    if tf_version and version and version.split(".")[:2] != tf_version.split(".")[:2]:
        raise SourceError(f"--original-src: tf_keras {version} does not match TensorFlow "
                          f"{tf_version}: pip install tf_keras=={wanted}")


def use_tf_keras_as_keras():
    """`import keras` and `from keras.layers import ...` in the author's files get tf_keras."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tf.keras too, before TensorFlow is imported
    import tf_keras
    sys.modules["keras"] = tf_keras
    for module in ("backend", "layers", "models", "optimizers", "callbacks", "datasets"):
        sys.modules["keras." + module] = getattr(tf_keras, module)
    return tf_keras


def build(prepared, seed=0):
    """Runs the fixed, cut script; returns (compiled training model, batch of random data)."""
    import numpy as np
    import tensorflow as tf
    np.random.seed(seed)
    tf.random.set_seed(seed)
    batch = prepared.batch_size
    if prepared.flow_layers:
        fl_path, fl_text = prepared.flow_layers
        flow_layers = types.ModuleType("flow_layers")
        flow_layers.__file__ = fl_path
        exec(compile(fl_text, fl_path, "exec"), flow_layers.__dict__)
        sys.modules["flow_layers"] = flow_layers

    def random_cifar10():
        images = np.random.randint(0, 256, (batch, 32, 32, 3)).astype("uint8")
        labels = np.random.randint(0, 10, (batch, 1)).astype("uint8")
        return (images, labels), (images, labels)

    namespace = {
        "__name__": "__original__", "__file__": prepared.path, "tf": tf,
        "_bench_random_cifar10": random_cifar10,
        "_bench_random_tiny_imagenet":
            lambda: np.random.uniform(-1, 1, (batch, 64, 64, 3)).astype("float32"),
    }
    with contextlib.redirect_stdout(io.StringIO()):  # the scripts print model summaries
        exec(compile(prepared.source, prepared.path, "exec"), namespace)
    model = namespace[prepared.model_variable]
    if "x_train" in namespace:  # infomax: the script's own preprocessing of the random images
        data = np.ascontiguousarray(namespace["x_train"][:batch])
    else:  # f-VAE, Glow: their imread gives float32 in [-1, 1]
        shape = (batch,) + tuple(model.inputs[0].shape[1:])
        data = np.random.uniform(-1, 1, shape).astype("float32")
    if os.path.basename(prepared.path) == "glow.py":  # its generator yields (X, X flattened)
        return model, (data, data.reshape(batch, -1))
    return model, (data,)


def time_train_function(model, data, steps, warmup):
    """Seconds of each timed call of the compiled train_function (what fit runs per step)."""
    import tensorflow as tf
    batches = iter(tf.data.Dataset.from_tensors(tuple(tf.constant(d) for d in data)).repeat())
    train_function = model.make_train_function()
    times, loss = [], float("nan")
    for step in range(warmup + steps):
        model.reset_metrics()  # untimed; the loss read is this step's, not a running mean
        start = time.perf_counter()
        loss = float(train_function(batches)["loss"])  # waits for the step to finish
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, loss


def run(src_dir, name, steps, warmup):
    prepared = prepare(src_dir, name)
    check_tf_keras()
    tf_keras = use_tf_keras_as_keras()
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port
    start = time.perf_counter()
    model, data = build(prepared)
    build_s = time.perf_counter() - start
    times, loss = time_train_function(model, data, steps, warmup)
    median = statistics.median(times)
    return {
        "model": name, "script": os.path.basename(prepared.path), "batch": len(data[0]),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "onednn_on": bool(_pywrap_util_port.IsMklEnabled()),
        "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
        "steps_timed": steps, "warmup": warmup, "build_s": build_s,
        "median_step_s": median, "min_step_s": min(times), "images_per_s": len(data[0]) / median,
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss_finite": bool(np.isfinite(loss)), "fixes": prepared.fixes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder with the author's files")
    parser.add_argument("--model", required=True, choices=sorted(SCRIPTS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        result = run(args.src, args.model, args.steps, args.warmup)
    except SourceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
