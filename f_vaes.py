"""f-VAEs: VAEs with a conditional flow posterior (Su & Wu 2018, arXiv 1809.05861).

The model of SPEC.md section 1, in TensorFlow 2 / Keras 3, read top to bottom:
config -> data -> encoder E and decoder G -> flow F -> the loss -> training -> pictures.

    h = E(x)                       encoder, as many numbers as the image (S/8 x S/8 x 192)
    v = exp(s_u) * u + h           u ~ N(0, I); s_u one trainable scalar (init 0)
    z = F(v)                       unconditional multi-scale flow, scored under N(0, I)
    x ~ N(G(v), exp(-t_x)^2)       decoder with one trainable scalar precision exp(t_x) (init 0)

Sampling: z ~ N(0, T^2 I) -> v = F^-1(z) -> image = G(v), T the temperature.

    python f_vaes.py --img-size 64 --data-dir DIR --out RUN_DIR            # train (or resume)
    python f_vaes.py sample --out RUN_DIR --temperatures 1.0,0.8             # 9x9 grids
    python f_vaes.py reconstruct | interpolate | sweep | evaluate --out RUN_DIR
    python f_vaes.py COMMAND --help                                           # its flags

Bits/dim. With every constant kept (as below), the SPEC loss is an unbiased one-sample
estimate of the negative ELBO, in nats, of the continuous density of images scaled to
[-1, 1]: log q(v|x) = -0.5*sum(u^2) - D*s_u - 0.5*D*log(2*pi) and
-log p(z) = 0.5*sum(z^2) + 0.5*D*log(2*pi), whose constants cancel, so
`prior + entropy - flow_logdet` is exactly log q(z|x) - log p(z) for the sampled z (no
0.5*log(2*pi*e)*D is needed because the sampled -0.5*sum(u^2) is kept, not its mean).
For 8-bit data, y = (x_int + U(0, 1)) / 256 * 2 - 1 puts each pixel value in a bin of
width 2/256, so -log2 P(x_int) <= (nll + D*log(256/2)) / ln 2 (Jensen), and
bits/dim = (nll + D*log(128)) / (D*ln 2). `evaluate` feeds such dequantised held-out
images; training feeds x/255*2-1 (SPEC), and its logged bits/dim applies the same
conversion to the training loss (a monitor, not a bound).
"""

import argparse
import dataclasses
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels for convolutions and matmuls on x86 CPUs are on by default only
# on recent Intel CPUs; elsewhere (this AMD AVX2 machine) they run these models' training steps
# 1.3-1.5x faster than the default Eigen kernels (README.md, Benchmark). Read once, at import of
# TensorFlow; no effect on GPUs. TF_ENABLE_ONEDNN_OPTS=0 turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np
import tensorflow as tf
import keras
from keras import ops

import common
import datasets
from common import UsageError, option
from layers import (ActNorm, CondActNorm, CoupleWrapper, FlowLayer, Permute, Reshape,
                    SplitChannels, Squeeze, UnSqueeze)
from speedups import BatchNormalization, FusedAdam, SameConv2D
from training import distribute, guards
from training.run import RunSettings, fit_run, prepare_run

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = {64: os.path.join(HERE, "..", "shared", "data", "celeba", "celeba_64x64"),
                128: os.path.join(HERE, "..", "shared", "data", "celeba", "celeba_fsrnet_128x128")}


# =========================================================================== config

@dataclasses.dataclass
class Config(RunSettings):
    """Hyperparameters, named as in SPEC.md section 1 (defaults are the paper's script)."""
    img_size: int = option(128, "S: a multiple of 8 x 2^(level-1), e.g. 64 or 128 (the script's "
                           "default; the paper also trains 64)")
    data_dir: str = option("", "folder of PNG/JPEG faces, searched recursively (default: the "
                           "shared CelebA folder for --img-size 64 or 128, if present)")
    batch_size: int = option(32, "images per step")
    lr: float = option(1e-4, "Adam learning rate")
    epochs: int = option(1000, "train until this epoch")
    steps_per_epoch: int = option(1000, "steps between checkpoints, sample grids and CSV lines")
    depth: int = option(12, "flow steps per level (K)")
    level: int = option(4, "flow levels (L)")
    res_steps: int = option(12, "residual steps per encoder/decoder block (fewer for quick runs)")
    coupling_width: int = option(256, "hidden channels of the coupling NN (fewer for quick runs)")
    holdout: int = option(-1, "hold out the last N files (sorted) for evaluate; -1: 5%% of them")
    seed: int = option(-1, "seed of permutations, initial weights and noise (-1: draw one, saved "
                       "with the run)")

    MODEL_KEYS = ("img_size", "depth", "level", "res_steps", "coupling_width", "seed", "holdout")


