"""What an f-VAE run and a Glow run share: images as pixels in [-1, 1] and bits/dim, training
on a folder of faces with sample grids after every epoch, the commands on a trained run
(sample, sweep, reconstruct, interpolate, evaluate, encode, export) and the command line
that offers them.

Each script describes its model once, as a `FaceModel` (its name, config class, checks,
builder, commands, sample temperatures, extra monitors and docstring), and hands that to
`main`, `train`, `load_run` and `benchmark_setup`. The model itself needs `loss_parts(x)`,
`LOG_NAMES`, `latent(x)`, `generate(z)`, `latent_dims` and `img_size` (f_vaes.FVAE and
glow.Glow have them); `reconstruct`, `encode` and `bits_per_dim` where its commands use them,
and `posterior_latent(x, seed)` where it has a posterior to draw from (the f-VAE; for
`interpolate --image-latent draw`, refused without it).

Bits/dim (see f_vaes.py's docstring): `evaluate` scores held-out images dequantised as
y = (x_int + U(0, 1)) / 256 * 2 - 1 and reports (nll + D*log(128)) / (D*ln 2).
"""

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from typing import Callable

import tf_setup  # first: TensorFlow's environment (oneDNN), imported without start-up noise
import numpy as np
import tensorflow as tf
import keras
from keras import ops

import cli
import common
import datasets
import image_files
import pictures
import sample_quality
from cli import option
from common import UsageError
from speedups import FusedAdam
from training import monitor
from training.checkpoint import first_line, load_weights, seed_generators
from training.precision import wrap_optimizer
from training.run import RunSettings, fit_run, prepare_run

HERE = os.path.dirname(os.path.abspath(__file__))
# the faces `tools/prepare_faces.py` writes into the clone (docs/data.md)
DEFAULT_DATA = {64: os.path.join(HERE, "data", "celeba_64x64"),
                128: os.path.join(HERE, "data", "celeba_128x128")}


@dataclasses.dataclass
class FaceRunSettings(RunSettings):
    """The schedule and data of the author's face scripts (f-VAEs.py, and glow.py's Config)."""
    data_dir: str = option("", "folder of PNG/JPEG faces, searched recursively (default: "
                           "data/celeba_64x64 or data/celeba_128x128 in the clone, for "
                           "--img-size 64 or 128, as tools/prepare_faces.py writes them)")
    lr: float = option(1e-4, "Adam learning rate")
    epochs: int = option(1000, "train until this epoch")
    steps_per_epoch: int = option(1000, "steps between checkpoints, sample grids and CSV lines")
    holdout: int = option(-1, "hold out the last N files (sorted) for evaluate; -1: 5%% of them")
    held_out_images: int = option(500, "after every epoch, the bound on the first N held-out "
                                   "files (readable ones) goes to log.csv "
                                   "(held_out_bits_per_dim; 0: off)")
    seed: int = option(-1, "seed of permutations, initial weights and noise (-1: draw one, saved "
                       "with the run)")
    data_order: str = datasets.OWN_STREAM  # no flag: the run folder decides (`resolve_run_data`)


COMMANDS = {"train": "train a run, or resume the one in --out (the default command)",
            "sample": "9x9 grids of samples at each temperature",
            "reconstruct": "reconstructions of real images, directly and through the flow",
            "interpolate": "interpolations in z between two and between four real images (or "
                           "generated samples: --between samples)",
            "sweep": "the same noise at a row of temperatures",
            "evaluate": "loss parts and bits/dim on held-out (or --eval-dir) images",
            "encode": "z and bits/dim of every image of a folder, to .npy and .csv",
            "export": "SavedModels of the sampler and the encoder, and inference-only weights"}


@dataclasses.dataclass(frozen=True)
class FaceModel:
    """A script's model, as the shared code needs to know it.

    name: the run folder's default, runs/<name><img-size>. config_class: a FaceRunSettings
    dataclass whose MODEL_KEYS a resumed run must keep. check(config): a UsageError for a bad
    value. build(config, verbose=False): the model compiled and built (`compile_model`).
    doc: the script's docstring, its --help. commands: {name: help} of the commands it
    offers, `train` first. temperatures: of the sample grids. monitors: functions
    (run_dir, config) -> a callback that adds numbers to the epoch's logs. quick: the
    overrides of a tiny model for `benchmark_setup(quick=True)`."""
    name: str
    config_class: type
    check: Callable
    build: Callable
    doc: str
    commands: dict = dataclasses.field(default_factory=lambda: dict(COMMANDS))
    temperatures: tuple = (1.0, 0.8)
    monitors: tuple = ()
    quick: dict = dataclasses.field(default_factory=dict)

    def main(self, argv=None):
        """The script's command line: `main` below, for this model."""
        return main(self, argv)

    def benchmark_setup(self, img_size=64, batch_size=None, quick=False, precision="float32"):
        """For bench/bench.py: `benchmark_setup` below, for this model."""
        return benchmark_setup(self, img_size, batch_size, quick, precision)


# =========================================================================== pixels and bits/dim

LOG_2PI = math.log(2 * math.pi)


def scale_pixels(x):
    """[0, 255] -> [-1, 1] as `x/255*2-1` (the author's scripts; docs/model.md, "The f-VAE",
    "Training and outputs"), used for training."""
    return x / 255.0 * 2.0 - 1.0


def dequantise(x, noise=None):
    """[0, 255] -> [-1, 1] as `(x_int + U(0, 1)) / 256 * 2 - 1`, used for bits/dim (`noise`:
    given values of U(0, 1), else drawn)."""
    x_int = tf.round(x)
    noise = tf.random.uniform(tf.shape(x), dtype=x.dtype) if noise is None else noise
    return (x_int + noise) / 256.0 * 2.0 - 1.0


