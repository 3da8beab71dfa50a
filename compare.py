"""The f-VAE paper's experiment: an f-VAE, a Glow and a VAE of similar size, trained on the
same faces with the same batch size and steps, compared at the same checkpoints.

    python compare.py --preset reduced      # about 90 minutes for all three on 2 CPU cores
                                            # shared with other training runs (2026-12-01)
    python compare.py --preset long         # the reduced models, 16,000 steps of the f-VAE
                                            # and the VAE, Glow for the f-VAE's wall time
    python compare.py --preset paper        # the paper's sizes, for a GPU
    python compare.py --preset long --report    # the outputs of what is trained so far
    python compare.py --preset calibrated   # the reduced f-VAE, learnt and calibrated t_x
    python compare.py --preset calibrated-vae    # the reduced VAE, the same

Each model is an ordinary run of its own script in `--out`/fvae, /glow and /vae (resumable;
the same command continues all three). The models take turns, an epoch each. In the long
preset Glow, whose step costs about 9 of the f-VAE's, has epochs of 125 steps and takes its
turn only while its training wall time is below the f-VAE's, so that it ends with the
f-VAE's wall time (at most one of its epochs past it) rather than its steps. After every
epoch each is evaluated on the same held-out images (bits/dim in the f-VAE's convention;
the VAEs with the importance-weighted bound of K posterior samples, Glow exactly) and the
results go to compare.json, compare.md (each model's trainable parameters, K, seconds per
step, steps, training seconds and last bits/dim; then bits/dim at equal steps and at equal
training wall time, for the VAEs also the bound at the decoder scale fitted on training
images), bits_per_dim.png (bits/dim against steps and against training wall time; solid
lines the f-VAE's and VAE's importance-weighted bounds with K posterior draws as trained,
or Glow's exact value, dashed the bounds at the fitted scale; the legend says which is
which) and samples.png (a block per model, samples at T = 0.8 and 1.0 from the same noise,
labelled with the step of the weights). compare.md and bits_per_dim.png are rewritten after
every scored epoch; samples.png when all are done, or with `--report`, which trains nothing.
The two VAEs' reconstructions of held-out faces are written into their run folders (real
faces never leave them). The presets but `paper` keep every checkpoint's weights
(`<model>/checkpoints/stepNNNNNN.weights.h5`); with `--quality-features ENCODER` each is
scored for sample quality after training, or with `--report` (quality.json, quality.md,
quality.png; docs/model.md, "Sample quality").

Sizes (trainable parameters as the author's models store them, each preset matched within
15 % of its f-VAE; counted here and in tests/test_compare.py; the f-VAE's couplings on 1x1
maps keep only their live taps, 37,748,736 fewer at 64x64 and 3,145,728 fewer at 32x32,
docs/model.md): the paper preset's f-VAE is the paper's (95,830,082); its Glow is
the author's widened to 1536 channels and deepened to 12 steps per level (98,985,732); its
VAE is the f-VAE's encoder and decoder with 122 residual steps per block instead of 12
(96,204,290), the only way to grow them without changing their shape. The reduced preset
(32x32): f-VAE 3 levels x 4 steps, width 128, 2 residual steps (8,814,338); Glow 3 x 8,
width 512 (9,417,660); VAE 11 residual steps (8,707,874).
"""

import dataclasses
import gc
import os
import shutil
import sys
import time

import tf_setup  # first: TensorFlow's environment (oneDNN), imported without start-up noise
import numpy as np
import keras

import common
import pictures
import cli
import f_vaes
import face_runs
import sample_quality
import speedups
import glow
from training import monitor
from training.precision import PRECISIONS

# the reduced models (32x32, about 9M trainable parameters each)
REDUCED_MODELS = {"fvae": ["--level", "3", "--depth", "4", "--res-steps", "2",
                           "--coupling-width", "128"],
                  "glow": ["--level", "3", "--depth", "8", "--coupling-width", "512"],
                  "vae": ["--level", "3", "--res-steps", "11", "--posterior", "gaussian"]}
