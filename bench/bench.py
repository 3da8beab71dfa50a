"""Training throughput against this machine's own float32 peak, in one run.

    python bench/bench.py                      # peak + the five paper configurations
    python bench/bench.py --models fvae64      # one model
    python bench/bench.py --quick              # smoke test: tiny configurations, few steps
    python bench/bench.py --precision float32 mixed_bfloat16   # each model in each precision
    python bench/bench.py --json bench/result.json

What it does, in one process tree so that every ratio is taken in the same run:
1. the machine's float32 peak through TensorFlow: the median GFLOP/s of 2048^3 matmuls,
   with TensorFlow's default (Eigen) kernels and with oneDNN (which the scripts turn on),
   before and after the models; the highest of the four readings is the reference, so
   every share of it is conservative;
2. for each model, in a fresh subprocess (so peak resident memory is the model's own):
   build the model at its paper configuration (docs/model.md), compile its real training step
   (the same `train_step` that `model.fit` runs), run warm-up steps, then time steady-state
   steps on random data of the right shape, synchronising on the loss after each step;
3. FLOPs of one step are counted from the traced graph of the training step (forward and
   backward) with TensorFlow's graph profiler (`float_operation`: Conv2D, MatMul and their
   gradient ops; element-wise ops are not counted). They are the FLOPs this code does, so
   they are below the original's where it skips work (f-VAE: no zero-padding taps on the
   2x2 and 1x1 maps); "vs original" compares images/s, not FLOPs;
4. with `--precision`, each model in each precision, every one in its own subprocess, and
   the peaks of each precision (bfloat16 and float16 matmuls and a 3x3 convolution beside
   float32's); a step's share of peak is of its own precision's peak, and "vs float32" is
   its images/s over the same model's in float32, same run;
5. prints one table and writes it as JSON. "vs original" is the peak-normalised speed-up
   over the author's Keras 2 scripts: (images/s / peak) here over (images/s / peak) there,
   with figures of the original measured on another machine (issue 5).

With `--original-src DIR` (the author's files; needs `pip install tf_keras==2.21.0`) the
original scripts themselves are timed too, on this machine in the same run, each model
right after ours: `bench/original.py` in a subprocess, once with TensorFlow's default
kernels and once with oneDNN (`--original-kernels`), on random data of the same shape.
Our images/s over the original's, "vs original (default kernels)" and "vs original (oneDNN)",
are then the headline figures, printed in a second table.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import original

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As f_vaes.py and infomax.py set it (they are imported after TensorFlow here).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# name: (script, configuration passed to its benchmark hook, batch size)
PAPER = {
    "fvae64": ("f_vaes", {"img_size": 64}, 32),
    "fvae128": ("f_vaes", {"img_size": 128}, 32),
    "infomax_cifar10": ("infomax", {"dataset": "cifar10"}, 64),
    "infomax_tiny": ("infomax", {"dataset": "tiny-imagenet"}, 100),
    "glow64": ("glow", {"img_size": 64}, 64),  # the f-VAE paper's baseline (issue 12)
}
# The original Keras 2 scripts on TF 2.21 (legacy Keras) as issue 5 measured them, on a
# machine whose float32 matmul peak it gives as 245 GFLOP/s. Without --original-src this is
# the only "original", so the comparison is peak-normalised: (images/s / peak) here against
# (images/s / 245) there.
ORIGINAL_IMAGES_PER_S = {"fvae64": 14.4, "fvae128": 4.5, "infomax_cifar10": 337, "infomax_tiny": 247}
ORIGINAL_PEAK_GFLOPS = 245.0
ORIGINAL_FLOPS_PER_STEP = {"fvae64": 2.84e11, "fvae128": 1.14e12, "infomax_cifar10": 2.57e10,
                           "infomax_tiny": 5.23e10}
# --original-src: the original timed here, with TensorFlow's default kernels and with oneDNN.
ORIGINAL_KERNELS = ("default", "onednn")
ORIGINAL_KERNELS_LABEL = {"default": "default kernels", "onednn": "oneDNN"}
ORIGINAL_RATIO_KEY = {"default": "vs_original_default_kernels", "onednn": "vs_original_onednn"}
# --quick: only this original is small enough for a smoke test (it cannot be made tiny).
ORIGINAL_QUICK_MODEL = "infomax_cifar10"


# The low-precision peaks: a size^3 matmul, and a 3x3 convolution of a batch of 32 maps of
# 32x32x256 to 256 channels (forward), the shape of the widest coupling and encoder layers.
CONV_PEAK_SHAPE = (32, 32, 32, 256, 256)
PRECISION_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def median_rate(function, flops, repeats):
    function().numpy()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        function().numpy()
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def measure_peak(size=2048, repeats=9, dtype="float32", kind="matmul"):
    import tensorflow as tf
    if kind == "matmul":
        a = tf.cast(tf.random.normal((size, size)), dtype)
        b = tf.cast(tf.random.normal((size, size)), dtype)
        matmul = tf.function(lambda: tf.matmul(a, b))
        return median_rate(matmul, 2 * size**3, repeats)
    batch, h, w, c_in, c_out = CONV_PEAK_SHAPE
    x = tf.cast(tf.random.normal((batch, h, w, c_in)), dtype)
    k = tf.cast(tf.random.normal((3, 3, c_in, c_out)) * 0.05, dtype)
    conv = tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME"))
    return median_rate(conv, 2 * batch * h * w * 9 * c_in * c_out, repeats)


def measure_peaks(size, precisions=("float32",)):
    """The float32 matmul peak with TensorFlow's default Eigen kernels and with oneDNN (which
    the scripts turn on), and for each other precision its matmul and convolution peaks
    with oneDNN, each in a fresh process since the kernels are chosen at import."""
    peaks = {}
    readings = [("eigen", "0", "float32", "matmul"), ("onednn", "1", "float32", "matmul")]
    if any(p != "float32" for p in precisions):
        readings.append(("onednn conv", "1", "float32", "conv"))
    for precision in precisions:
        if precision != "float32":
            dtype = PRECISION_DTYPE[precision]
            readings += [(f"{dtype} matmul", "1", dtype, "matmul"),
                         (f"{dtype} conv", "1", dtype, "conv")]
    for label, flag, dtype, kind in readings:
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flag)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak", str(size),
                              "--peak-dtype", dtype, "--peak-kind", kind],
                             capture_output=True, text=True, env=env, check=True)
        peaks[label] = float(out.stdout.strip().splitlines()[-1])
    return peaks


def precision_peak(peaks, precision):
    """The highest reading of a precision's own kernels (float32: also Eigen's matmul)."""
    dtype = PRECISION_DTYPE[precision]
    if dtype == "float32":
        return max(v for k, v in peaks.items() if not k.startswith(("bfloat16", "float16")))
    return max(v for k, v in peaks.items() if k.startswith(dtype))


def count_flops(concrete_function):
    from tensorflow.python.profiler import model_analyzer, option_builder
    opts = (option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
            .with_empty_output().build())
    return model_analyzer.profile(concrete_function.graph, options=opts).total_float_ops


def run_one(name, steps, warmup, quick, precision="float32"):
    """Runs in a subprocess: build, warm up, time; returns a dict of numbers."""
    import importlib
    import numpy as np
    import tensorflow as tf
    script, config, batch = PAPER[name]
    module = importlib.import_module(script)
    # Each script's hook returns (model, batch of random data of the right shape).
    model, data = module.benchmark_setup(batch_size=batch, quick=quick, precision=precision,
                                         **config)
    batch = int(data.shape[0])
    step = tf.function(model.train_step, jit_compile=getattr(model, "jit_compile", None) or False,
                       reduce_retracing=True)
    concrete = step.get_concrete_function(data)
    flops = count_flops(concrete)
    for _ in range(warmup):
        logs = step(data)
        float(logs["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logs = step(data)
        float(logs["loss"])  # wait for the step to finish
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "model": name, "precision": precision, "batch": batch, "steps_timed": steps,
        "median_step_s": median, "min_step_s": min(times),
        "images_per_s": batch / median, "flops_per_step": flops,
        "gflops_per_s": flops / median / 1e9,
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss_finite": bool(np.isfinite(float(logs["loss"]))),
    }


def fail(message):
    """A one-line error naming the flag or path, exit 2, before anything is measured.
    (common.fail does the same, but importing common imports TensorFlow, which this parent
    process leaves to its subprocesses.)"""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_original_sources(src_dir, names):
    """Everything --original-src needs, checked before the long measurements start."""
    if not os.path.isdir(src_dir):
        fail(f"--original-src: {src_dir} is not a folder (git clone https://github.com/bojone/flow "
             f"and https://github.com/bojone/infomax, and put their scripts in one folder)")
    try:
        for name in names:
            prepared = original.prepare(src_dir, name)
            if prepared.batch_size != PAPER[name][2]:
                fail(f"--original-src: {prepared.path} trains with batch size {prepared.batch_size}, "
                     f"this bench's {name} with {PAPER[name][2]}")
        original.check_tf_keras()
    except original.SourceError as error:
        fail(str(error))


def run_json(cmd, what, env=None):
    """Runs a measuring subprocess; returns the JSON of its last line, or exits 1 with its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{what}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
        sys.exit(1)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_original(src_dir, name, kernels, steps, warmup):
    """The author's script for model `name`, in a fresh process with TensorFlow's default kernels
    (TF_ENABLE_ONEDNN_OPTS unset) or oneDNN (set to 1, as our scripts set it)."""
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if kernels == "onednn":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    cmd = [sys.executable, os.path.abspath(original.__file__), "--src", src_dir, "--model", name,
           "--steps", str(steps), "--warmup", str(warmup)]
    return run_json(cmd, f"{name}: the original ({kernels} kernels)", env)