def bits_per_dim(nll_nats, dims):
    """Nats per example of the density on [-1, 1] -> bits/dim of 8-bit data (bin width 2/256)."""
    return (nll_nats + dims * math.log(128.0)) / (dims * math.log(2.0))


def split_files(files, holdout):
    """The sorted file list minus its last `holdout` files (training), and those files."""
    if holdout >= len(files):
        raise UsageError(f"--holdout {holdout}: the folder has only {len(files)} image file(s); "
                         "hold out fewer")
    return (files[:len(files) - holdout], files[len(files) - holdout:]) if holdout else (files, [])


# =========================================================================== building

def compile_model(model, config, report=None):
    """`model` compiled as for training (Adam at `config.lr`, XLA if `config.jit_compile`)
    and built (weights, optimiser slots), ready to load; `report(model)`'s lines printed."""
    model.compile(optimizer=wrap_optimizer(FusedAdam(config.lr), config.precision),
                  jit_compile=bool(config.jit_compile))
    model(np.zeros((1, config.img_size, config.img_size, 3), "float32"))
    model.optimizer.build(model.trainable_variables)
    for line in report(model) if report else ():
        print(line, flush=True)
    return model


def benchmark_setup(face_model, img_size=64, batch_size=None, quick=False, precision="float32"):
    """For bench/bench.py: the model at `img_size` (a tiny one with `quick`) in `precision`,
    compiled as for training, and one batch of random images in [-1, 1] (batch: the config's
    default)."""
    config = face_model.config_class(img_size=img_size, seed=0, precision=precision)
    if batch_size is not None:
        config = dataclasses.replace(config, batch_size=batch_size)
    if quick:
        config = dataclasses.replace(config, **face_model.quick)
    model = face_model.build(config)
    shape = (config.batch_size, img_size, img_size, 3)
    return model, tf.constant(np.random.RandomState(0).uniform(-1, 1, shape).astype("float32"))


# =========================================================================== sample grids

def sample_latents(model, n, temperature, seed=0):
    """n flow latents z ~ N(0, T^2 I) drawn from a fixed numpy seed (those of `sample_images`)."""
    return temperature * np.random.RandomState(seed).randn(n, model.latent_dims).astype("float32")


def sample_images(model, n, temperature, seed=0, batch=32):
    """n images G(F^-1(z)) (Glow: F^-1(z)), z ~ N(0, T^2 I), drawn from a fixed numpy seed."""
    z = sample_latents(model, n, temperature, seed)
    return np.concatenate([ops.convert_to_numpy(model.generate(z[i:i + batch]))
                           for i in range(0, n, batch)])


class SampleGrids(keras.callbacks.Callback):
    """After every epoch: a 9x9 grid at each temperature (the f-VAE's 1.0 and 0.8, Glow's 0.9:
    docs/model.md, "The f-VAE", "Training and outputs", and "Glow, the paper's baseline"), from
    the same z noise each epoch, as `samples/epoch0001_T1.0.png`, `samples_T1.0_latest.png` and
    a TensorBoard image."""

    TEMPERATURES, ROWS, COLS = (1.0, 0.8), 9, 9

    def __init__(self, run_dir, seed=0, temperatures=TEMPERATURES):
        super().__init__()
        self.run_dir, self.seed, self.temperatures = run_dir, seed, temperatures

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        kept = f"epoch {epoch + 1} is saved (`sample` draws its grids)"  # the checkpoint came first
        for t in self.temperatures:
            images = sample_images(self.model, self.ROWS * self.COLS, t, self.seed)
            grid = pictures.image_grid(images, self.ROWS, self.COLS)
            pictures.write_png(os.path.join(self.run_dir, "samples", f"epoch{epoch + 1:04d}_T{t}.png"),
                               grid, kept)
            pictures.write_png(os.path.join(self.run_dir, f"samples_T{t}_latest.png"), grid, kept)
            monitor.log_picture(self.run_dir, f"samples_T{t}", grid, epoch + 1)


class HeldOutBound(keras.callbacks.Callback):
    """After every epoch: the model's loss and bits/dim on the held-out image `files`, as `held_out_loss` and `held_out_bits_per_dim` in the epoch's logs,
    so in log.csv, loss_curves.png and TensorBoard. One posterior draw per image (`evaluate
    --samples K` gives the tighter bound), in the training precision and batch-norm inference
    mode, on the same dequantisation noise every epoch; the model's random-number state is
    put back afterwards, so the training run is the one it would have been without it."""

    def __init__(self, files, img_size, batch_size, seed):
        super().__init__()
        noise = np.random.RandomState(seed).uniform(size=(len(files), img_size, img_size, 3))
        self.dataset = tf.data.Dataset.zip(
            datasets.image_dataset(files, img_size, batch_size, lambda x: x),
            tf.data.Dataset.from_tensor_slices(noise.astype("float32")).batch(batch_size)).map(
                dequantise)

    def on_epoch_end(self, epoch, logs=None):
        states = [g.state.numpy() for g in seed_generators(self.model)]
        try:
            results = self.model.evaluate(self.dataset, return_dict=True, verbose=0)
        except (tf.errors.OpError, OSError) as e:  # a file gone, memory: the epoch is saved anyway
            print(f"held-out bound of epoch {epoch + 1} skipped: {first_line(e)}",
                  file=sys.stderr, flush=True)
            return
        finally:
            for generator, state in zip(seed_generators(self.model), states):
                generator.state.assign(state)
        if logs is not None:
            logs["held_out_loss"] = float(results["loss"])
            if "bits_per_dim" in results:
                logs["held_out_bits_per_dim"] = float(results["bits_per_dim"])


# =========================================================================== training