def check_config(c):
    """Every bad value is a one-line UsageError naming its flag, before anything is built."""
    common.check_at_least(c, 1, "batch_size", "epochs", "steps_per_epoch", "depth", "level",
                          "coupling_width")
    common.check_at_least(c, 0, "res_steps", "nan_patience")
    common.check_positive(c, "lr")
    multiple = 8 * 2 ** (c.level - 1)  # three encoder squeezes, then one per factor-out
    if c.img_size < multiple or c.img_size % multiple:
        raise UsageError(f"--img-size {c.img_size}: must be a positive multiple of "
                         f"8 x 2^(level-1) = {multiple} with --level {c.level} (e.g. 64 or 128)")


def latent_shape(img_size):
    """The shape of h = E(x) and of v: three squeezes of an S x S x 3 image."""
    return (img_size // 8, img_size // 8, 192)


# =========================================================================== data

def scale_pixels(x):
    """[0, 255] -> [-1, 1] as `x/255*2-1` (SPEC.md), used for training."""
    return x / 255.0 * 2.0 - 1.0


def dequantise(x):
    """[0, 255] -> [-1, 1] as `(x_int + U(0, 1)) / 256 * 2 - 1`, used for bits/dim."""
    x_int = tf.round(x)
    return (x_int + tf.random.uniform(tf.shape(x), dtype=x.dtype)) / 256.0 * 2.0 - 1.0


def split_files(files, holdout):
    """The sorted file list minus its last `holdout` files (training), and those files."""
    if holdout >= len(files):
        raise UsageError(f"--holdout {holdout}: the folder has only {len(files)} image file(s); "
                         "hold out fewer")
    return (files[:len(files) - holdout], files[len(files) - holdout:]) if holdout else (files, [])


# =========================================================================== encoder / decoder

class ResidualStep(keras.layers.Layer):
    """x + Conv1x1_zeroinit(ReLU(BatchNorm(Conv3x3(x)))), keeping the channel count.
    `sync_bn`: batch statistics over all replicas' images (the same variables either way)."""

    def __init__(self, channels, sync_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.conv3 = keras.layers.Conv2D(channels, 3, padding="same")
        self.norm = BatchNormalization(synchronized=sync_bn)  # Keras' path when synchronised
        self.conv1 = keras.layers.Conv2D(channels, 1, padding="same", kernel_initializer="zeros")

    def call(self, x, training=False):
        return x + self.conv1(ops.relu(self.norm(self.conv3(x), training=training)))


def build_encoder(img_size, res_steps, sync_bn=False):
    """E: S x S x 3 -> S/8 x S/8 x 192; three blocks of Squeeze + residual steps (12, 48, 192)."""
    image = keras.Input((img_size, img_size, 3))
    x = image
    for block, channels in enumerate((12, 48, 192)):
        x, _ = Squeeze(2, name=f"squeeze_{block}")(x)
        for step in range(res_steps):
            x = ResidualStep(channels, sync_bn, name=f"block{block}_res{step}")(x)
    return keras.Model(image, x, name="encoder")


def build_decoder(img_size, res_steps, sync_bn=False):
    """G: the mirror of E (residual steps at 192, 48, 12, each block ending in UnSqueeze), tanh."""
    v = keras.Input(latent_shape(img_size))
    x = v
    for block, channels in enumerate((192, 48, 12)):
        for step in range(res_steps):
            x = ResidualStep(channels, sync_bn, name=f"block{block}_res{step}")(x)
        x, _ = UnSqueeze(2, name=f"unsqueeze_{block}")(x)
    return keras.Model(v, ops.tanh(x), name="decoder")


# =========================================================================== flow

def coupling_net(channels_out, width):
    """NN of the additive coupling: Conv3x3(width) -> ReLU -> Conv1x1(width) -> ReLU ->
    Conv3x3(C/2) with a zero kernel, so that every coupling starts as the identity.
    `SameConv2D` is Conv2D(padding="same") computed without the zero padding on the 2x2 and
    1x1 maps of the last levels (the same weights, the same function)."""
    return keras.Sequential([
        SameConv2D(width, 3, activation="relu"),
        SameConv2D(width, 1, activation="relu"),
        SameConv2D(channels_out, 3, kernel_initializer="zeros"),
    ])


class FlowStep(FlowLayer):
    """ActNorm -> Permute (fixed random) -> additive coupling x2 += NN(x1); log-det of ActNorm."""

    def __init__(self, channels, width, seed, **kwargs):
        super().__init__(**kwargs)
        self.parts = [ActNorm(name="actnorm"), Permute("random", seed=seed, name="permute"),
                      CoupleWrapper(coupling_net(channels - channels // 2, width), name="coupling")]

    def call(self, x, inverse=False):
        logdet = 0.0
        for part in (reversed(self.parts) if inverse else self.parts):
            x, part_logdet = part(x, inverse=inverse)
            logdet = logdet + part_logdet
        return x, logdet


class FactorOut(keras.layers.Layer):
    """End of a level: split (x1, x2); x2 -> CondActNorm conditioned on x1 -> flattened and set
    aside; x1 -> Squeeze, to the next level. Returns (next_x, set_aside, logdet)."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        h, w, c = shape
        self.split = SplitChannels(name="split")
        self.cond_norm = CondActNorm(name="cond_actnorm")
        self.flatten = Reshape((-1,), source_shape=(h, w, c - c // 2), name="flatten")
        self.squeeze = Squeeze(2, name="squeeze")

    def call(self, x):
        (x1, x2), _ = self.split(x)
        x2, logdet = self.cond_norm([x2, x1])
        set_aside, _ = self.flatten(x2)
        x, _ = self.squeeze(x1)
        return x, set_aside, logdet

    def inverse(self, x, set_aside):
        x1 = self.squeeze.inverse(x)
        x2 = self.cond_norm.inverse([self.flatten.inverse(set_aside), x1])
        return self.split.inverse([x1, x2])


class MultiScaleFlow(keras.layers.Layer):
    """F: v (S/8 x S/8 x 192) -> z (S*S*3 numbers), `levels` x `depth` FlowSteps with a
    FactorOut between levels, a final ActNorm, and all parts concatenated (set-aside first).

    `z, logdet = flow(v)` with logdet = +log|det dz/dv| per example; `flow.inverse(z)` walks
    the same layers backwards.
    """

    def __init__(self, shape, level, depth, width, seed, **kwargs):
        super().__init__(**kwargs)
        seeds = iter(np.random.RandomState(seed).randint(0, 2**31 - 1, size=level * depth))
        h, w, c = shape
        self.steps, self.factor_outs, self.part_sizes = [], [], []
        for i in range(level):
            self.steps += [FlowStep(c, width, int(next(seeds)), name=f"level{i}_step{k}")
                           for k in range(depth)]
            if i < level - 1:
                self.factor_outs.append(FactorOut((h, w, c), name=f"level{i}_factor_out"))
                self.part_sizes.append(h * w * (c - c // 2))
                h, w, c = h // 2, w // 2, 4 * (c // 2)
        self.depth = depth
        self.final_norm = ActNorm(name="final_actnorm")
        self.final_flatten = Reshape((-1,), source_shape=(h, w, c), name="final_flatten")
        self.part_sizes.append(h * w * c)

    def levels(self):
        """(steps of level i, its FactorOut or None), in forward order."""
        for i in range(len(self.factor_outs) + 1):
            steps = self.steps[i * self.depth:(i + 1) * self.depth]
            yield steps, self.factor_outs[i] if i < len(self.factor_outs) else None

    def call(self, v):
        x, logdet, set_aside = v, 0.0, []
        for steps, factor_out in self.levels():
            for step in steps:
                x, step_logdet = step(x)
                logdet = logdet + step_logdet
            if factor_out is not None:
                x, part, part_logdet = factor_out(x)
                set_aside.append(part)
                logdet = logdet + part_logdet
        x, norm_logdet = self.final_norm(x)
        set_aside.append(self.final_flatten(x)[0])
        return ops.concatenate(set_aside, axis=-1), logdet + norm_logdet

    def inverse(self, z):
        parts = ops.split(z, np.cumsum(self.part_sizes)[:-1].tolist(), axis=-1)
        x = self.final_norm.inverse(self.final_flatten.inverse(parts[-1]))
        for (steps, factor_out), part in zip(reversed(list(self.levels())), [None] + parts[-2::-1]):
            if factor_out is not None:
                x = factor_out.inverse(x, part)
            for step in reversed(steps):
                x = step.inverse(x)
        return x


# =========================================================================== loss

LOG_2PI = math.log(2 * math.pi)


def fvae_loss(x, reconstruction, noise, flow_latent, flow_logdet, log_precision, log_noise_scale):
    """The loss of SPEC.md (paper eq. 6 for z = F(exp(s_u) * u + E(x))), per example, in nats.

    recon   = -log N(x; G(v), exp(-t_x)^2): 0.5*sum((exp(t_x)*(G(v)-x))^2) + 0.5*log(2pi)*D - D*t_x
    prior   = 0.5*sum(z^2)                  (-log N(z; 0, I) without its 0.5*log(2pi)*D)
    entropy = -0.5*sum(u^2) - D*s_u         (log p(v|x) without its -0.5*log(2pi)*D)
    loss    = recon + prior + entropy - flow_logdet
    The two dropped constants cancel, so `loss` estimates the negative ELBO without bias.
    """
    dims = int(np.prod(x.shape[1:]))
    sum_per_example = lambda t: ops.sum(ops.reshape(t, (ops.shape(t)[0], -1)), axis=-1)  # noqa: E731
    recon = (0.5 * sum_per_example(ops.square(ops.exp(log_precision) * (reconstruction - x)))
             + 0.5 * LOG_2PI * dims - dims * log_precision)
    prior = 0.5 * sum_per_example(ops.square(flow_latent))
    entropy = -0.5 * sum_per_example(ops.square(noise)) - dims * log_noise_scale
    loss = recon + prior + entropy - flow_logdet
    return {"loss": loss, "recon": recon, "prior": prior, "entropy": entropy,
            "flow_logdet": flow_logdet, "bits_per_dim": bits_per_dim(loss, dims)}


def general_posterior_loss(log_likelihood, latent, noise, posterior_logdet):
    """Paper eq. 6 for any posterior z = F_x(u), u ~ N(0, I), one sample, in nats:
    -log q(x|z) + [log p(z|x) - log q(z)] = -log_likelihood + 0.5*sum(z^2) - 0.5*sum(u^2)
    - log|det dF_x/du|  (the 0.5*log(2pi) constants of prior and posterior cancel).
    With F_x(u) = mu + sigma*u its mean over u is reconstruction + KL(N(mu, sigma^2) || N(0, I));
    with F_x(u) = F(exp(s_u)*u + E(x)) it is `fvae_loss`, where log|det| = flow_logdet + D*s_u.
    """
    flat = lambda t: ops.reshape(t, (ops.shape(t)[0], -1))  # noqa: E731
    return (-log_likelihood + 0.5 * ops.sum(ops.square(flat(latent)), axis=-1)
            - 0.5 * ops.sum(ops.square(flat(noise)), axis=-1) - posterior_logdet)


def bits_per_dim(nll_nats, dims):
    """Nats per example of the density on [-1, 1] -> bits/dim of 8-bit data (bin width 2/256)."""
    return (nll_nats + dims * math.log(128.0)) / (dims * math.log(2.0))


# =========================================================================== model

class FVAE(keras.Model):
    """E, G, F and the two scalars t_x (log_precision) and s_u (log_noise_scale)."""

    LOG_NAMES = ("loss", "recon", "prior", "entropy", "flow_logdet", "bits_per_dim")

    def __init__(self, img_size, level=4, depth=12, res_steps=12, coupling_width=256, seed=0,
                 sync_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.img_size = img_size
        self.encoder = build_encoder(img_size, res_steps, sync_bn)
        self.decoder = build_decoder(img_size, res_steps, sync_bn)
        self.flow = MultiScaleFlow(latent_shape(img_size), level, depth, coupling_width, seed,
                                   name="flow")
        self.log_precision = self.add_weight(shape=(), initializer="zeros", name="log_precision")
        self.log_noise_scale = self.add_weight(shape=(), initializer="zeros",
                                               name="log_noise_scale")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {name: guards.AppliedMean(name=name) for name in self.LOG_NAMES}
        self.skipped = guards.SkippedSteps()

    @property
    def metrics(self):
        return [*self.trackers.values(), self.skipped]

    def loss_parts(self, x, training=False, noise=None):
        """The loss terms per example; `noise` (u) is drawn unless given (tests fix it). On
        several replicas each draws its own rows of the global batch's noise."""
        h = self.encoder(x, training=training)
        if noise is None:
            noise = distribute.replica_draw(
                lambda shape: keras.random.normal(shape, seed=self.seed_generator), ops.shape(h))
        v = ops.exp(self.log_noise_scale) * noise + h
        reconstruction = self.decoder(v, training=training)
        flow_latent, flow_logdet = self.flow(v)
        return fvae_loss(x, reconstruction, noise, flow_latent, flow_logdet,
                         self.log_precision, self.log_noise_scale)

    def call(self, x, training=False):
        return self.loss_parts(x, training=training)

    def _track(self, parts, applied=True):
        for name, tracker in self.trackers.items():
            tracker.update_state(parts[name], applied)
        return distribute.step_logs({metric.name: metric.result() for metric in self.metrics})

    def train_step(self, x):
        """One Adam step on the mean loss, applied only if the loss and gradients are finite
        (else the step, batch-norm statistics included, is undone and counted as skipped)."""
        statistics = guards.snapshot(self.non_trainable_variables)
        with tf.GradientTape() as tape:
            parts = self.loss_parts(x, training=True)
            loss = distribute.replica_share(ops.mean(parts["loss"]))  # the mean over the global batch
        gradients = tape.gradient(loss, self.trainable_variables)
        applied = guards.apply_if_finite(self.optimizer, loss, gradients,
                                         self.trainable_variables, restore=statistics)
        self.skipped.update_state(applied)
        return self._track(parts, applied)

    def test_step(self, x):
        return self._track(self.loss_parts(x, training=False))

    # ----------------------------------------------------------------------- pictures

    def latent(self, x):
        """z = F(E(x)), the flow latent of the posterior mean (u = 0)."""
        return self.flow(self.encoder(x, training=False))[0]

    def generate(self, flow_latent):
        """image = G(F^-1(z))."""
        return self.decoder(self.flow.inverse(flow_latent), training=False)

    def reconstruct(self, x):
        """G(E(x)), the author's reconstruction (posterior mean, no flow)."""
        return self.decoder(self.encoder(x, training=False), training=False)


def build_model(config, verbose=False):
    """The f-VAE of `config`, compiled and built (weights, optimiser slots), ready to load."""
    model = FVAE(config.img_size, config.level, config.depth, config.res_steps,
                 config.coupling_width, config.seed, config.sync_bn, name="fvae")
    model.compile(optimizer=FusedAdam(config.lr), jit_compile=bool(config.jit_compile))
    model(np.zeros((1, config.img_size, config.img_size, 3), "float32"))
    model.optimizer.build(model.trainable_variables)
    if verbose:
        for line in parameter_report(model):
            print(line, flush=True)
    return model


def benchmark_setup(img_size=64, batch_size=32, quick=False):
    """For bench/bench.py: the paper's model at `img_size` (a tiny one with `quick`), compiled
    as for training, and one batch of random images in [-1, 1]."""
    config = Config(img_size=img_size, batch_size=batch_size, seed=0)
    if quick:
        config = dataclasses.replace(config, depth=2, res_steps=1, coupling_width=32, batch_size=4)
    model = build_model(config)
    shape = (config.batch_size, img_size, img_size, 3)
    return model, tf.constant(np.random.RandomState(0).uniform(-1, 1, shape).astype("float32"))


def count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def parameter_report(model):
    """Counts to compare with SPEC.md: E and G 4,729,536 each, flow + 2 scalars 86,371,010,
    all 95,830,082; non-trainable 12,096 batch-norm statistics and 34,560 permutation indices."""
    permutations = [w for w in model.non_trainable_weights if "permutation" in w.path]
    return [
        f"encoder trainable parameters:        {count(model.encoder.trainable_weights):,}",
        f"decoder trainable parameters:        {count(model.decoder.trainable_weights):,}",
        f"flow + 2 scalars trainable:          "
        f"{count(model.flow.trainable_weights) + 2:,}",
        f"whole model trainable:               {count(model.trainable_weights):,}",
        f"non-trainable batch-norm statistics: "
        f"{count(model.non_trainable_weights) - count(permutations):,}",
        f"non-trainable permutation indices:   {count(permutations):,}",
    ]


# =========================================================================== training

class SampleGrids(keras.callbacks.Callback):
    """After every epoch: a 9x9 grid at each temperature, from the same z noise each epoch,
    as `samples/epoch0001_T1.0.png` and `samples_T1.0_latest.png`."""

    def __init__(self, run_dir, temperatures=(1.0, 0.8), rows=9, cols=9, seed=0):
        super().__init__()
        self.run_dir, self.temperatures, self.rows, self.cols = run_dir, temperatures, rows, cols
        self.seed = seed

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        kept = f"epoch {epoch + 1} is saved (`sample` draws its grids)"  # the checkpoint came first
        for t in self.temperatures:
            images = sample_images(self.model, self.rows * self.cols, t, self.seed)
            common.save_grid(os.path.join(self.run_dir, "samples", f"epoch{epoch + 1:04d}_T{t}.png"),
                             images, self.rows, self.cols, kept=kept)
            common.save_grid(os.path.join(self.run_dir, f"samples_T{t}_latest.png"),
                             images, self.rows, self.cols, kept=kept)


def sample_images(model, n, temperature, seed=0, batch=32):
    """n images G(F^-1(z)), z ~ N(0, T^2 I), drawn from a fixed numpy seed."""
    dims = model.img_size ** 2 * 3
    noise = np.random.RandomState(seed).randn(n, dims).astype("float32")
    return np.concatenate([ops.convert_to_numpy(model.generate(temperature * noise[i:i + batch]))
                           for i in range(0, n, batch)])


def train(config, out):
    """Train (or resume) the run in `out` (config resolved by `train_config`)."""
    with prepare_run(config, out, Config.MODEL_KEYS) as run:
        files = common.list_image_files(config.data_dir)
        train_files, held_out = split_files(files, config.holdout)
        train_files, _ = common.find_readable_images(train_files, config.img_size)
        if not train_files:
            raise UsageError(f"--data-dir {config.data_dir!r}: no readable image among the "
                             "training files")
        print(f"{len(train_files)} training images, {len(held_out)} held out (the last files "
              f"of the sorted list), {config.img_size}x{config.img_size}", file=sys.stderr)

        def build():
            keras.utils.set_random_seed(config.seed)
            return build_model(config, verbose=True)

        def stream(images_seen):  # a function of its position in the data: resumes exactly
            # (and the same on every worker of a cluster: each keeps its part of every batch)
            return datasets.image_stream(train_files, config.img_size, config.batch_size,
                                         scale_pixels, config.seed, start=images_seen)

        return fit_run(run, config, Config.MODEL_KEYS, build, stream, config.steps_per_epoch,
                       callbacks=[SampleGrids(run.dir, seed=config.seed)])


# =========================================================================== commands on a run

def load_run(args):
    """The config and model of `--out`, with best (or `--weights latest`) weights loaded."""
    path = os.path.join(args.out or "", "config.json")
    if not args.out or not os.path.exists(path):
        raise UsageError(f"--out {args.out!r}: no trained run there (expected {path}); "
                         "train one first with the same --out")
    config = common.read_run_config(path, Config)
    config.jit_compile = False
    config.data_dir = getattr(args, "data_dir", None) or config.data_dir
    weights = os.path.join(args.out, f"{args.weights}.weights.h5")
    if not os.path.exists(weights):
        raise UsageError(f"--weights {args.weights}: {weights} does not exist yet "
                         "(no epoch has finished)")
    model = build_model(config)
    try:
        model.load_weights(weights)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{weights}: cannot load ({e})") from None
    return config, model


def real_images(config, n, seed):
    """n real images in [-1, 1]: held-out files if any (else training files), seeded choice."""
    files = common.list_image_files(config.data_dir)
    train_files, held_out = split_files(files, config.holdout)
    pool, _ = common.find_readable_images(held_out or train_files, config.img_size, verbose=False)
    if not pool:
        raise UsageError(f"--data-dir {config.data_dir!r}: no readable image to use")
    picks = np.random.RandomState(seed).choice(len(pool), n, replace=len(pool) < n)
    return np.stack([scale_pixels(common.load_image(pool[i], config.img_size)).numpy()
                     for i in picks])


def command_sample(args, config, model):
    for t in args.temperatures:
        images = sample_images(model, args.rows * args.cols, t, args.seed)
        print(common.save_grid(os.path.join(args.out, f"sample_T{t}.png"), images,
                               args.rows, args.cols))


def command_sweep(args, config, model):
    """One row per noise draw, one column per temperature: z = T * eps with eps fixed per row."""
    noise = np.random.RandomState(args.seed).randn(args.rows, config.img_size ** 2 * 3)
    z = np.stack([t * noise for t in args.sweep], axis=1).reshape(-1, noise.shape[1])
    images = np.concatenate([ops.convert_to_numpy(model.generate(z[i:i + 32].astype("float32")))
                             for i in range(0, len(z), 32)])
    print(common.save_grid(os.path.join(args.out, "sweep.png"), images, args.rows, len(args.sweep)))


def command_reconstruct(args, config, model):
    """reconstruct.png: 9x9 G(E(x)); reconstruct_pairs.png: per row three triples of
    (original, G(E(x)), G(F^-1(F(E(x))))) - the last goes through the flow both ways."""
    x = real_images(config, args.rows * args.cols, args.seed)
    direct = ops.convert_to_numpy(model.reconstruct(x))
    print(common.save_grid(os.path.join(args.out, "reconstruct.png"), direct, args.rows, args.cols))
    triples = args.rows * (args.cols // 3)
    round_trip = ops.convert_to_numpy(model.generate(model.latent(x[:triples])))
    pairs = np.stack([x[:triples], direct[:triples], round_trip], axis=1).reshape(-1, *x.shape[1:])
    print(common.save_grid(os.path.join(args.out, "reconstruct_pairs.png"), pairs,
                           args.rows, 3 * (args.cols // 3)))


def command_interpolate(args, config, model):
    """interpolate_2.png: per row, `cols` steps linear in z between two real images;
    interpolate_4.png: rows x cols, bilinear in z between four real images at the corners."""
    steps = np.linspace(0.0, 1.0, args.cols, dtype="float32")
    x = real_images(config, 2 * args.rows, args.seed)
    z = ops.convert_to_numpy(model.latent(x))
    z_a, z_b = z[0::2], z[1::2]
    path = (z_a[:, None] * (1 - steps)[None, :, None] + z_b[:, None] * steps[None, :, None])
    images = np.concatenate([ops.convert_to_numpy(model.generate(row)) for row in path])
    print(common.save_grid(os.path.join(args.out, "interpolate_2.png"), images, args.rows, args.cols))

    corners = ops.convert_to_numpy(model.latent(real_images(config, 4, args.seed + 1)))
    a = np.linspace(0.0, 1.0, args.rows, dtype="float32")[:, None, None]
    b = steps[None, :, None]
    grid = ((1 - a) * (1 - b) * corners[0] + (1 - a) * b * corners[1]
            + a * (1 - b) * corners[2] + a * b * corners[3])
    images = np.concatenate([ops.convert_to_numpy(model.generate(row)) for row in grid])
    print(common.save_grid(os.path.join(args.out, "interpolate_4.png"), images, args.rows, args.cols))


def command_evaluate(args, config, model):
    """Mean loss parts (nats/example) and bits/dim on held-out images, dequantised as
    y = (x_int + U(0, 1)) / 256 * 2 - 1 (see the module docstring), one u draw per image."""
    if args.eval_dir:
        files = common.list_image_files(args.eval_dir, flag="--eval-dir")
    else:
        files = split_files(common.list_image_files(config.data_dir), config.holdout)[1]
        if not files:
            raise UsageError(f"--out {args.out!r}: the run holds out no images (--holdout 0); "
                             "pass --eval-dir DIR")
    files, _ = common.find_readable_images(files, config.img_size)
    if not files:
        raise UsageError("no readable image to evaluate")
    keras.utils.set_random_seed(args.seed)
    dataset = datasets.image_dataset(files, config.img_size, min(config.batch_size, len(files)),
                                     dequantise)
    results = model.evaluate(dataset, return_dict=True, verbose=0)
    print(f"evaluated {len(files)} images ({config.img_size}x{config.img_size}, dequantised "
          f"(x_int + U(0,1))/256*2-1), nats per image:")
    for name in FVAE.LOG_NAMES:
        print(f"  {name:13s} {results[name]:.4f}")
    common.write_json(os.path.join(args.out, "evaluate.json"),
                      {"images": len(files), **{k: float(v) for k, v in results.items()}})
    return results


# =========================================================================== command line

COMMANDS = {"train": "train a run, or resume the one in --out (the default command)",
            "sample": "9x9 grids of samples at each temperature",
            "reconstruct": "reconstructions of real images, directly and through the flow",
            "interpolate": "interpolations in z between two and between four real images",
            "sweep": "the same noise at a row of temperatures",
            "evaluate": "loss parts and bits/dim on held-out (or --eval-dir) images"}


def temperature_list(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not values or any(not math.isfinite(t) or t < 0 for t in values):
        raise argparse.ArgumentTypeError(f"{text!r}: temperatures must be numbers >= 0")
    return values


def parse_args(argv=None):
    """The command and its flags (`f_vaes.py COMMAND --help` lists a command's own)."""
    parser, commands = common.command_parser(__doc__, COMMANDS)
    common.add_config_flags(commands["train"], Config)
    commands["train"].add_argument("--out", default=None,
                                   help="run folder (config, weights, log.csv, pictures); the "
                                        "same --out resumes")
    for name in COMMANDS:
        if name == "train":
            continue
        flags = commands[name]
        flags.add_argument("--out", default=None, help="the run folder")
        flags.add_argument("--weights", choices=("best", "latest"), default="best",
                           help="which checkpoint to load (best = lowest epoch loss)")
        flags.add_argument("--seed", type=int, default=0, help="seed of the noise and of the "
                           "choice of images")
        if name in ("reconstruct", "interpolate", "evaluate"):
            flags.add_argument("--data-dir", default=None,
                               help="where the run's image folder is now (default: as saved)")
        if name != "evaluate":
            flags.add_argument("--rows", type=int, default=9, help="rows of the picture")
        if name not in ("evaluate", "sweep"):
            flags.add_argument("--cols", type=int, default=9, help="columns of the picture")
    commands["sample"].add_argument("--temperatures", type=temperature_list, default=[1.0, 0.8],
                                    help="comma-separated temperatures T >= 0")
    commands["sweep"].add_argument("--sweep", type=temperature_list,
                                   default=[round(0.1 * i, 1) for i in range(11)],
                                   help="the temperatures of the columns")
    commands["evaluate"].add_argument("--eval-dir", default=None,
                                      help="every image of this folder instead of the run's "
                                           "held-out files")
    args = parser.parse_args(argv)
    common.check_at_least(args, 1, *[f for f in ("rows", "cols") if hasattr(args, f)])
    return args


def train_config(args):
    """Config for `train`: the flags, with the data folder, hold-out and seed resolved."""
    config = common.config_from_args(Config, args)
    check_config(config)
    if not args.out:
        raise UsageError("--out is required: the run folder to write (or resume)")
    saved_path = os.path.join(args.out, "config.json")
    saved = (common.read_run_json(saved_path, common.config_kinds(Config))
             if os.path.exists(saved_path) else {})
    data_dir = args.data_dir or saved.get("data_dir") or DEFAULT_DATA.get(args.img_size)
    if not data_dir or not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {args.data_dir or data_dir!r}: no such folder (give "
                         "--data-dir, a folder of PNG/JPEG images)")
    config.data_dir = os.path.abspath(data_dir)
    if config.holdout < 0:
        config.holdout = saved.get("holdout", len(common.list_image_files(config.data_dir)) // 20)
    if config.seed < 0:
        config.seed = saved.get("seed", int(np.random.randint(0, 2**31 - 1)))
    return config


def main(argv=None):
    def command():
        args = parse_args(argv)
        if args.command == "train":
            train(train_config(args), args.out)
            return
        config, model = load_run(args)
        {"sample": command_sample, "sweep": command_sweep, "reconstruct": command_reconstruct,
         "interpolate": command_interpolate, "evaluate": command_evaluate}[args.command](
            args, config, model)
    return common.run_main(command)


if __name__ == "__main__":
    sys.exit(main())