def add_original(row, timings, quick):
    """The original's figures next to ours; returns False if its parameter count is not ours."""
    row["original"] = timings
    params = {result["trainable_params"] for result in timings.values()}
    row["original_trainable_params"] = params.pop() if len(params) == 1 else sorted(params)
    expected = original.TRAINABLE_PARAMS[row["model"]] if quick else row["trainable_params"]
    row["original_params_match"] = row["original_trainable_params"] == expected
    if not row["original_params_match"]:
        print(f"WARNING: {row['model']}: the original has {row['original_trainable_params']} trainable "
              f"parameters, {'the paper configuration' if quick else 'ours'} {expected}: not the same "
              f"model, the ratios compare different things", file=sys.stderr, flush=True)
    if not quick:  # in --quick ours is a tiny configuration: no ratio
        for kernels, result in timings.items():
            row[ORIGINAL_RATIO_KEY[kernels]] = row["images_per_s"] / result["images_per_s"]
    return row["original_params_match"]


def add_ratios(row, peak, quick=False, eigen_peak=None):
    row["share_of_peak"] = row["gflops_per_s"] / peak
    if (not quick and row["model"] in ORIGINAL_IMAGES_PER_S  # issue 5 did not time Glow
            and row.get("precision", "float32") == "float32"):  # the original ran in float32
        row["flops_vs_original"] = row["flops_per_step"] / ORIGINAL_FLOPS_PER_STEP[row["model"]]
        row["speedup_vs_original"] = ((row["images_per_s"] / peak)
                                      / (ORIGINAL_IMAGES_PER_S[row["model"]] / ORIGINAL_PEAK_GFLOPS))
        if eigen_peak:  # normalised as issue 5 measured its peak: TensorFlow's default kernels
            row["speedup_vs_original_eigen_peak"] = row["speedup_vs_original"] * peak / eigen_peak
    return row