PRESETS = {
    "paper": dict(img_size=64, batch_size=32, steps_per_epoch=1000, epochs=150, samples=64,
                  models={"fvae": [], "glow": ["--depth", "12", "--coupling-width", "1536"],
                          "vae": ["--res-steps", "122", "--posterior", "gaussian"]}),
    "reduced": dict(img_size=32, batch_size=32, steps_per_epoch=200, epochs=10, samples=16,
                    keep_checkpoints=True, models=REDUCED_MODELS),
    # the reduced models long enough for the decoder scale t_x to settle: the f-VAE and the VAE
    # 16,000 steps, Glow (about 9 f-VAE steps a step) for the f-VAE's training time
    "long": dict(img_size=32, batch_size=32, steps_per_epoch=1000, epochs=16, samples=16,
                 model_steps_per_epoch={"glow": 125}, wall_time_of={"glow": "fvae"},
                 keep_checkpoints=True, models=REDUCED_MODELS),
    # the decoder scale (docs/model.md): the reduced f-VAE with the author's learnt t_x and with
    # t_x calibrated to the batch's optimum, the same seed and steps; every checkpoint kept
    "calibrated": dict(img_size=32, batch_size=32, steps_per_epoch=2000, epochs=8, samples=16,
                       keep_checkpoints=True,
                       models={"fvae": REDUCED_MODELS["fvae"],
                               "fvae_calibrated": [*REDUCED_MODELS["fvae"],
                                                   "--decoder-scale", "calibrated"]}),
    "calibrated-vae": dict(img_size=32, batch_size=32, steps_per_epoch=2000, epochs=4, samples=16,
                           keep_checkpoints=True,
                           models={"vae": REDUCED_MODELS["vae"],
                                   "vae_calibrated": [*REDUCED_MODELS["vae"],
                                                      "--decoder-scale", "calibrated"]}),
    # a smoke test of every output (tests/test_compare.py), not an experiment
    "tiny": dict(img_size=16, batch_size=4, steps_per_epoch=2, epochs=2, samples=4,
                 models={"fvae": ["--level", "2", "--depth", "1", "--res-steps", "1",
                                  "--coupling-width", "8"],
                         "glow": ["--level", "2", "--depth", "1", "--coupling-width", "8"],
                         "vae": ["--level", "2", "--res-steps", "1", "--posterior", "gaussian"]}),
}
SCRIPTS = {"fvae": f_vaes, "glow": glow, "vae": f_vaes, "fvae_calibrated": f_vaes,
           "vae_calibrated": f_vaes}
MODELS = {name: glow.GLOW_RUNS if script is glow else f_vaes.FVAE_RUNS
          for name, script in SCRIPTS.items()}


def train_argv(preset, name, args):
    """The training command line of one model (without --epochs)."""
    return [*preset["models"][name], "--img-size", str(preset["img_size"]),
            "--batch-size", str(preset["batch_size"]),
            "--steps-per-epoch", str(model_steps_per_epoch(preset, name)),
            "--holdout", str(args.holdout),
            "--seed", str(args.seed), "--data-dir", args.data_dir,
            "--held-out-images", "0",  # scored by `evaluate` after each epoch, outside its time
            "--precision", args.precision, "--out", os.path.join(args.out, name)]


def run_script(script, argv):
    """One command of a model's script, in this process; its models are dropped afterwards
    (each command builds its own and reads its run from disk), so that a long comparison's
    many commands do not accumulate them."""
    try:
        code = script.main(argv)
    finally:
        keras.backend.clear_session()
        gc.collect()
    if code:
        raise common.TrainingStopped(f"{script.__name__}.py {' '.join(argv)} exited with {code}")


def model_steps_per_epoch(preset, name):
    """Steps between one model's checkpoints (the preset's, unless it names the model's own)."""
    return preset.get("model_steps_per_epoch", {}).get(name, preset["steps_per_epoch"])