def train(face_model, config, out):
    """Train (or resume) the run in `out` (config resolved by `train_config`): the files of
    `config.data_dir` but the held-out ones, the model of `face_model.build`, its monitors,
    and sample grids at its temperatures."""
    model_keys = face_model.config_class.MODEL_KEYS
    with prepare_run(config, out, model_keys) as run:
        config = run.config  # XLA decided
        files = image_files.list_image_files(config.data_dir)
        train_files, held_out = split_files(files, config.holdout)
        monitor.progress(f"checking that the {len(train_files)} training images decode")
        train_files, _ = image_files.find_readable_images(train_files, config.img_size)
        if not train_files:
            raise UsageError(f"--data-dir {config.data_dir!r}: no readable image among the "
                             "training files")
        print(f"{len(train_files)} training images, {len(held_out)} held out (the last files "
              f"of the sorted list), {config.img_size}x{config.img_size}", file=sys.stderr)

        def build_seeded():
            monitor.progress("building the model")
            keras.utils.set_random_seed(config.seed)
            return face_model.build(config, verbose=True)

        def stream(images_seen):  # a function of its position in the data: resumes exactly
            # (and the same on every worker of a cluster: each keeps its part of every batch)
            return datasets.image_stream(train_files, config.img_size, config.batch_size,
                                         scale_pixels, config.seed, start=images_seen,
                                         own_stream=config.data_order == datasets.OWN_STREAM)

        scored, _ = image_files.find_readable_images(  # an unreadable file is left out
            held_out[:config.held_out_images], config.img_size, verbose=False)
        held_out_bound = ([HeldOutBound(scored, config.img_size, config.batch_size, config.seed)]
                          if scored else [])
        return fit_run(run, config, model_keys, build_seeded, stream, config.steps_per_epoch,
                       monitors=[*held_out_bound,
                                 *(make(run.dir, config) for make in face_model.monitors)],
                       callbacks=[SampleGrids(run.dir, seed=config.seed,
                                              temperatures=face_model.temperatures)])


# =========================================================================== commands on a run

def load_run(face_model, out, weights="best", data_dir=None):
    """The config and model of the run folder `out`, with its `best` or `latest` weights
    loaded (without XLA, in float32 whatever it trained in: bounds and pictures do not depend
    on that; `data_dir`: where the run's image folder is now, if it moved)."""
    path = os.path.join(out or "", "config.json")
    if not out or not os.path.exists(path):
        raise UsageError(f"--out {out!r}: no trained run there (expected {path}); "
                         "train one first with the same --out")
    config = cli.read_run_config(path, face_model.config_class)
    config = dataclasses.replace(config, jit_compile=False, precision="float32",
                                 data_dir=data_dir or config.data_dir)
    weights_path = os.path.join(out, f"{weights}.weights.h5")
    if not os.path.exists(weights_path):
        raise UsageError(f"--weights {weights}: {weights_path} does not exist yet "
                         "(no epoch has finished)")
    model = face_model.build(config)
    try:
        load_weights(model, weights_path)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{weights_path}: cannot load ({e})") from None
    return config, model


def real_images(config, n, seed):
    """n real images in [-1, 1]: held-out files if any (else training files), seeded choice."""
    files = image_files.list_image_files(config.data_dir)
    train_files, held_out = split_files(files, config.holdout)
    pool, _ = image_files.find_readable_images(held_out or train_files, config.img_size, verbose=False)
    if not pool:
        raise UsageError(f"--data-dir {config.data_dir!r}: no readable image to use")
    picks = np.random.RandomState(seed).choice(len(pool), n, replace=len(pool) < n)
    return np.stack([scale_pixels(image_files.load_image(pool[i], config.img_size)).numpy()
                     for i in picks])


def command_sample(args, config, model):
    for t in args.temperatures:
        images = sample_images(model, args.rows * args.cols, t, args.seed)
        print(pictures.save_grid(os.path.join(args.out, f"sample_T{t}.png"), images,
                               args.rows, args.cols))


def sweep_images(model, rows, temperatures, seed=0):
    """rows x len(temperatures) images, row by row: z = T * eps, eps ~ N(0, I) fixed per row."""
    noise = np.random.RandomState(seed).randn(rows, model.latent_dims)
    z = np.stack([t * noise for t in temperatures], axis=1).reshape(-1, noise.shape[1])
    return np.concatenate([ops.convert_to_numpy(model.generate(z[i:i + 32].astype("float32")))
                           for i in range(0, len(z), 32)])


def command_sweep(args, config, model):
    """One row per noise draw, one column per temperature: z = T * eps with eps fixed per row.
    With --quality-samples N, N samples at each temperature are scored against the held-out
    faces (`quality_scores`; the article's temperature trade-off as numbers): printed, and in
    sweep_quality.json and sweep_quality.png."""
    images = sweep_images(model, args.rows, args.sweep, args.seed)
    print(pictures.save_grid(os.path.join(args.out, "sweep.png"), images, args.rows, len(args.sweep)))
    if args.quality_samples:
        quality = scored_quality(args, config, model, args.sweep, spectra_path=None)
        common.write_json(os.path.join(args.out, "sweep_quality.json"),
                          {"quality_features": args.features,
                           "quality_samples": args.quality_samples, **quality})
        path = os.path.join(args.out, "sweep_quality.png")
        sample_quality.plot_against_temperature(quality, args.sweep, path)
        print(path)