def print_original_table(rows, kernels_timed, quick):
    """The headline when the original was timed: its images/s against ours, same machine, same run."""
    labels = [ORIGINAL_KERNELS_LABEL[kernels] for kernels in kernels_timed]
    header = (["model", "batch", "images/s (ours)"]
              + [f"original {what} ({label})" for label in labels for what in ("s/step", "images/s")]
              + ["trainable params (original)"] + [f"vs original ({label})" for label in labels])
    print("\nSame run, the author's scripts timed on this machine (vs original = our images/s over "
          "the original's):")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        times = [f"{r['original'][k]['median_step_s']:.3f} | {r['original'][k]['images_per_s']:.1f}"
                 for k in kernels_timed]
        reference = "the paper configuration's" if quick else "ours"
        params = f"{r['original_trainable_params']:,}" if isinstance(r["original_trainable_params"], int) \
            else str(r["original_trainable_params"])
        params += f" (= {reference})" if r["original_params_match"] else f" (MISMATCH: not {reference})"
        batches = {result["batch"] for result in r["original"].values()}
        batch = str(r["batch"]) if batches == {r["batch"]} else f"{r['batch']} (original {batches.pop()})"
        ratios = [f"{r[ORIGINAL_RATIO_KEY[k]]:.2f}x" if ORIGINAL_RATIO_KEY[k] in r else "n/a (--quick)"
                  for k in kernels_timed]
        print(f"| {r['model']} | {batch} | {r['images_per_s']:.1f} | " + " | ".join(times) + f" | {params} | "
              + " | ".join(ratios) + " |")
    print()
    for k in kernels_timed:
        setting = "TF_ENABLE_ONEDNN_OPTS unset" if k == "default" else "TF_ENABLE_ONEDNN_OPTS=1"
        onednn = {r["original"][k]["onednn_on"] for r in rows}
        print(f"original, {ORIGINAL_KERNELS_LABEL[k]}: {setting}, oneDNN "
              f"{'/'.join('on' if on else 'off' for on in sorted(onednn))} in TensorFlow")
    if quick:
        print(f"(--quick: ours is a tiny configuration, the original the paper's, {ORIGINAL_QUICK_MODEL} only)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PAPER), default=list(PAPER))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model")
    parser.add_argument("--quick", action="store_true", help="tiny configurations, 3 steps (CI smoke test)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "result.json"))
    parser.add_argument("--original-src", metavar="DIR",
                        help="also time the author's scripts in this run: DIR holds f-VAEs.py, "
                             "glow.py and flow_layers.py (github.com/bojone/flow), infomax_cifar10.py and "
                             "infomax_tiny_imagenet.py (github.com/bojone/infomax); needs "
                             "pip install tf_keras==2.21.0")
    parser.add_argument("--original-kernels", nargs="+", choices=ORIGINAL_KERNELS,
                        default=list(ORIGINAL_KERNELS),
                        help="time the original with TensorFlow's default kernels "
                             "(TF_ENABLE_ONEDNN_OPTS unset) and/or oneDNN (set to 1, as our scripts "
                             "run); default: both")
    parser.add_argument("--original-steps", type=int, metavar="N",
                        help="timed steps of the original (default: --steps; --quick: 1); the f-VAE "
                             "128x128 original can take over 10 s a step")
    parser.add_argument("--precision", nargs="+", default=["float32"],
                        choices=sorted(PRECISION_DTYPE),
                        help="time each model in each of these precisions (the scripts' "
                             "--precision), and measure each one's peak; default: float32")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peak-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--peak-kind", default="matmul", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 3)

    if args.peak:
        print(measure_peak(args.peak, dtype=args.peak_dtype, kind=args.peak_kind))
        return
    if args.worker:
        print(json.dumps(run_one(args.worker, steps, warmup, args.quick, args.worker_precision)))
        return
    precisions = list(dict.fromkeys(args.precision))

    original_models = []
    if args.original_src:
        if args.original_steps is not None and args.original_steps < 1:
            fail(f"--original-steps: {args.original_steps}, expected at least 1")
        original_models = [name for name in args.models if not args.quick or name == ORIGINAL_QUICK_MODEL]
        check_original_sources(args.original_src, original_models)
        if args.quick and not original_models:
            print(f"--quick times only the original of {ORIGINAL_QUICK_MODEL}, not among --models", flush=True)
    elif args.original_steps is not None:
        fail("--original-steps needs --original-src")
    original_kernels = list(dict.fromkeys(args.original_kernels))
    original_steps = args.original_steps or (1 if args.quick else steps)
    original_warmup = 1 if args.quick else warmup

    size = 512 if args.quick else 2048
    peak_kernels = measure_peaks(size, precisions)
    peak = precision_peak(peak_kernels, "float32")
    print(f"peaks, GFLOP/s: {json.dumps({k: round(v, 1) for k, v in peak_kernels.items()})}",
          flush=True)
    rows, params_match = [], True
    for name, precision in [(n, p) for n in args.models for p in precisions]:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(steps),
               "--warmup", str(warmup), "--worker-precision", precision] + (
                   ["--quick"] if args.quick else [])
        row = run_json(cmd, f"{name} ({precision})")
        rows.append(row)
        print(f"  {name} ({precision}): {row['median_step_s']:.3f} s/step", flush=True)
        if name in original_models and precision == precisions[0]:
            timings = {}
            for kernels in original_kernels:
                timings[kernels] = time_original(args.original_src, name, kernels, original_steps,
                                                 original_warmup)
                print(f"  {name}, original, {ORIGINAL_KERNELS_LABEL[kernels]}: "
                      f"{timings[kernels]['median_step_s']:.3f} s/step", flush=True)
            params_match = add_original(row, timings, args.quick) and params_match
    peak_kernels_end = measure_peaks(size, precisions)
    peak_end = precision_peak(peak_kernels_end, "float32")
    # The peak drifts during a run (frequency, neighbours); the higher reading is what the
    # machine can do, so shares of it are conservative.
    reference = max(peak, peak_end)
    for row in rows:
        own = max(precision_peak(peak_kernels, row["precision"]),
                  precision_peak(peak_kernels_end, row["precision"]))
        add_ratios(row, own, args.quick,
                   eigen_peak=max(peak_kernels["eigen"], peak_kernels_end["eigen"]))
        row["peak_gflops_own_precision"] = own
        float32 = [r for r in rows if r["model"] == row["model"] and r["precision"] == "float32"]
        if float32:
            row["vs_float32"] = row["images_per_s"] / float32[0]["images_per_s"]

    # With the original timed here, the issue's figures are no longer the only "original".
    issue_figures = "vs original, issue-5 figures" if original_models else "vs original"
    header = ["model", "precision", "batch", "median s", "min s", "images/s", "vs float32",
              f"FLOPs/step ({issue_figures})", "GFLOP/s", "share of its precision's peak",
              f"{issue_figures} (peak-normalised)", "same, Eigen peak", "peak RSS GB"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['median_step_s']:.3f} | "
              f"{r['min_step_s']:.3f} | {r['images_per_s']:.1f} | "
              f"{r.get('vs_float32', float('nan')):.2f}x | "
              f"{r['flops_per_step']:.3g} ({r.get('flops_vs_original', float('nan')):.2f}) | "
              f"{r['gflops_per_s']:.1f} | "
              f"{100 * r['share_of_peak']:.0f} % | {r.get('speedup_vs_original', float('nan')):.2f}x | "
              f"{r.get('speedup_vs_original_eigen_peak', float('nan')):.2f}x | "
              f"{r['peak_rss_gb']:.2f} |")
    print(f"\nfloat32 peak before: {peak:.1f} GFLOP/s, after: {peak_end:.1f} GFLOP/s; float32 "
          f"shares are of the higher, {reference:.1f}; other precisions' of their own highest "
          f"reading ({json.dumps({k: round(v, 1) for k, v in peak_kernels_end.items()})} after)")
    if original_models:
        print_original_table([row for row in rows if "original" in row], original_kernels, args.quick)
    result = {"peak_gflops_start": peak, "peak_gflops_end": peak_end, "peak_gflops_reference": reference,
              "peak_gflops_by_kernels": {"start": peak_kernels, "end": peak_kernels_end},
              "quick": args.quick, "precisions": precisions,
              "steps": steps, "warmup": warmup, "rows": rows}
    if args.original_src:
        result["original"] = {"src": os.path.abspath(args.original_src), "models": original_models,
                              "kernels": original_kernels, "steps": original_steps,
                              "warmup": original_warmup}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    if not params_match:
        print("error: the original's trainable parameters differ from ours (see the warning above)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