def next_epoch(preset, rows, name):
    """The next epoch of model `name` to train, or None when it is done. A model trains to the
    preset's epochs, unless the preset matches it to another model's wall time
    (`wall_time_of`): then it trains while its training seconds are below the other's."""
    mine = [r for r in rows if r["model"] == name]
    epoch = max((r["epoch"] for r in mine), default=0) + 1
    reference = preset.get("wall_time_of", {}).get(name)
    if reference is None:
        return epoch if epoch <= preset["epochs"] else None
    seconds = max((r["seconds"] for r in mine), default=0.0)
    theirs = max((r["seconds"] for r in rows if r["model"] == reference), default=0.0)
    return epoch if seconds < theirs else None


def turns(preset, rows):
    """(model, epoch) to train next, in turn, one epoch of each model that has one to go,
    until none has; the caller appends each epoch's row to `rows` before the next. The turns
    go on from the model after the last one scored, so that a resumed comparison keeps the
    order of an uninterrupted one (an epoch cut short is the first to finish)."""
    names = list(preset["models"])
    start = names.index(rows[-1]["model"]) + 1 if rows else 0
    order = names[start:] + names[:start]
    trained = True
    while trained:
        trained = False
        for name in order:
            epoch = next_epoch(preset, rows, name)
            if epoch is not None:
                yield name, epoch
                trained = True


def compare(args):
    preset = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "compare.json")
    results = common.read_json(results_path) if os.path.exists(results_path) else {
        "preset": args.preset, "rows": []}
    if results.get("preset") != args.preset:
        raise common.UsageError(f"--out {args.out!r} holds a comparison of preset "
                                f"{results.get('preset')!r}, not {args.preset!r}: give another --out")
    if args.report and not results["rows"]:
        raise common.UsageError(f"--report: {results_path} has no scored epoch yet (run "
                                "without --report to train)")
    for name, epoch in [] if args.report else turns(preset, results["rows"]):
        results["rows"].append(train_and_score(preset, name, epoch, args, results, results_path))
        common.write_json(results_path, results)
        write_tables(args.out, results["rows"])  # progress: the tables and curves so far
    write_outputs(args.out, results, preset)
    if args.quality_features:
        score_quality(preset, args)
    for name in preset["models"]:
        if SCRIPTS[name] is f_vaes:
            run_script(f_vaes, ["reconstruct", "--out", os.path.join(args.out, name),
                                "--weights", "latest", "--rows", "4", "--cols", "6"])
    return results


def train_and_score(preset, name, epoch, args, results, results_path):
    """Train model `name` to the end of `epoch` (resuming its run) and score it on the
    held-out faces; its row of compare.json. The training seconds include the epoch's
    start-up (building the model, reading the saved run), which each model pays once per
    epoch. They are kept in compare.json as they accrue, so that an interrupted epoch's
    time counts when it is resumed, and a trained but unscored epoch is not trained again."""
    script, steps = SCRIPTS[name], model_steps_per_epoch(preset, name)
    key, timing = f"{name}:{epoch}", results.setdefault("training_seconds", {})
    if key not in results.setdefault("trained", []):
        if preset.get("wall_time_of", {}).get(name):
            print(f"--- {name}: epoch {epoch} (while its training time is below "
                  f"{preset['wall_time_of'][name]}'s)", flush=True)
        else:
            print(f"--- {name}: epoch {epoch} of {preset['epochs']}", flush=True)
        started = time.time()
        try:
            run_script(script, [*train_argv(preset, name, args), "--epochs", str(epoch)])
            results["trained"].append(key)
        finally:
            timing[key] = timing.get(key, 0.0) + time.time() - started
            common.write_json(results_path, results)
    seconds = timing[key]
    samples = 1 if name == "glow" else preset["samples"]  # Glow's likelihood is exact
    run_dir = os.path.join(args.out, name)
    run_script(script, ["evaluate", "--out", run_dir, "--weights", "latest",
                        "--samples", str(samples), "--seed", "0"])
    evaluated = common.read_json(os.path.join(run_dir, "evaluate.json"))
    if preset.get("keep_checkpoints"):  # for measures computed later (sample quality)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        shutil.copyfile(os.path.join(run_dir, "latest.weights.h5"), os.path.join(
            run_dir, "checkpoints", f"step{epoch * steps:06d}.weights.h5"))
    before = [r["seconds"] for r in results["rows"]
              if r["model"] == name and r["epoch"] == epoch - 1 and "seconds" in r]
    return {"model": name, "epoch": epoch, "steps": epoch * steps,
            "seconds_per_step": seconds / steps,
            "seconds": (before[0] if before else 0.0) + seconds,  # training wall time so far
            "bits_per_dim": evaluated["bits_per_dim"], "samples": samples,
            "bits_per_dim_fitted_t_x": evaluated.get("bits_per_dim_fitted_t_x"),
            "held_out_images": evaluated["images"],
            "trainable_parameters": next(
                (r["trainable_parameters"] for r in results["rows"] if r["model"] == name), None)
            or trainable_parameters(MODELS[name], run_dir)}


