"""What each change to the f-VAE's training step buys, each measured alone, in one run.

    python bench/levers.py --baseline-src OLD_CHECKOUT            # the 64x64 f-VAE, float32
    python bench/levers.py --baseline-src OLD --img-size 64 --rounds 2 --steps 5 --warmup 2

Variants, each in a fresh process (build the paper's model, trace its real training step,
warm up, time --steps steps on random data; the median is the step's time):
- `baseline`: the code in --baseline-src (a `git archive` of an earlier commit), as it is;
- `all`: this checkout;
- `all but LEVER`: this checkout with one change taken back, to see what it alone buys:
  - `live taps`: coupling kernels on 1x1 maps stored whole (3x3) again, so that their dead
    taps go through Adam, the finiteness check and every checkpoint (speedups.SameConv2D);
  - `permutation gradient`: the gradient of Permute's gather as TensorFlow derives it (a
    scatter), not a gather with the inverse permutation (layers/flow.py);
  - `space_to_depth`: Squeeze as reshape, transpose, reshape (layers/flow.py);
  - `eager build`: the model built by Keras' symbolic trace of its whole call, before the
    eager pass, as Keras does for a subclassed model (f_vaes.FVAE.build);
  - `shared Adam scalars`: Adam's bias corrections, learning rate and epsilon made again
    for every variable in the traced step (speedups.FusedAdam).
The variants run in turn, --rounds times (ABAB...), so that a drift of the machine's speed
touches all of them alike; each prints its median step, its peak resident memory and the
size of its weights and optimiser state (about a checkpoint's size), and its start-up: the
seconds from the process's start (before TensorFlow is imported) to the end of the first
training step, split into building the model and tracing the step with its first run. Name the CPU
beside the numbers (it prints /proc/cpuinfo's model name).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVERS = ("live taps", "permutation gradient", "space_to_depth", "eager build",
          "shared Adam scalars")


def take_back(lever):
    """Monkeypatch this checkout so that `lever` is as it was before."""
    import numpy as np
    from keras import ops
    import layers.flow
    import speedups
    if lever == "live taps":
        speedups.live_kernel_size = lambda kernel_size, map_size: tuple(kernel_size)
    elif lever == "permutation gradient":
        layers.flow._permute_channels = lambda x, perm, undo: ops.take(x, perm, axis=-1)
    elif lever == "space_to_depth":
        def squeeze(self, x):
            f, (h, w, c) = self.factor, x.shape[1:]
            x = ops.reshape(x, (-1, h // f, f, w // f, f, c))
            return ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, h // f, w // f, f * f * c))

        def unsqueeze(self, x):
            f, (h, w, c) = self.factor, x.shape[1:]
            x = ops.reshape(x, (-1, h, w, f, f, c // (f * f)))
            return ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, h * f, w * f, c // (f * f)))
        layers.flow.Squeeze._squeeze, layers.flow.Squeeze._unsqueeze = squeeze, unsqueeze
    elif lever == "eager build":
        import f_vaes
        del f_vaes.FVAE.build  # Keras' own: a symbolic trace of the call, then the eager pass
    elif lever == "shared Adam scalars":
        del speedups.FusedAdam._backend_update_step  # no cache: the scalars for every variable
    else:
        raise ValueError(f"unknown lever {lever!r}: one of {', '.join(LEVERS)}")
    del np


def time_variant(src, lever, img_size, steps, warmup, precision):
    """In this (child) process: the step time of the f-VAE built from `src`, `lever` taken back."""
    process_started = time.perf_counter()  # (the interpreter's own start-up, ~0.1 s, not counted)
    sys.path.insert(0, src)
    os.chdir(src)
    import tf_setup  # noqa: F401 (first: oneDNN on, as the scripts run)
    import numpy as np
    import tensorflow as tf
    if lever:
        take_back(lever)
    import f_vaes
    started = time.perf_counter()
    model, data = f_vaes.benchmark_setup(img_size=img_size, batch_size=32, precision=precision)
    build = time.perf_counter() - started
    step = tf.function(model.train_step, jit_compile=False, reduce_retracing=True)
    started = time.perf_counter()
    float(step(data)["loss"])
    first = time.perf_counter() - started
    start_up = time.perf_counter() - process_started
    for _ in range(warmup - 1):
        float(step(data)["loss"])
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        logs = step(data)
        float(logs["loss"])
        times.append(time.perf_counter() - started)
    variables = list(model.weights) + list(model.optimizer.variables)
    return {"median_step_s": statistics.median(times), "min_step_s": min(times),
            "first_step_s": first, "build_s": build, "start_up_s": start_up,
            "loss_finite": bool(np.isfinite(float(logs["loss"]))),
            "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            "state_gb": sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                            for v in variables) / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="an earlier checkout (git archive COMMIT | tar -x -C DIR) to time "
                             "beside this one")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS), choices=LEVERS,
                        help="which changes to take back one at a time (default: all)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "LEVER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        src, lever = args.child
        print(json.dumps(time_variant(src, lever or None, args.img_size, args.steps,
                                      max(args.warmup, 1), args.precision)))
        return 0
    if args.baseline_src and not os.path.isfile(os.path.join(args.baseline_src, "f_vaes.py")):
        print(f"error: --baseline-src {args.baseline_src}: no f_vaes.py there (expected a "
              "checkout of this project)", file=sys.stderr)
        return 2
    variants = ([("baseline", os.path.abspath(args.baseline_src), "")] if args.baseline_src
                else []) + [("all", ROOT, "")] + [(f"all but {lever}", ROOT, lever)
                                                   for lever in args.levers]
    print(f"{cpu_name()}, {os.cpu_count()} cores; f-VAE {args.img_size}x{args.img_size}, "
          f"batch 32, {args.precision}", flush=True)
    results = {name: [] for name, _, _ in variants}
    for round_ in range(args.rounds):
        for name, src, lever in variants:
            child = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", src, lever,
                 "--img-size", str(args.img_size), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--precision", args.precision],
                capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            if child.returncode:
                print(f"{name}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
                return 1
            result = json.loads(child.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"round {round_ + 1} {name:28s} {result['median_step_s']:.3f} s/step "
                  f"(start-up {result.get('start_up_s', float('nan')):.0f} s: build "
                  f"{result.get('build_s', float('nan')):.0f} s, trace and first step "
                  f"{result['first_step_s']:.0f} s), {result['trainable_params']:,} "
                  f"params, state {result['state_gb']:.2f} GB, peak RSS "
                  f"{result['peak_rss_gb']:.2f} GB", flush=True)
    reference = statistics.median(r["median_step_s"] for r in results["all"])
    print("\n| variant | s/step (median of rounds) | vs all | start-up s | build s | "
          "trace + first step s | params | state GB | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        step = statistics.median(r["median_step_s"] for r in runs)
        def median(key):
            return statistics.median(r.get(key, float("nan")) for r in runs)
        print(f"| {name} | {step:.3f} | {step / reference:.3f}x | {median('start_up_s'):.0f} "
              f"| {median('build_s'):.0f} | {median('first_step_s'):.0f} "
              f"| {runs[0]['trainable_params']:,} "
              f"| {runs[0]['state_gb']:.2f} | {max(r['peak_rss_gb'] for r in runs):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "img_size": args.img_size,
                       "precision": args.precision, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