def scored_quality(args, config, model, temperatures, spectra_path):
    """`quality_scores` of --quality-samples samples at `temperatures`, in the features of
    --features, printed a line per set."""
    features = infomax_features(args.features, config.img_size) if args.features else None
    quality = quality_scores(model, config, features, args.quality_samples, temperatures,
                             seed=args.seed, spectra_path=spectra_path)
    print(f"sample quality against the {quality['reference_images']} held-out faces "
          "(sharpness: high-frequency share / the held-out faces'; frechet_distance, "
          f"precision, recall: in the features of {args.features or '(no --features)'}):")
    for name, numbers in quality.items():
        if isinstance(numbers, dict):
            print(f"  {name:15s} " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
    return quality


def command_reconstruct(args, config, model):
    """reconstruct.png: 9x9 G(E(x)); reconstruct_pairs.png: per row three triples of
    (original, G(E(x)), G(F^-1(F(E(x))))) - the last goes through the flow both ways."""
    x = real_images(config, args.rows * args.cols, args.seed)
    direct = ops.convert_to_numpy(model.reconstruct(x))
    print(pictures.save_grid(os.path.join(args.out, "reconstruct.png"), direct, args.rows, args.cols))
    triples = args.rows * (args.cols // 3)
    round_trip = ops.convert_to_numpy(model.generate(model.latent(x[:triples])))
    pairs = np.stack([x[:triples], direct[:triples], round_trip], axis=1).reshape(-1, *x.shape[1:])
    print(pictures.save_grid(os.path.join(args.out, "reconstruct_pairs.png"), pairs,
                           args.rows, 3 * (args.cols // 3)))


def linear_paths(starts, ends, steps):
    """(pairs, steps, d): for each pair of latents, `steps` points (1 - a) z_a + a z_b, a from
    0 to 1."""
    a = np.linspace(0.0, 1.0, steps, dtype="float32")[None, :, None]
    return starts[:, None] * (1 - a) + ends[:, None] * a


def bilinear_grid(corners, rows, cols):
    """(rows, cols, d): bilinear in the four latents at the corners (top left, top right,
    bottom left, bottom right)."""
    a = np.linspace(0.0, 1.0, rows, dtype="float32")[:, None, None]
    b = np.linspace(0.0, 1.0, cols, dtype="float32")[None, :, None]
    return ((1 - a) * (1 - b) * corners[0] + (1 - a) * b * corners[1]
            + a * (1 - b) * corners[2] + a * b * corners[3])


def decode_rows(model, latents):
    """The images of a (rows, cols, d) array of latents, row by row."""
    return np.concatenate([ops.convert_to_numpy(model.generate(row)) for row in latents])


def command_interpolate(args, config, model):
    """interpolate_2.png: per row, `cols` steps linear in z between two real images;
    interpolate_4.png: rows x cols, bilinear in z between four real images at the corners.
    A real image's z is that of its posterior mean, u = 0 (`--image-latent mean`), or of one
    posterior draw u from the seed (`draw`: the author's total_encoder keeps its noise).
    With `--between samples` the ends are generated samples, z ~ N(0, T^2 I) (the z of
    `sample` at that seed), in interpolate_2_T<T>.png and interpolate_4_T<T>.png."""
    draw = getattr(args, "image_latent", "mean") == "draw"
    if draw and args.between == "samples":
        raise UsageError("--image-latent draw: the z of real images, only with --between images")
    if draw and not hasattr(model, "posterior_latent"):
        raise UsageError(f"--image-latent draw: the {model.name} model has no posterior to draw "
                         "from (its z = F(x)); use --image-latent mean")
    if args.between == "samples":
        ends = lambda n, seed: sample_latents(model, n, args.temperature, seed)  # noqa: E731
        suffix = f"_T{args.temperature}"
    elif draw:
        ends = lambda n, seed: ops.convert_to_numpy(  # noqa: E731
            model.posterior_latent(real_images(config, n, seed), seed))
        suffix = ""
    else:
        ends = lambda n, seed: ops.convert_to_numpy(  # noqa: E731
            model.latent(real_images(config, n, seed)))
        suffix = ""
    z = ends(2 * args.rows, args.seed)
    images = decode_rows(model, linear_paths(z[0::2], z[1::2], args.cols))
    print(pictures.save_grid(os.path.join(args.out, f"interpolate_2{suffix}.png"), images,
                             args.rows, args.cols))
    images = decode_rows(model, bilinear_grid(ends(4, args.seed + 1), args.rows, args.cols))
    print(pictures.save_grid(os.path.join(args.out, f"interpolate_4{suffix}.png"), images,
                             args.rows, args.cols))


def command_evaluate(args, config, model):
    """Mean loss parts (nats/example) and bits/dim on held-out images, dequantised as
    y = (x_int + U(0, 1)) / 256 * 2 - 1 (see the module docstring), one u draw per image."""
    if args.eval_dir:
        files = image_files.list_image_files(args.eval_dir, flag="--eval-dir")
    else:
        files = split_files(image_files.list_image_files(config.data_dir), config.holdout)[1]
        if not files:
            raise UsageError(f"--out {args.out!r}: the run holds out no images (--holdout 0); "
                             "pass --eval-dir DIR")
    files, _ = image_files.find_readable_images(files, config.img_size)
    if not files:
        raise UsageError("no readable image to evaluate")
    keras.utils.set_random_seed(args.seed)  # the dequantisation noise
    dataset = dequantised_images(files, config.img_size, min(config.batch_size, len(files)))
    samples = getattr(args, "samples", 1)
    with noise_kept(model):  # u: a freshly loaded model's draws, however often this runs
        if samples > 1:
            results, draws = importance_weighted(model, dataset, samples)
        else:
            results = model.evaluate(dataset, return_dict=True, verbose=0)
        results["reconstruction_rmse"] = reconstruction_rmse(model, files, config.img_size)
        if hasattr(model, "log_precision"):  # a decoder: the bound at its best scale too
            dims = config.img_size ** 2 * 3
            results["log_precision"] = float(ops.convert_to_numpy(model.log_precision))
            results["sampled_reconstruction_rmse"] = sampled_reconstruction_rmse(
                results["squared_error"], dims)
            results["fitted_log_precision"] = fitted_log_precision(model, config, args.seed)
            refit = lambda loss, recon, squares: refitted_loss(  # noqa: E731
                loss, recon, squares, dims, results["fitted_log_precision"])
            loss = (np.mean(iwae_bound(refit(*draws))) if samples > 1
                    else refit(results["loss"], results["recon"], results["squared_error"]))
            results["loss_fitted_t_x"] = float(loss)
            results["bits_per_dim_fitted_t_x"] = float(bits_per_dim(loss, dims))
    print(f"evaluated {len(files)} images ({config.img_size}x{config.img_size}, dequantised "
          f"(x_int + U(0,1))/256*2-1), K = {samples} posterior sample(s), nats per image "
          f"(reconstruction_rmse: G(E(x)) against x, in pixel values 0..255; "
          f"sampled_reconstruction_rmse: G(v), v drawn from the posterior, as the loss scores it; "
          f"*_fitted_t_x: the bound with the decoder's scale t_x set to its best value on "
          f"training images):")
    for name in (*model.LOG_NAMES, "reconstruction_rmse", "sampled_reconstruction_rmse",
                 "log_precision", "fitted_log_precision", "loss_fitted_t_x",
                 "bits_per_dim_fitted_t_x"):
        if results.get(name) is not None:
            print(f"  {name:13s} {results[name]:.4f}")
    quality = {}
    if getattr(args, "quality_samples", 0):
        quality = scored_quality(args, config, model, QUALITY_TEMPERATURES,
                                 spectra_path=os.path.join(args.out, "spectra.png"))
    common.write_json(os.path.join(args.out, "evaluate.json"),
                      {"images": len(files), "samples": samples,
                       **{k: None if v is None else float(v) for k, v in results.items()},
                       **({"quality": quality, "quality_features": args.features}
                          if quality else {})})
    return results


QUALITY_TEMPERATURES = (1.0, 0.8)


def quality_scores(model, config, features=None, samples=2000, temperatures=QUALITY_TEMPERATURES,
                   seed=0, spectra_path=None, real_faces=None):
    """Sample quality against the run's held-out faces (the reference: seen by neither the
    model nor, trained on training faces, the feature encoder): for `samples` samples at each
    temperature, and for as many training faces (the floor: real faces score this), the
    sharpness (`sample_quality.high_frequency_ratio`, 1.0 = as sharp as the reference) and,
    with `features` (uint8 images -> (N, F)), the Frechet distance and k-NN precision and
    recall in those features. {"training faces": {...}, "T1.0": {...}, ...}; the radial
    spectra plotted to `spectra_path` if given.

    `real_faces`: a dict that keeps the real faces' images, features and spectra between
    calls with the same config, samples, seed and `features` (compare.py scores every
    checkpoint of a run against the same faces); the scores are the same with or without it."""
    real = real_faces if real_faces is not None else {}
    key = (config.data_dir, config.holdout, config.img_size, samples, seed, features)
    if real.get("key") != key:
        images = real_face_sets(config, samples, seed)
        real.clear()
        real.update(key=key, images=images,
                    features={name: features(faces) for name, faces in images.items()}
                    if features else {},
                    spectra={name: sample_quality.radial_power_spectrum(faces)
                             for name, faces in images.items()})
    counts = {name: len(faces) for name, faces in real["images"].items()}
    spectra, encoded = dict(real["spectra"]), dict(real["features"])
    for t in temperatures:
        images = pictures.to_uint8(sample_images(model, samples, t, seed))
        counts[f"T{t}"], spectra[f"T{t}"] = len(images), sample_quality.radial_power_spectrum(images)
        if features:
            encoded[f"T{t}"] = features(images)
    reference = "held-out faces"
    scores = {}
    for name in [n for n in spectra if n != reference]:
        scores[name] = {"images": counts[name], "sharpness": sample_quality.high_frequency_share(
            spectra[name][1]) / sample_quality.high_frequency_share(spectra[reference][1])}
        if features:
            precision, recall = sample_quality.precision_recall(encoded[reference], encoded[name])
            scores[name].update(frechet_distance=sample_quality.frechet_distance(
                encoded[reference], encoded[name]), precision=precision, recall=recall)
    if spectra_path:
        sample_quality.plot_spectra(spectra, spectra_path)
    return {"reference_images": counts[reference], **scores}


def real_face_sets(config, samples, seed):
    """The real faces of `quality_scores`: {"held-out faces": the run's held-out faces,
    "training faces": `samples` of its training faces drawn by `seed`}, as uint8 images."""
    files, held_out = split_files(image_files.list_image_files(config.data_dir), config.holdout)
    reference = uint8_images(held_out, config.img_size)
    if len(reference) < 4:
        raise UsageError(f"--quality-samples: the run holds out {len(reference)} readable "
                         "image(s); the sample-quality measures need at least 4 (k-NN with "
                         "k = 3; a run trained with a larger --holdout)")
    picks = np.random.RandomState(seed).choice(len(files), min(samples, len(files)), replace=False)
    return {"held-out faces": reference,
            "training faces": uint8_images([files[i] for i in np.sort(picks)], config.img_size)}


def uint8_images(files, img_size):
    """The readable ones of `files` as uint8 images (N, S, S, 3), rounded after resizing."""
    files, _ = image_files.find_readable_images(files, img_size, verbose=False)
    return np.stack([np.asarray(image_files.load_image(path, img_size)).astype(np.uint8)
                     for path in files])


def infomax_features(encoder_folder, img_size):
    """uint8 images -> mu of the Deep InfoMax encoder in `encoder_folder` (a run folder of
    `infomax.py`, or a shipped encoder's name), resized to the size it was trained at."""
    import infomax  # the encoder's builder lives with its script; only this command needs it
    encoder, encoder_config = infomax.load_encoder(encoder_folder)

    def features(images):
        if encoder_config.img_size != img_size:
            images = pictures.to_uint8(tf.image.resize(
                tf.constant(images, tf.float32), (encoder_config.img_size,) * 2,
                method="area").numpy(), (0.0, 255.0))
        return np.asarray(infomax.embed(images, encoder, encoder_config), np.float64)
    return features


FIT_IMAGES = 1000  # training images that set the fitted decoder scale t_x*


@contextlib.contextmanager
def noise_kept(model):
    """The model's own noise streams (the f-VAE's u) put back as they were afterwards: what a
    command draws is what a freshly loaded model draws, however often it runs on one model."""
    states = [generator.state.numpy() for generator in seed_generators(model)]
    try:
        yield
    finally:
        for generator, state in zip(seed_generators(model), states):
            generator.state.assign(state)


def dequantised_images(files, img_size, batch_size):
    """The image files in order, as batches of `dequantise`d pixels. The U(0, 1) noise is
    drawn batch after batch, not in the parallel decoding (whose order varies), so the same
    TensorFlow seed gives the same numbers."""
    return datasets.image_dataset(files, img_size, batch_size, lambda x: x).map(dequantise)


def sampled_reconstruction_rmse(squared_error, dims):
    """Root mean squared error of the sampled reconstructions G(v), v a posterior draw, against
    the dequantised images (as the loss scores them), in pixel values 0..255, from the mean of
    the loss's `squared_error` part. Early in training it can be below G(E(x))'s: while the
    posterior noise outweighs E(x), the decoder has only ever seen noisy v (and its batch-norm
    statistics were gathered on them), so the mean alone is an input unlike any it learnt on."""
    return float(np.sqrt(squared_error / dims) * 255.0 / 2.0)


def refitted_loss(loss, recon, squared_error, dims, fitted):
    """The loss with its reconstruction term at log-precision `fitted` instead of the model's
    (the other terms do not depend on t_x), per image and sample, from the loss parts `recon`
    and `squared_error` = sum((G(v) - x)^2)."""
    refit = (0.5 * np.exp(2.0 * fitted) * np.asarray(squared_error, np.float64)
             + 0.5 * dims * LOG_2PI - dims * fitted)
    return np.asarray(loss, np.float64) - np.asarray(recon, np.float64) + refit


def fitted_log_precision(model, config, seed, images=FIT_IMAGES):
    """t_x* = -1/2 ln(mean squared residual), the decoder scale that minimises the
    reconstruction term on up to `images` training images (dequantised, one posterior draw
    each, as evaluate scores): the one free scalar of the bound, set in closed form. Early
    in training t_x lags far behind it (Adam moves it about lr a step)."""
    files = split_files(image_files.list_image_files(config.data_dir), config.holdout)[0]
    picks = np.sort(np.random.RandomState(seed).choice(len(files), min(images, len(files)),
                                                       replace=False))
    files, _ = image_files.find_readable_images([files[i] for i in picks], config.img_size,
                                                verbose=False)
    dims = config.img_size ** 2 * 3
    squares = [np.asarray(ops.convert_to_numpy(model.loss_parts(x)["squared_error"]), np.float64)
               for x in dequantised_images(files, config.img_size, config.batch_size)]
    return float(-0.5 * np.log(np.mean(np.concatenate(squares)) / dims))


def reconstruction_rmse(model, files, img_size, batch=32):
    """Root mean squared error of the reconstructions G(E(x)) (the posterior mean through the
    decoder; None for a model without one, Glow), in pixel values 0..255."""
    if not hasattr(model, "reconstruct"):
        return None
    errors = []
    for images in datasets.image_dataset(files, img_size, batch, lambda x: x):
        images = np.round(images.numpy())
        rebuilt = pictures.to_uint8(ops.convert_to_numpy(model.reconstruct(scale_pixels(images))))
        errors.append(((rebuilt.astype(np.float64) - images) ** 2).reshape(len(images), -1).mean(1))
    return float(np.sqrt(np.mean(np.concatenate(errors))))


def iwae_bound(losses):
    """The importance-weighted bound (Burda et al. 2016) of K per-sample losses (K, N), each
    -log p(x, z_k) + log q(z_k | x) in nats: -log mean_k exp(-loss_k), per image. K = 1 is the
    ELBO; the bound tightens (does not grow, in expectation) as K grows."""
    losses = np.asarray(losses, np.float64)
    lowest = losses.min(axis=0)
    return lowest - np.log(np.mean(np.exp(-(losses - lowest)), axis=0))


def importance_weighted(model, dataset, samples):
    """Mean IWAE bound over the images of `dataset` with `samples` posterior draws each, as
    the `loss` and `bits_per_dim` of evaluate (the other parts: their mean over the draws);
    and the draws' (loss, recon, squared_error), each (K, N), for the bound at a refitted
    decoder scale (None where the model has no such part)."""
    bounds, parts = [], {name: [] for name in model.LOG_NAMES if name not in ("loss", "bits_per_dim")}
    kept = {"loss": [], "recon": [], "squared_error": []}
    for x in dataset:
        draws = [model.loss_parts(x) for _ in range(samples)]  # a new u each call
        bounds.append(iwae_bound([ops.convert_to_numpy(d["loss"]) for d in draws]))
        for name in parts:
            parts[name].append(np.mean([ops.convert_to_numpy(d[name]) for d in draws], axis=0))
        for name in kept:
            if name in draws[0]:
                kept[name].append(np.stack([ops.convert_to_numpy(d[name]) for d in draws]))
    loss = float(np.mean(np.concatenate(bounds)))
    dims = model.img_size ** 2 * 3
    draws = tuple(np.concatenate(v, axis=1) if v else None for v in kept.values())
    return {"loss": loss, "bits_per_dim": float(bits_per_dim(loss, dims)),
            **{name: float(np.mean(np.concatenate(v))) for name, v in parts.items()}}, draws


def command_encode(args, config, model):
    """Every image under --folder: its flow latent z (`<dest>.npy`, one row per file) and its
    bits/dim (`<dest>.csv`: file, row, bits_per_dim), in file order."""
    files = image_files.scan_image_folder(args.folder, config.img_size, "--folder")
    dest = args.dest or os.path.join(args.out, "encoded", os.path.basename(
        os.path.normpath(args.folder)))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    latents, scores = [], []
    dataset = datasets.image_dataset(files, config.img_size, 32, lambda x: x)
    progress = keras.utils.Progbar(len(files), unit_name="image",
                                   verbose=1 if monitor.interactive() else 0)
    for images in dataset:
        images = images.numpy()
        latents.append(model.encode(images))
        scores.append(model.bits_per_dim(images, seed=args.seed + len(scores)))
        progress.add(len(images))
    np.save(dest + ".npy", np.concatenate(latents).astype(np.float32))
    with open(dest + ".csv", "w") as f:
        f.write("file,row,bits_per_dim\n")
        f.writelines(f"{os.path.relpath(path, args.folder)},{row},{bits:.6f}\n"
                     for row, (path, bits) in enumerate(zip(files, np.concatenate(scores))))
    print(f"{dest}.npy: z of {len(files)} images ({model.latent_dims} numbers each); "
          f"{dest}.csv: file, row, bits_per_dim")


def command_export(args, config, model):
    """`<dest>/sampler` and `<dest>/encoder`, TensorFlow SavedModels (load with
    tf.saved_model.load: `.sample(noise, temperature)` -> uint8 images, `.encode(images)` ->
    z), and `<dest>/inference.weights.h5`, the weights without the optimiser state."""
    dest = args.dest or os.path.join(args.out, "export")
    os.makedirs(dest, exist_ok=True)
    dims, size = model.latent_dims, config.img_size

    def to_uint8(x):  # (x+1)/2*255, rounded and clipped, as the picture grids
        return tf.cast(tf.clip_by_value(tf.round((x + 1.0) / 2.0 * 255.0), 0.0, 255.0), tf.uint8)

    for name, function, signature in [
            ("sampler", lambda noise, temperature: to_uint8(model.generate(noise * temperature)),
             [tf.TensorSpec((None, dims), tf.float32), tf.TensorSpec((), tf.float32)]),
            ("encoder", lambda images: model.latent(scale_pixels(tf.cast(images, tf.float32))),
             [tf.TensorSpec((None, size, size, 3), tf.uint8)])]:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("sample" if name == "sampler" else "encode", function, signature)
        archive.write_out(os.path.join(dest, name), verbose=False)
    weights = os.path.join(dest, "inference.weights.h5")
    inference_weights(model, weights)
    print(f"{dest}/sampler (sample(noise, temperature)), {dest}/encoder (encode(images)), "
          f"{weights} ({os.path.getsize(weights) / 2**20:.1f} MiB)")


def inference_weights(model, path):
    """The model's weights without the optimiser state (loads into `build_model` or FVAE)."""
    from keras.src.saving import saving_lib  # `save_weights` has no way to leave it out
    saving_lib.save_weights_only(model, path, objects_to_skip=[model.optimizer])




# =========================================================================== command line

def temperature_list(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not values or any(not math.isfinite(t) or t < 0 for t in values):
        raise argparse.ArgumentTypeError(f"{text!r}: temperatures must be numbers >= 0")
    return values


def temperature(text):
    """One temperature, checked as `temperature_list` checks each."""
    values = temperature_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one temperature")
    return values[0]


def add_run_command_flags(commands, default_temperatures=(1.0, 0.8)):
    """The flags of the commands on a trained run ({name: sub-parser})."""
    for name in commands:
        if name == "train":
            continue
        flags = commands[name]
        flags.add_argument("--out", default=None, help="the run folder")
        flags.add_argument("--weights", choices=("best", "latest"), default="best",
                           help="which checkpoint to load (best = lowest epoch loss)")
        flags.add_argument("--seed", type=int, default=0, help="seed of the noise and of the "
                           "choice of images")
        if name in ("encode", "export"):
            flags.add_argument("--dest", default=None,
                               help="where to write (default: in --out: encoded/<folder name> "
                                    "for encode, export/ for export)")
        if name == "encode":
            flags.add_argument("--folder", required=True, help="the images to encode (recursively)")
        if name in ("reconstruct", "interpolate", "evaluate"):
            flags.add_argument("--data-dir", default=None,
                               help="where the run's image folder is now (default: as saved)")
        if name not in ("evaluate", "encode", "export"):
            flags.add_argument("--rows", type=int, default=9, help="rows of the picture")
        if name not in ("evaluate", "sweep", "encode", "export"):
            flags.add_argument("--cols", type=int, default=9, help="columns of the picture")
    commands["sample"].add_argument("--temperatures", type=temperature_list,
                                    default=list(default_temperatures),
                                    help="comma-separated temperatures T >= 0")
    commands["sweep"].add_argument("--sweep", type=temperature_list,
                                   default=[round(0.1 * i, 1) for i in range(11)],
                                   help="the temperatures of the columns")
    commands["interpolate"].add_argument("--between", choices=("images", "samples"),
                                         default="images",
                                         help="the ends: real images (held out) or generated "
                                              "samples, z ~ N(0, T^2 I)")
    commands["interpolate"].add_argument("--temperature", type=temperature, default=0.8,
                                         metavar="T", help="T of the samples at the ends "
                                                           "(with --between samples)")
    commands["interpolate"].add_argument("--image-latent", choices=("mean", "draw"),
                                         default="mean",
                                         help="the z of a real image at an end: mean, F(E(x)) "
                                              "(u = 0, the posterior mean); draw, "
                                              "F(exp(s_u) u + E(x)) for one u ~ N(0, I) from "
                                              "--seed, the author's (f-VAE only)")
    commands["evaluate"].add_argument("--eval-dir", default=None,
                                      help="every image of this folder instead of the run's "
                                           "held-out files")
    for name, at in (("evaluate", "T = 1.0 and 0.8"), ("sweep", "each temperature")):
        commands[name].add_argument("--quality-samples", type=int, default=0, metavar="N",
                                    help=f"also measure N samples at {at} (and N training "
                                         "faces, the floor) against the held-out faces: "
                                         "sharpness, and with --features the Frechet distance "
                                         "and k-NN precision and recall (0: off; docs/model.md)")
        commands[name].add_argument("--features", default=None, metavar="ENCODER",
                                    help="a Deep InfoMax run folder (infomax.py --dataset "
                                         "folder on the training faces) whose mu are the "
                                         "features of --quality-samples")
    commands["evaluate"].add_argument("--samples", type=int, default=1, metavar="K",
                                      help="posterior samples per image: K > 1 gives the "
                                           "importance-weighted bound, tighter than the ELBO")


def parse_args(face_model, argv=None):
    """The command and its flags (`script.py COMMAND --help` lists a command's own)."""
    parser, commands = cli.command_parser(face_model.doc, face_model.commands)
    cli.add_config_flags(commands["train"], face_model.config_class)
    commands["train"].add_argument("--out", default=None,
                                   help="run folder (config, weights, log.csv, pictures); the "
                                        "same --out resumes (default: "
                                        f"runs/{face_model.name}<img-size>)")
    add_run_command_flags(commands, face_model.temperatures)
    args = parser.parse_args(argv)
    cli.check_at_least(args, 1, *[f for f in ("rows", "cols", "samples") if hasattr(args, f)])
    if 0 < getattr(args, "quality_samples", 0) < 10 or getattr(args, "quality_samples", 0) < 0:
        raise UsageError(f"--quality-samples {args.quality_samples}: expected 0 (off) or at "
                         "least 10 (k-NN precision and recall need more points than k = 3)")
    return args


def train_config(face_model, args):
    """(config, run folder) of `train`: the flags checked, with the run folder, data folder,
    hold-out and seed resolved."""
    config = cli.config_from_args(face_model.config_class, args)
    face_model.check(config)
    out = args.out or os.path.join("runs", f"{face_model.name}{config.img_size}")
    return resolve_run_data(config, out), out


def missing_faces(folder, img_size):
    """The one line for a missing default face folder: what to download, what prepares it."""
    return (f"--data-dir: no faces at {folder} (the default for --img-size {img_size}): download "
            "CelebA's img_align_celeba.zip (mmlab.ie.cuhk.edu.hk/projects/CelebA.html), then "
            f"`python tools/prepare_faces.py img_align_celeba.zip {folder} --size {img_size}`, "
            "or give --data-dir, any folder of PNG/JPEG faces")


def resolve_run_data(config, out):
    """`config` with the data folder (the flag, else the run's, else the clone's prepared faces
    of that size; kept relative), the hold-out (-1: 5 %), the seed (-1: drawn once) and the data
    order (`datasets.run_data_order`) of the run to train in `out` resolved."""
    saved_path = os.path.join(out, "config.json")
    saved = (common.read_run_json(saved_path, cli.config_kinds(type(config)))
             if os.path.exists(saved_path) else {})
    data_dir = (config.data_dir or saved.get("data_dir")
                or (os.path.relpath(DEFAULT_DATA[config.img_size])
                    if config.img_size in DEFAULT_DATA else None))
    if not config.data_dir and not saved.get("data_dir") and config.img_size in DEFAULT_DATA \
            and not os.path.isdir(data_dir):
        raise UsageError(missing_faces(data_dir, config.img_size))
    if not data_dir or not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {config.data_dir or data_dir!r}: no such folder (give "
                         "--data-dir, a folder of PNG/JPEG images)")
    # as given: a run folder holds no absolute path (--data-dir moves it)
    config = dataclasses.replace(config, data_dir=data_dir)
    if config.holdout < 0:
        config = dataclasses.replace(config, holdout=saved.get(
            "holdout", len(image_files.list_image_files(data_dir)) // 20))
    if config.seed < 0:
        config = dataclasses.replace(config, seed=saved.get(
            "seed", int(np.random.randint(0, 2**31 - 1))))
    return dataclasses.replace(config, data_order=datasets.run_data_order(out))


RUN_COMMANDS = {"sample": command_sample, "sweep": command_sweep,
                "reconstruct": command_reconstruct, "interpolate": command_interpolate,
                "evaluate": command_evaluate, "encode": command_encode, "export": command_export}


def main(face_model, argv=None):
    """The command line of the script of `face_model`: train, or a command on a trained run."""
    def command():
        args = parse_args(face_model, argv)
        if args.command == "train":
            config, out = train_config(face_model, args)
            train(face_model, config, out)
            return
        config, model = load_run(face_model, args.out, args.weights,
                                 getattr(args, "data_dir", None))
        RUN_COMMANDS[args.command](args, config, model)
    return common.run_main(command)