def trainable_parameters(face_model, run_dir):
    """Counted on a model built from the run's config.json (once per model: later rows copy it),
    as the author's model stores them: with the kernel taps on 1x1 maps that never touch data
    (`speedups.dead_taps`), the size the presets are matched by."""
    config = cli.config_from_json(face_model.config_class, common.read_json(
        os.path.join(run_dir, "config.json")))
    config = dataclasses.replace(config, jit_compile=False)
    model = face_model.build(config)
    count = monitor.count_parameters(model.trainable_weights) + speedups.dead_taps(model)
    keras.backend.clear_session()
    gc.collect()
    return count


NAMES = {"fvae": "f-VAE", "glow": "Glow", "vae": "VAE", "fvae_calibrated": "f-VAE, calibrated t_x",
         "vae_calibrated": "VAE, calibrated t_x"}


def line_label(name, samples, fitted=False):
    """What a line of bits_per_dim.png is: Glow's exact bits/dim, or a VAE's
    importance-weighted bound with K posterior draws (an upper bound on its bits/dim)."""
    if name == "glow":
        return "Glow: exact"
    return (f"{NAMES[name]}: bound, importance-weighted, K = {samples}"
            + (", at the fitted t_x" if fitted else ""))


def plot_bits_per_dim(rows, models):
    """The figure of bits_per_dim.png: held-out bits/dim of each of `models` against training
    steps and against training wall time, each line labelled bound or exact."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure, axes = pyplot.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, x_key, label in ((axes[0], "steps", "training steps"),
                               (axes[1], "seconds", "training wall time, seconds")):
        for name in models:
            mine = sorted((r[x_key], r["bits_per_dim"], r.get("bits_per_dim_fitted_t_x"),
                           r["samples"]) for r in rows if r["model"] == name and x_key in r)
            if not mine:
                continue
            xs, samples = [m[0] for m in mine], mine[-1][3]
            line, = axis.plot(xs, [m[1] for m in mine], marker="o",
                              label=line_label(name, samples))
            fitted = [(x, m[2]) for x, m in zip(xs, mine) if m[2] is not None]
            if fitted:
                axis.plot(*zip(*fitted), linestyle="--", color=line.get_color(),
                          label=line_label(name, samples, fitted=True))
        axis.set_xlabel(label)
    axes[0].set_ylabel("held-out bits/dim")
    figure.suptitle("bound: the importance-weighted bound with K posterior draws, in expectation "
                    "at or above the model's exact bits/dim; exact: Glow's likelihood of the "
                    "dequantised images", fontsize=8)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    return figure


def cell(row):
    """One checkpoint in a table: bits/dim, and for the VAEs the bound at the fitted t_x."""
    if row is None:
        return ""
    fitted = row.get("bits_per_dim_fitted_t_x")
    return f"{row['bits_per_dim']:.3f}" + ("" if fitted is None else f" ({fitted:.3f})")


def tables(rows, models):
    """compare.md: the models, their bits/dim at equal steps and at equal training wall time."""
    by_model = {name: sorted((r for r in rows if r["model"] == name), key=lambda r: r["steps"])
                for name in models}
    by_model = {name: mine for name, mine in by_model.items() if mine}
    names = list(by_model)
    lines = ["## The models", "",
             "| model | trainable parameters | K | s/step (median) | steps | training s | "
             "bits/dim | at the fitted t_x |", "|---" * 8 + "|"]
    for name, mine in by_model.items():
        last = mine[-1]
        fitted = last.get("bits_per_dim_fitted_t_x")
        seconds = np.median([r["seconds_per_step"] for r in mine])
        lines.append(f"| {name} | {last['trainable_parameters']:,} | {last['samples']} | "
                     f"{seconds:.3f} | {last['steps']} | {last.get('seconds', float('nan')):.0f} | "
                     f"{last['bits_per_dim']:.3f} | {'' if fitted is None else f'{fitted:.3f}'} |")
    lines += ["", "## At equal steps", "",
              "Held-out bits/dim after the same number of training steps (in brackets: the "
              "bound at the decoder scale t_x fitted on training images).", "",
              "| steps | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for steps in sorted({r["steps"] for mine in by_model.values() for r in mine}):
        found = {name: next((r for r in mine if r["steps"] == steps), None)
                 for name, mine in by_model.items()}
        lines.append(f"| {steps} | " + " | ".join(cell(found[n]) for n in names) + " |")
    timed = {name: [r for r in mine if "seconds" in r] for name, mine in by_model.items()}
    if names and timed[names[0]]:
        lines += ["", "## At equal wall time", "",
                  f"At each of {names[0]}'s checkpoints, every model's checkpoint nearest to it "
                  "in training seconds (the earlier of two as near): bits/dim (fitted t_x), "
                  "steps, training seconds.",
                  "", "| training s | " + " | ".join(names) + " |",
                  "|---" * (1 + len(names)) + "|"]
        for moment in (r["seconds"] for r in timed[names[0]]):
            cells = []
            for name in names:
                near = min(timed[name], key=lambda r: (abs(r["seconds"] - moment), r["seconds"]),
                           default=None)
                cells.append(f"{cell(near)}, {near['steps']} steps, {near['seconds']:.0f} s"
                             if near else "")
            lines.append(f"| {moment:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out, rows):
    """compare.md (the tables) and bits_per_dim.png (the curves) of the scored epochs `rows`;
    the tables' text."""
    models = [name for name in SCRIPTS if any(r["model"] == name for r in rows)]
    text = tables(rows, models)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    figure = plot_bits_per_dim(rows, models)
    figure.savefig(os.path.join(out, "bits_per_dim.png"), dpi=100)
    from matplotlib import pyplot  # imported by plot_bits_per_dim
    pyplot.close(figure)
    return text


