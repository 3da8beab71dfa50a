"""Where one f-VAE training step spends its time, by op type, in float32 and in a lower
precision: TensorFlow's profiler traces a few steps of the real training step (the model and
batch that bench/bench.py times), each op's time is read from the trace and added up by kind
(convolutions and their two gradients, batch norm and its gradient, casts, element-wise ops,
the Adam update, ...), per step.

    python bench/op_profile.py --img-size 64 --precision float32 mixed_bfloat16
    python bench/op_profile.py --inter-op 1 --parts     # one op at a time; by part of the model
    python bench/op_profile.py --precision mixed_bfloat16 mixed_bfloat16 \
        --float32-batch-norm-below 16                    # what if: a cheaper batch norm

Each precision runs in a fresh process (as in bench.py): build, warm up, time --steps steps
(the median is the step's wall time), then trace --steps more. An op's time is the span of
its kernel on the executor's thread. By default TensorFlow runs independent ops side by side
(two inter-op threads here), and each one's span then includes the time it waits for the
cores the other holds: the ops' sum exceeds the wall time, and "share" is of that sum.
`--inter-op 1` runs one op at a time: each span is the op's own and the ops add up to the
step, which is then slower than the real one. Time between ops (the executor, Python) is in
no row. `--top N` also lists the N costliest op types as TensorFlow names them
(`_MklNative...` is oneDNN's kernel); `--json` keeps where in the model each type's time is.
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An op's event in the trace is named "its/name/scope:OpType".
OP_EVENT = re.compile(r"^([^:\s]+):(\w+)$")
# Ops that only call other ops (whose own events are in the trace too): not added up.
CALLERS = {"PartitionedCall", "StatefulPartitionedCall", "While", "If", "StatelessIf",
           "StatelessWhile", "Case"}
ELEMENTWISE = {
    "Add", "AddV2", "AddN", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Neg", "Square",
    "SquaredDifference", "Sqrt", "SqrtGrad", "Rsqrt", "RsqrtGrad", "Exp", "Log", "Log1p", "Tanh",
    "TanhGrad", "Relu", "ReluGrad", "LeakyRelu", "LeakyReluGrad", "Sigmoid", "SigmoidGrad",
    "Softplus", "SoftplusGrad", "Maximum", "Minimum", "Select", "SelectV2", "Greater",
    "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr",
    "LogicalNot", "Abs", "Sign", "Pow", "Floor", "Reciprocal", "ReciprocalGrad",
    "BiasAdd", "FusedMulAdd", "FusedMulAdd2", "FusedMulSub", "FusedMulSubRev", "Erf", "Cos",
    "Sin", "ClipByValue", "ZerosLike", "OnesLike", "Fill", "BroadcastTo", "Tile"}
REDUCTIONS = {"Sum", "Mean", "Max", "Min", "Prod", "Any", "ArgMax", "ArgMin",
              "BiasAddGrad", "L2Loss"}
DATA_MOVEMENT = {
    "Transpose", "Reshape", "ConcatV2", "Concat", "Slice", "StridedSlice", "StridedSliceGrad",
    "Pad", "PadV2", "MirrorPad", "Pack", "Unpack",
    "Split", "SplitV", "SpaceToDepth", "DepthToSpace", "Identity", "IdentityN", "Squeeze",
    "ExpandDims", "Shape", "ShapeN", "Reverse", "ReverseV2", "InvertPermutation", "Range",
    "Const", "Switch", "Merge", "_Retval", "_Arg", "NoOp", "TensorScatterUpdate",
    "ScatterNd", "OneHot"}
VARIABLES = {"ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
             "AssignSubVariableOp", "VarHandleOp", "VarIsInitializedOp"}


def op_kind(name, op_type):
    """The row of the table an op of `op_type` named `name` is added to."""
    base = re.sub(r"^_(MklNative|Mkl|Fused)", "", op_type)
    if "Conv2DBackpropFilter" in base:
        return "Conv2D, gradient of the kernel"
    if "Conv2DBackpropInput" in base:
        return "Conv2D, gradient of the input"
    if "Conv2D" in base:
        return "Conv2D (forward, with fused bias/activation)"
    if "MatMul" in base or base == "Einsum":
        return "MatMul"
    if "FusedBatchNorm" in base:
        return "batch norm, gradient" if "Grad" in base else "batch norm (forward)"
    if base == "Cast":
        return "Cast, backward" if "gradient_tape" in name else "Cast, forward"
    if base in ("GatherV2", "UnsortedSegmentSum"):
        return "gather and its gradient (GatherV2, UnsortedSegmentSum)"
    if base in ("IsFinite", "All"):
        return "finiteness check of the gradients (IsFinite, All)"
    if "ApplyAdam" in base:
        return "Adam (fused kernel, float32)"
    if base in REDUCTIONS:
        return "reductions (sums, means, bias gradients)"
    if base in ELEMENTWISE:
        return "element-wise (add, mul, ReLU, tanh, exp, ...)"
    if base in DATA_MOVEMENT:
        return "data movement (transpose, concat, slice, pad)"
    if base in VARIABLES:
        return "variable reads and writes"
    return "other"


def part_of(name):
    """Where in the model an op named `name` is: a block of the encoder or decoder, a level of
    the flow, or the rest (the loss, the finiteness check, Adam)."""
    match = re.match(r"(?:gradient_tape/)?(encoder|decoder)_\d+/block(\d)", name)
    if match:
        return f"{match.group(1)} block {match.group(2)}"
    match = re.match(r"(?:gradient_tape/)?flow_\d+/level(\d)", name)
    return f"flow level {match.group(1)}" if match else "the rest (loss, check, Adam)"


def batch_norm_in_float32_below(channels):
    """What if: under a mixed policy, `speedups.BatchNormalization` casts a batch of fewer than
    `channels` channels to float32 before its kernel and the output back (not what the
    scripts do)."""
    import tensorflow as tf
    import speedups
    fused_call = speedups.BatchNormalization.call

    def call(self, inputs, training=None, mask=None):
        if inputs.dtype != tf.float32 and inputs.shape[-1] < channels:
            return tf.cast(fused_call(self, tf.cast(inputs, tf.float32), training, mask),
                           inputs.dtype)
        return fused_call(self, inputs, training, mask)

    speedups.BatchNormalization.call = call


def profile(img_size, batch_size, precision, steps, warmup, quick=False, inter_op=0,
            float32_batch_norm_below=0):
    """Runs in a subprocess: the step's median wall time, then each op type's time per traced
    step (microseconds) and count, keyed by (op type, kind), and by part of the model."""
    sys.path.insert(0, ROOT)
    import tf_setup  # noqa: F401 (first: oneDNN on, as the scripts run)
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    import f_vaes

    tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if float32_batch_norm_below:
        batch_norm_in_float32_below(float32_batch_norm_below)

    model, data = f_vaes.benchmark_setup(img_size=img_size, batch_size=batch_size,
                                         quick=quick, precision=precision)
    step = tf.function(model.train_step, jit_compile=False, reduce_retracing=True)
    for _ in range(warmup):
        float(step(data)["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(data)["loss"])
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(steps):
            float(step(data)["loss"])
        traced = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0],
                  "rb") as f:
            space.ParseFromString(f.read())
    ops = collections.defaultdict(lambda: [0.0, 0])
    names = collections.defaultdict(collections.Counter)  # the JSON's: where each type's time is
    parts = collections.defaultdict(collections.Counter)
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                match = OP_EVENT.match(plane.event_metadata[event.metadata_id].name)
                if not match or match.group(2) in CALLERS:
                    continue
                name, op_type = match.groups()
                us = event.duration_ps / 1e6 / steps
                row = ops[f"{op_type}|{op_kind(name, op_type)}"]
                row[0] += us
                row[1] += 1 / steps
                names[op_type][re.sub(r"_\d+", "_N", name)] += us
                parts[part_of(name)][op_kind(name, op_type)] += us
    return {"precision": precision, "step_s": statistics.median(times), "traced_step_s": traced,
            "ops": {key: {"us": us, "count": count} for key, (us, count) in ops.items()},
            "names": {op_type: dict(where.most_common(10)) for op_type, where in names.items()},
            "parts": {part: dict(kinds) for part, kinds in parts.items()}}


def by_kind(result):
    kinds = collections.Counter()
    for key, op in result["ops"].items():
        kinds[key.split("|")[1]] += op["us"]
    return kinds


def by_type(result):
    types = collections.Counter()
    for key, op in result["ops"].items():
        types[key.split("|")[0]] += op["us"]
    return types


def by_part(result):
    return collections.Counter({part: sum(kinds.values())
                                for part, kinds in result["parts"].items()})


def print_table(title, rows, results, first, other):
    """One markdown table: each row's ms per step in both precisions, their ratio, and its
    share of the sum of all ops in each."""
    totals = {p: sum(op["us"] for op in results[p]["ops"].values()) for p in results}
    names = sorted(set(rows[first]) | set(rows[other]), key=lambda k: -rows[first].get(k, 0))
    print(f"\n| {title} | {first} ms | {other} ms | {first} / {other} | share of {first}'s ops "
          f"| share of {other}'s ops |\n| --- | --- | --- | --- | --- | --- |")
    for name in names:
        a, b = rows[first].get(name, 0) / 1e3, rows[other].get(name, 0) / 1e3
        ratio = f"{a / b:.2f}x" if b else "-"
        print(f"| {name} | {a:.1f} | {b:.1f} | {ratio} | {100 * a * 1e3 / totals[first]:.1f} % "
              f"| {100 * b * 1e3 / totals[other]:.1f} % |")
    a, b = totals[first] / 1e3, totals[other] / 1e3
    print(f"| all ops{' (listed or not)' if len(names) < len(results[first]['ops']) else ''} "
          f"| {a:.1f} | {b:.1f} | {a / b:.2f}x | 100 % | 100 % |")
    walls = [results[p]["step_s"] * 1e3 for p in (first, other)]
    traced = [results[p]["traced_step_s"] * 1e3 for p in (first, other)]
    print(f"| the step's wall time (traced) | {walls[0]:.1f} ({traced[0]:.1f}) | {walls[1]:.1f} "
          f"({traced[1]:.1f}) | {walls[0] / walls[1]:.2f}x | | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", nargs=2, default=["float32", "mixed_bfloat16"],
                        metavar=("FIRST", "OTHER"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps, then traced steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=20, metavar="N",
                        help="also list the N costliest op types (0: none)")
    parser.add_argument("--inter-op", type=int, default=0, metavar="N",
                        help="ops TensorFlow runs side by side (0: its default; 1: one at a "
                             "time, so that each op's span is its own and the ops add up to "
                             "the step)")
    parser.add_argument("--parts", action="store_true",
                        help="also add the ops up by part of the model (encoder and decoder "
                             "blocks, flow levels, the rest)")
    parser.add_argument("--float32-batch-norm-below", type=int, default=0, metavar="C",
                        help="what if, in OTHER's run: under a mixed policy, batch norms of "
                             "fewer than C channels cast their batch to float32 and back (not "
                             "what the scripts do; 0: off), e.g. with --precision "
                             "mixed_bfloat16 mixed_bfloat16")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model (bench.py's --quick): a smoke test")
    parser.add_argument("--json", default=None,
                        help="also write the numbers here, with the ten costliest op names "
                             "(numbers as _N) of each op type")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(profile(args.img_size, args.batch_size, args.worker, args.steps,
                                 args.warmup, args.quick, args.inter_op,
                                 args.float32_batch_norm_below)))
        return
    first, other = args.precision[0], args.precision[1]
    if args.float32_batch_norm_below:
        other = f"{other}, batch norm < {args.float32_batch_norm_below} channels in float32"
    results = {}
    for label, precision, below in ((first, args.precision[0], 0),
                                    (other, args.precision[1], args.float32_batch_norm_below)):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", precision,
                              "--img-size", str(args.img_size), "--batch-size",
                              str(args.batch_size), "--steps", str(args.steps), "--warmup",
                              str(args.warmup), "--inter-op", str(args.inter_op),
                              "--float32-batch-norm-below", str(below),
                              *(["--quick"] if args.quick else [])],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{label}: failed\n{out.stderr[-3000:]}")
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"f-VAE {args.img_size}x{args.img_size}{' (--quick: tiny)' if args.quick else ''}, "
          f"batch {args.batch_size}: ms per training step by kind of op (mean of {args.steps} "
          f"traced steps{', one op at a time' if args.inter_op == 1 else ''})")
    print_table("kind of op", {p: by_kind(r) for p, r in results.items()}, results, first, other)
    if args.parts:
        print_table("part of the model", {p: by_part(r) for p, r in results.items()}, results,
                    first, other)
    if args.top:
        types = {p: by_type(r) for p, r in results.items()}
        top = {name for p in types for name, _ in types[p].most_common(args.top)}
        print_table("op type", {p: {k: v for k, v in types[p].items() if k in top}
                                for p in types}, results, first, other)
        print("(shares of all ops; the op types not listed make up the rest)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