def write_outputs(out, results, preset):
    """compare.md, bits_per_dim.png and samples.png (the pictures, each block labelled with
    the step of the model's latest weights: after an interruption they may be past its last
    scored epoch)."""
    rows = results["rows"]
    epochs = sorted({r["epoch"] for r in rows})
    print(write_tables(out, rows))
    blocks = []
    for name in preset["models"]:
        face_model, run_dir = MODELS[name], os.path.join(out, name)
        if not os.path.exists(os.path.join(run_dir, "latest.weights.h5")):
            continue
        _, model = face_runs.load_run(face_model, run_dir, "latest")
        step = int(model.optimizer.iterations.numpy())  # the weights' own count
        samples = [face_runs.sample_images(model, 8, t, seed=0) for t in (0.8, 1.0)]
        grid = pictures.image_grid(np.concatenate(samples), 2, 8)
        label = f"{name}, step {step:,}: T = 0.8 (top), 1.0 (bottom)"  # the same noise for all
        strip = pictures.label_strip(grid.shape[1], 24, [(label, 0)])
        blocks.append(np.concatenate([strip, grid]))
    if blocks:
        pictures.write_png(os.path.join(out, "samples.png"), np.concatenate(blocks))
        monitor.log_picture(out, "samples", np.concatenate(blocks), len(epochs))


# =========================================================================== sample quality

def checkpoints(preset, out):
    """(model, step, weights file) of every checkpoint the preset kept, else of each model's
    latest weights (step: the weights' own count)."""
    found = []
    for name in preset["models"]:
        folder = os.path.join(out, name, "checkpoints")
        if os.path.isdir(folder):
            found += [(name, int(f[4:10]), os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                      if f.startswith("step") and f.endswith(".weights.h5")]
        elif os.path.exists(os.path.join(out, name, "latest.weights.h5")):
            found.append((name, None, os.path.join(out, name, "latest.weights.h5")))
    return found


def score_quality(preset, args):
    """quality.json, quality.md and quality.png: every checkpoint's samples at T = 1.0 and 0.8
    scored against the held-out faces (`face_runs.quality_scores`: sharpness, and in the
    features of --quality-features the Frechet distance and k-NN precision and recall), with
    the training faces' scores (the floor); kept in their own file, so that scoring can run
    beside the training that writes compare.json."""
    from training.checkpoint import load_weights
    path = os.path.join(args.out, "quality.json")
    scored = common.read_json(path) if os.path.exists(path) else {
        "features": args.quality_features, "samples": args.quality_samples, "rows": []}
    if (scored["features"], scored["samples"]) != (args.quality_features, args.quality_samples):
        raise common.UsageError(f"{path} holds scores with --quality-features "
                                f"{scored['features']!r} and --quality-samples {scored['samples']}: "
                                "give the same, or remove the file")
    features, real_faces = None, {}  # the held-out and training faces, encoded once
    for name, step, weights in checkpoints(preset, args.out):
        if any(r["model"] == name and r["file"] == weights for r in scored["rows"]):
            continue
        config, model = face_runs.load_run(MODELS[name], os.path.join(args.out, name), "latest")
        load_weights(model, weights)
        features = features or face_runs.infomax_features(args.quality_features, config.img_size)
        step = int(model.optimizer.iterations.numpy()) if step is None else step
        print(f"--- sample quality: {name} at step {step}", flush=True)
        quality = face_runs.quality_scores(model, config, features, args.quality_samples,
                                           seed=args.seed, real_faces=real_faces)
        scored["rows"].append({"model": name, "steps": step, "file": weights, **quality})
        common.write_json(path, scored)
        keras.backend.clear_session()
        gc.collect()
    write_quality_outputs(args.out, scored)
    return scored


QUALITY_MEASURES = sample_quality.MEASURES


def quality_table(scored):
    """quality.md: per model and step, each measure at T = 1.0 and 0.8; the floor first."""
    rows = sorted(scored["rows"], key=lambda r: (list(SCRIPTS).index(r["model"]), r["steps"]))
    sets = [k for k in rows[0] if k.startswith("T")] if rows else []
    header = "| model | steps | " + " | ".join(f"{m} {t}" for t in sets for m in QUALITY_MEASURES)
    lines = [f"Samples: {scored['samples']} per temperature, against the "
             f"{rows[0]['reference_images'] if rows else 0} held-out faces; features: "
             f"{scored['features']}. The floor: as many training faces, scored the same way.", "",
             header + " |", "|---" * (2 + len(sets) * len(QUALITY_MEASURES)) + "|"]
    if rows:
        floor = rows[0]["training faces"]
        lines.append("| training faces (floor) | | " + " | ".join(
            f"{floor.get(m, float('nan')):.3f}" for _ in sets for m in QUALITY_MEASURES) + " |")
    for r in rows:
        lines.append(f"| {NAMES[r['model']]} | {r['steps']} | " + " | ".join(
            f"{r[t].get(m, float('nan')):.3f}" for t in sets for m in QUALITY_MEASURES) + " |")
    return "\n".join(lines) + "\n"


def plot_quality(scored, seconds=None):
    """quality.png: each measure against steps (top) and, where `seconds` gives each
    checkpoint's training seconds ({(model, steps): s}, from compare.json), against them
    (bottom): a line per model and temperature, the floor dotted."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    seconds = seconds or {}
    models = [m for m in SCRIPTS if any(r["model"] == m for r in scored["rows"])]
    timed = any((r["model"], r["steps"]) in seconds for r in scored["rows"])
    figure, axes = pyplot.subplots(2 if timed else 1, len(QUALITY_MEASURES),
                                   figsize=(14, 6.8 if timed else 3.4), squeeze=False)
    floor = scored["rows"][0]["training faces"] if scored["rows"] else {}
    for row, (x_of, label) in enumerate([(lambda r: r["steps"], "training steps"),
                                         (lambda r: seconds.get((r["model"], r["steps"])),
                                          "training seconds")][:len(axes)]):
        for axis, measure in zip(axes[row], QUALITY_MEASURES):
            for name in models:
                mine = sorted((r for r in scored["rows"] if r["model"] == name
                               and x_of(r) is not None), key=lambda r: r["steps"])
                for t, style in (("T1.0", "-"), ("T0.8", "--")):
                    values = [r[t].get(measure) for r in mine]
                    if any(v is not None for v in values):
                        axis.plot([x_of(r) for r in mine], values, style, marker="o",
                                  label=f"{NAMES[name]}, {t.replace('T', 'T = ')}")
            if floor.get(measure) is not None:
                axis.axhline(floor[measure], color="grey", linestyle=":",
                             label="training faces (floor)")
            axis.set_title(measure.replace("_", " "), fontsize=9)
            axis.set_xlabel(label)
    axes[0][-1].legend(fontsize=6)
    figure.tight_layout()
    return figure


def training_seconds(out):
    """{(model, steps): training seconds} of compare.json's checkpoints in `out` ({} without)."""
    path = os.path.join(out, "compare.json")
    if not os.path.exists(path):
        return {}
    return {(r["model"], r["steps"]): r["seconds"] for r in common.read_json(path)["rows"]}


def write_quality_outputs(out, scored):
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(quality_table(scored))
    figure = plot_quality(scored, training_seconds(out))
    figure.savefig(os.path.join(out, "quality.png"), dpi=100)
    from matplotlib import pyplot
    pyplot.close(figure)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=cli.DefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reduced",
                        help="reduced: 32x32, 2,000 steps, about 90 minutes on 2 shared CPU cores; "
                             "long: the reduced models, 16,000 steps, Glow for the f-VAE's "
                             "wall time; paper: the paper's sizes (a GPU); calibrated, "
                             "calibrated-vae: the reduced f-VAE (16,000 steps) or VAE (8,000) "
                             "with learnt and with calibrated t_x; tiny: a smoke test")
    parser.add_argument("--data-dir", default=None,
                        help="the faces (default: data/celeba_64x64, as tools/prepare_faces.py "
                             "writes it)")
    parser.add_argument("--out", default=None, help="default: runs/compare-<preset>")
    parser.add_argument("--holdout", type=int, default=500,
                        help="the last N files of the sorted folder, the same for every model")
    parser.add_argument("--seed", type=int, default=0, help="the same for every model")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="each script's --precision (the same for every model)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write compare.md, bits_per_dim.png, samples.png and "
                             "the reconstructions from what --out holds (e.g. after Ctrl-C)")
    parser.add_argument("--quality-features", default=None, metavar="ENCODER",
                        help="after training (or with --report): score every kept checkpoint's "
                             "samples in the features of this Deep InfoMax encoder (a run "
                             "folder of infomax.py --dataset folder on the training faces): "
                             "quality.json, quality.md, quality.png")
    parser.add_argument("--quality-samples", type=int, default=2000, metavar="N",
                        help="samples per temperature (and training faces) of --quality-features")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("runs", f"compare-{args.preset}")
    if not args.data_dir:
        args.data_dir = os.path.relpath(face_runs.DEFAULT_DATA[64])
        if not os.path.isdir(args.data_dir):
            raise common.UsageError(face_runs.missing_faces(args.data_dir, 64))
    cli.check_at_least(args, 1, "holdout")
    cli.check_at_least(args, 10, "quality_samples")
    if not os.path.isdir(args.data_dir):
        raise common.UsageError(f"--data-dir {args.data_dir!r}: no such folder (a folder of "
                                "PNG/JPEG faces)")
    return args


def main(argv=None):
    return common.run_main(lambda: compare(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
