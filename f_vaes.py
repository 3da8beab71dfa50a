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

import tf_setup  # first: TensorFlow's environment (oneDNN), imported without start-up noise
import numpy as np
import tensorflow as tf
import keras
from keras import ops

import common
import pictures
import image_files
import cli
import datasets
from common import UsageError
from cli import option
from layers import (ActNorm, CondActNorm, CoupleWrapper, FlowLayer, Permute, Reshape,
                    SplitChannels, Squeeze, UnSqueeze)
from speedups import BatchNormalization, FusedAdam, SameConv2D
from training import distribute, guards, monitor
from training.run import RunSettings, fit_run, prepare_run

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = {64: os.path.join(HERE, "..", "shared", "data", "celeba", "celeba_64x64"),
                128: os.path.join(HERE, "..", "shared", "data", "celeba", "celeba_fsrnet_128x128")}


# =========================================================================== config

LATENT_CHANNELS = 192  # three squeezes of an RGB image: 3 x 4^3; the paper's (and the default) C


@dataclasses.dataclass
class FaceRunSettings(RunSettings):
    """The schedule and data of the author's face scripts (f-VAEs.py, and glow.py's Config)."""
    data_dir: str = option("", "folder of PNG/JPEG faces, searched recursively (default: the "
                           "shared CelebA folder for --img-size 64 or 128, if present)")
    lr: float = option(1e-4, "Adam learning rate")
    epochs: int = option(1000, "train until this epoch")
    steps_per_epoch: int = option(1000, "steps between checkpoints, sample grids and CSV lines")
    holdout: int = option(-1, "hold out the last N files (sorted) for evaluate; -1: 5%% of them")
    seed: int = option(-1, "seed of permutations, initial weights and noise (-1: draw one, saved "
                       "with the run)")


@dataclasses.dataclass
class Config(FaceRunSettings):
    """Hyperparameters, named as in SPEC.md section 1 (defaults are the paper's script)."""
    img_size: int = option(128, "S: a multiple of 8 x 2^(level-1), e.g. 64 or 128 (the script's "
                           "default; the paper also trains 64)")
    batch_size: int = option(32, "images per step")
    depth: int = option(12, "flow steps per level (K)")
    level: int = option(4, "flow levels (L)")
    res_steps: int = option(12, "residual steps per encoder/decoder block (fewer for quick runs)")
    coupling_width: int = option(256, "hidden channels of the coupling NN (fewer for quick runs)")
    latent_channels: int = option(LATENT_CHANNELS, "C: channels of h = E(x), v and the flow's "
                                  "input at S/8 x S/8; 192 keeps as many numbers as the image, "
                                  "fewer gives the paper's dimension-reducing f-VAE (an even "
                                  "number: the flow halves it at every level)")
    posterior: str = option("flow", "flow: the f-VAE; gaussian: the paper's first special case, "
                            "a VAE with posterior N(E(x), diag(sigma(x)^2)) from the same encoder "
                            "and decoder (no flow)", choices=("flow", "gaussian"))

    # A resumed run must keep these (latent_channels: compared only with runs that saved it;
    # earlier runs have 192)
    MODEL_KEYS = ("img_size", "depth", "level", "res_steps", "coupling_width", "seed", "holdout",
                  "latent_channels", "posterior")
    ADDED_KEYS = ("latent_channels", "posterior")  # absent from runs saved before they existed


def check_config(c):
    """Every bad value is a one-line UsageError naming its flag, before anything is built."""
    cli.check_at_least(c, 1, "batch_size", "epochs", "steps_per_epoch", "depth", "level",
                          "coupling_width")
    cli.check_at_least(c, 0, "res_steps", "nan_patience")
    cli.check_positive(c, "lr")
    if c.latent_channels < 2 or c.latent_channels % 2:
        raise UsageError(f"--latent-channels {c.latent_channels}: must be an even number >= 2 "
                         "(the flow splits the channels in half at every level), e.g. 192, 96, "
                         "48 or 12")
    multiple = 8 * 2 ** (c.level - 1)  # three encoder squeezes, then one per factor-out
    if c.img_size < multiple or c.img_size % multiple:
        raise UsageError(f"--img-size {c.img_size}: must be a positive multiple of "
                         f"8 x 2^(level-1) = {multiple} with --level {c.level} (e.g. 64 or 128)")


def latent_shape(img_size, channels=LATENT_CHANNELS):
    """The shape of h = E(x) and of v: S/8 x S/8 x C, three squeezes of an S x S x 3 image
    when C = 192 (as many numbers as the image)."""
    return (img_size // 8, img_size // 8, channels)


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


def build_encoder(img_size, res_steps, sync_bn=False, latent_channels=LATENT_CHANNELS):
    """E: S x S x 3 -> S/8 x S/8 x 192; three blocks of Squeeze + residual steps (12, 48, 192).
    With C = `latent_channels` other than 192, a 1x1 convolution then maps the 192 channels
    to C (the dimension-reducing f-VAE; none at 192, the paper's model)."""
    image = keras.Input((img_size, img_size, 3))
    x = image
    for block, channels in enumerate((12, 48, 192)):
        x, _ = Squeeze(2, name=f"squeeze_{block}")(x)
        for step in range(res_steps):
            x = ResidualStep(channels, sync_bn, name=f"block{block}_res{step}")(x)
    if latent_channels != LATENT_CHANNELS:
        x = keras.layers.Conv2D(latent_channels, 1, name="to_latent")(x)
    return keras.Model(image, x, name="encoder")


def build_decoder(img_size, res_steps, sync_bn=False, latent_channels=LATENT_CHANNELS):
    """G: the mirror of E (residual steps at 192, 48, 12, each block ending in UnSqueeze), tanh;
    from C channels other than 192, a 1x1 convolution first maps them to 192."""
    v = keras.Input(latent_shape(img_size, latent_channels))
    x = v
    if latent_channels != LATENT_CHANNELS:
        x = keras.layers.Conv2D(LATENT_CHANNELS, 1, name="from_latent")(x)
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

    def __init__(self, shape, squeeze=True, **kwargs):
        super().__init__(**kwargs)
        h, w, c = shape
        self.split = SplitChannels(name="split")
        self.cond_norm = CondActNorm(name="cond_actnorm")
        self.flatten = Reshape((-1,), source_shape=(h, w, c - c // 2), name="flatten")
        self.squeeze = Squeeze(2, name="squeeze") if squeeze else None  # Glow: at level starts

    def call(self, x):
        (x1, x2), _ = self.split(x)
        x2, logdet = self.cond_norm([x2, x1])
        set_aside, _ = self.flatten(x2)
        x = self.squeeze(x1)[0] if self.squeeze else x1
        return x, set_aside, logdet

    def inverse(self, x, set_aside):
        x1 = self.squeeze.inverse(x) if self.squeeze else x
        x2 = self.cond_norm.inverse([self.flatten.inverse(set_aside), x1])
        return self.split.inverse([x1, x2])


class MultiScaleFlow(keras.layers.Layer):
    """F: v (S/8 x S/8 x C) -> z (d = S/8 * S/8 * C numbers), `levels` x `depth` FlowSteps with a
    FactorOut between levels, a final ActNorm, and all parts concatenated (set-aside first).
    In f-VAEs the squeeze ends a level (inside its FactorOut); with `squeeze_first` (Glow, as
    in the author's glow.py) each level starts with one and the FactorOut has none.

    `z, logdet = flow(v)` with logdet = +log|det dz/dv| per example; `flow.inverse(z)` walks
    the same layers backwards.
    """

    def __init__(self, shape, level, depth, width, seed, squeeze_first=False, **kwargs):
        super().__init__(**kwargs)
        seeds = iter(np.random.RandomState(seed).randint(0, 2**31 - 1, size=level * depth))
        h, w, c = shape
        self.steps, self.factor_outs, self.part_sizes, self.squeezes = [], [], [], []
        for i in range(level):
            if squeeze_first:
                self.squeezes.append(Squeeze(2, name=f"level{i}_squeeze"))
                h, w, c = h // 2, w // 2, 4 * c
            self.steps += [FlowStep(c, width, int(next(seeds)), name=f"level{i}_step{k}")
                           for k in range(depth)]
            if i < level - 1:
                self.factor_outs.append(FactorOut((h, w, c), squeeze=not squeeze_first,
                                                  name=f"level{i}_factor_out"))
                self.part_sizes.append(h * w * (c - c // 2))
                h, w, c = (h, w, c // 2) if squeeze_first else (h // 2, w // 2, 4 * (c // 2))
        self.depth = depth
        self.final_norm = ActNorm(name="final_actnorm")
        self.final_flatten = Reshape((-1,), source_shape=(h, w, c), name="final_flatten")
        self.part_sizes.append(h * w * c)

    def levels(self):
        """(its Squeeze or None, steps of level i, its FactorOut or None), in forward order."""
        for i in range(len(self.factor_outs) + 1):
            steps = self.steps[i * self.depth:(i + 1) * self.depth]
            yield (self.squeezes[i] if self.squeezes else None, steps,
                   self.factor_outs[i] if i < len(self.factor_outs) else None)

    def call(self, v):
        x, logdet, set_aside = v, 0.0, []
        for squeeze, steps, factor_out in self.levels():
            if squeeze is not None:
                x, _ = squeeze(x)
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
        for (squeeze, steps, factor_out), part in zip(reversed(list(self.levels())),
                                                      [None] + parts[-2::-1]):
            if factor_out is not None:
                x = factor_out.inverse(x, part)
            for step in reversed(steps):
                x = step.inverse(x)
            if squeeze is not None:
                x = squeeze.inverse(x)
        return x


# =========================================================================== loss

LOG_2PI = math.log(2 * math.pi)


def fvae_loss(x, reconstruction, noise, flow_latent, flow_logdet, log_precision, log_noise_scale):
    """The loss of SPEC.md (paper eq. 6 for z = F(exp(s_u) * u + E(x))), per example, in nats,
    with the D image numbers and the d latent numbers kept apart (d = D in the paper's model;
    d < D in the dimension-reducing one, where eq. 6 holds as written):

    recon   = -log N(x; G(v), exp(-t_x)^2): 0.5*sum((exp(t_x)*(G(v)-x))^2) + 0.5*log(2pi)*D - D*t_x
    prior   = 0.5*sum(z^2)                  (-log N(z; 0, I) without its 0.5*log(2pi)*d)
    entropy = -0.5*sum(u^2) - d*s_u         (log p(v|x) without its -0.5*log(2pi)*d)
    loss    = recon + prior + entropy - flow_logdet
    The two dropped constants cancel, so `loss` estimates the negative ELBO without bias;
    bits/dim divides by the D image numbers whatever d is.
    """
    dims = int(np.prod(x.shape[1:]))
    latent_dims = int(np.prod(noise.shape[1:]))
    sum_per_example = lambda t: ops.sum(ops.reshape(t, (ops.shape(t)[0], -1)), axis=-1)  # noqa: E731
    recon = (0.5 * sum_per_example(ops.square(ops.exp(log_precision) * (reconstruction - x)))
             + 0.5 * LOG_2PI * dims - dims * log_precision)
    prior = 0.5 * sum_per_example(ops.square(flow_latent))
    entropy = -0.5 * sum_per_example(ops.square(noise)) - latent_dims * log_noise_scale
    loss = recon + prior + entropy - flow_logdet
    return {"loss": loss, "recon": recon, "prior": prior, "entropy": entropy,
            "flow_logdet": flow_logdet, "bits_per_dim": bits_per_dim(loss, dims)}


def general_posterior_loss(log_likelihood, latent, noise, posterior_logdet):
    """Paper eq. 6 for any posterior z = F_x(u), u ~ N(0, I), one sample, in nats:
    -log q(x|z) + [log p(z|x) - log q(z)] = -log_likelihood + 0.5*sum(z^2) - 0.5*sum(u^2)
    - log|det dF_x/du|  (the 0.5*log(2pi) constants of prior and posterior cancel).
    With F_x(u) = mu + sigma*u its mean over u is reconstruction + KL(N(mu, sigma^2) || N(0, I));
    with F_x(u) = F(exp(s_u)*u + E(x)) it is `fvae_loss`, where log|det| = flow_logdet + d*s_u.
    """
    flat = lambda t: ops.reshape(t, (ops.shape(t)[0], -1))  # noqa: E731
    return (-log_likelihood + 0.5 * ops.sum(ops.square(flat(latent)), axis=-1)
            - 0.5 * ops.sum(ops.square(flat(noise)), axis=-1) - posterior_logdet)


def bits_per_dim(nll_nats, dims):
    """Nats per example of the density on [-1, 1] -> bits/dim of 8-bit data (bin width 2/256)."""
    return (nll_nats + dims * math.log(128.0)) / (dims * math.log(2.0))


# =========================================================================== model

class FVAE(guards.GuardedModel):
    """E, G, F and the two scalars t_x (log_precision) and s_u (log_noise_scale), trained on
    the mean of `loss_parts`' loss (guards.GuardedModel: non-finite steps are skipped)."""

    LOG_NAMES = ("loss", "recon", "prior", "entropy", "flow_logdet", "bits_per_dim")

    def __init__(self, img_size, level=4, depth=12, res_steps=12, coupling_width=256, seed=0,
                 sync_bn=False, latent_channels=LATENT_CHANNELS, posterior="flow", **kwargs):
        super().__init__(**kwargs)
        self.img_size = img_size
        self.latent_dims = int(np.prod(latent_shape(img_size, latent_channels)))  # d (D at 192)
        self.encoder = build_encoder(img_size, res_steps, sync_bn, latent_channels)
        self.decoder = build_decoder(img_size, res_steps, sync_bn, latent_channels)
        self.gaussian = posterior == "gaussian"
        if self.gaussian:  # the VAE: z = v, log sigma(x) = s_u + Conv1x1_zeroinit(E(x))
            self.flow = Reshape((-1,), source_shape=latent_shape(img_size, latent_channels),
                                name="flatten")
            self.log_scale_head = keras.layers.Conv2D(latent_channels, 1,
                                                      kernel_initializer="zeros",
                                                      name="log_scale_head")
        else:
            self.flow = MultiScaleFlow(latent_shape(img_size, latent_channels), level, depth,
                                       coupling_width, seed, name="flow")
        self.log_precision = self.add_weight(shape=(), initializer="zeros", name="log_precision")
        self.log_noise_scale = self.add_weight(shape=(), initializer="zeros",
                                               name="log_noise_scale")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.init_trackers()

    def loss_parts(self, x, training=False, noise=None):
        """The loss terms per example; `noise` (u) is drawn unless given (tests fix it). On
        several replicas each draws its own rows of the global batch's noise."""
        h = self.encoder(x, training=training)
        if noise is None:
            noise = distribute.replica_draw(
                lambda shape: keras.random.normal(shape, seed=self.seed_generator), ops.shape(h))
        if self.gaussian:  # posterior N(h, diag(exp(s_u + head(h))^2)): flow = identity
            log_scale = self.log_noise_scale + self.log_scale_head(h)
            v = ops.exp(log_scale) * noise + h
            reconstruction = self.decoder(v, training=training)
            flow_latent, _ = self.flow(v)
            # log|det dv/du| = sum(log sigma(x)) = d*s_u (fvae_loss's entropy term) + the
            # head's sum, which takes the flow log-determinant's place (z = v)
            head_logdet = ops.sum(ops.reshape(log_scale - self.log_noise_scale,
                                              (ops.shape(h)[0], -1)), axis=-1)
            return fvae_loss(x, reconstruction, noise, flow_latent, head_logdet,
                             self.log_precision, self.log_noise_scale)
        v = ops.exp(self.log_noise_scale) * noise + h
        reconstruction = self.decoder(v, training=training)
        flow_latent, flow_logdet = self.flow(v)
        return fvae_loss(x, reconstruction, noise, flow_latent, flow_logdet,
                         self.log_precision, self.log_noise_scale)

    def call(self, x, training=False):
        return self.loss_parts(x, training=training)

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

    # ----------------------------------------------------------------------- for notebooks
    # Images in and out are uint8 (N, S, S, 3), as read from files and as shown.

    @classmethod
    def from_run(cls, out, weights="best"):
        """The trained model of a run folder (`best` or `latest` weights), in one call."""
        return load_run(argparse.Namespace(out=out, weights=weights))[1]

    def sample(self, n, temperature=1.0, seed=0):
        """n images G(F^-1(z)), z ~ N(0, T^2 I) from numpy's seed, as uint8."""
        return pictures.to_uint8(sample_images(self, n, temperature, seed))

    def encode(self, images, batch=32):
        """z = F(E(x)) of uint8 images (the posterior mean's flow latent), (N, d)."""
        x = scale_pixels(np.asarray(images, np.float32))
        return np.concatenate([ops.convert_to_numpy(self.latent(x[i:i + batch]))
                               for i in range(0, len(x), batch)])

    def decode(self, z, batch=32):
        """Images G(F^-1(z)) of flow latents z, as uint8."""
        z = np.asarray(z, np.float32)
        return pictures.to_uint8(np.concatenate([ops.convert_to_numpy(self.generate(z[i:i + batch]))
                                               for i in range(0, len(z), batch)]))

    def bits_per_dim(self, images, seed=0, batch=32):
        """Per image: the bound of `evaluate` in bits/dim (dequantised (x_int + U(0, 1)) / 256,
        one posterior draw u), for uint8 images."""
        keras.utils.set_random_seed(seed)
        x = np.asarray(images, np.float32)
        return np.concatenate([ops.convert_to_numpy(
            self.loss_parts(dequantise(tf.constant(x[i:i + batch])))["bits_per_dim"])
            for i in range(0, len(x), batch)])


def build_model(config, verbose=False):
    """The f-VAE of `config`, compiled and built (weights, optimiser slots), ready to load."""
    model = FVAE(config.img_size, config.level, config.depth, config.res_steps,
                 config.coupling_width, config.seed, config.sync_bn, config.latent_channels,
                 config.posterior, name="vae" if config.posterior == "gaussian" else "fvae")
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
    """After every epoch: a 9x9 grid at each temperature (SPEC.md: 1.0 and 0.8), from the same
    z noise each epoch, as `samples/epoch0001_T1.0.png`, `samples_T1.0_latest.png` and a
    TensorBoard image."""

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


def sample_images(model, n, temperature, seed=0, batch=32):
    """n images G(F^-1(z)), z ~ N(0, T^2 I), drawn from a fixed numpy seed."""
    noise = np.random.RandomState(seed).randn(n, model.latent_dims).astype("float32")
    return np.concatenate([ops.convert_to_numpy(model.generate(temperature * noise[i:i + batch]))
                           for i in range(0, n, batch)])


def train(config, out, build=None, model_keys=Config.MODEL_KEYS, monitors=(),
          temperatures=SampleGrids.TEMPERATURES):
    """Train (or resume) the run in `out` (config resolved by `train_config`). glow.py trains
    its model the same way: its `build`, `model_keys`, `monitors` and sample temperatures."""
    build = build or build_model
    with prepare_run(config, out, model_keys) as run:
        files = image_files.list_image_files(config.data_dir)
        train_files, held_out = split_files(files, config.holdout)
        train_files, _ = image_files.find_readable_images(train_files, config.img_size)
        if not train_files:
            raise UsageError(f"--data-dir {config.data_dir!r}: no readable image among the "
                             "training files")
        print(f"{len(train_files)} training images, {len(held_out)} held out (the last files "
              f"of the sorted list), {config.img_size}x{config.img_size}", file=sys.stderr)

        def build_seeded():
            keras.utils.set_random_seed(config.seed)
            return build(config, verbose=True)

        def stream(images_seen):  # a function of its position in the data: resumes exactly
            # (and the same on every worker of a cluster: each keeps its part of every batch)
            return datasets.image_stream(train_files, config.img_size, config.batch_size,
                                         scale_pixels, config.seed, start=images_seen)

        return fit_run(run, config, model_keys, build_seeded, stream, config.steps_per_epoch,
                       monitors=[make(run.dir) for make in monitors],
                       callbacks=[SampleGrids(run.dir, seed=config.seed,
                                              temperatures=temperatures)])


# =========================================================================== commands on a run

def load_run(args, config_class=None, build=None):
    """The config and model of `--out`, with best (or `--weights latest`) weights loaded
    (another script's run with its `config_class` and `build`, e.g. glow.py's)."""
    config_class, build = config_class or Config, build or build_model
    path = os.path.join(args.out or "", "config.json")
    if not args.out or not os.path.exists(path):
        raise UsageError(f"--out {args.out!r}: no trained run there (expected {path}); "
                         "train one first with the same --out")
    config = cli.read_run_config(path, config_class)
    config.jit_compile = False
    config.data_dir = getattr(args, "data_dir", None) or config.data_dir
    weights = os.path.join(args.out, f"{args.weights}.weights.h5")
    if not os.path.exists(weights):
        raise UsageError(f"--weights {args.weights}: {weights} does not exist yet "
                         "(no epoch has finished)")
    model = build(config)
    try:
        model.load_weights(weights)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{weights}: cannot load ({e})") from None
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


def command_sweep(args, config, model):
    """One row per noise draw, one column per temperature: z = T * eps with eps fixed per row."""
    noise = np.random.RandomState(args.seed).randn(args.rows, model.latent_dims)
    z = np.stack([t * noise for t in args.sweep], axis=1).reshape(-1, noise.shape[1])
    images = np.concatenate([ops.convert_to_numpy(model.generate(z[i:i + 32].astype("float32")))
                             for i in range(0, len(z), 32)])
    print(pictures.save_grid(os.path.join(args.out, "sweep.png"), images, args.rows, len(args.sweep)))


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


def command_interpolate(args, config, model):
    """interpolate_2.png: per row, `cols` steps linear in z between two real images;
    interpolate_4.png: rows x cols, bilinear in z between four real images at the corners."""
    steps = np.linspace(0.0, 1.0, args.cols, dtype="float32")
    x = real_images(config, 2 * args.rows, args.seed)
    z = ops.convert_to_numpy(model.latent(x))
    z_a, z_b = z[0::2], z[1::2]
    path = (z_a[:, None] * (1 - steps)[None, :, None] + z_b[:, None] * steps[None, :, None])
    images = np.concatenate([ops.convert_to_numpy(model.generate(row)) for row in path])
    print(pictures.save_grid(os.path.join(args.out, "interpolate_2.png"), images, args.rows, args.cols))

    corners = ops.convert_to_numpy(model.latent(real_images(config, 4, args.seed + 1)))
    a = np.linspace(0.0, 1.0, args.rows, dtype="float32")[:, None, None]
    b = steps[None, :, None]
    grid = ((1 - a) * (1 - b) * corners[0] + (1 - a) * b * corners[1]
            + a * (1 - b) * corners[2] + a * b * corners[3])
    images = np.concatenate([ops.convert_to_numpy(model.generate(row)) for row in grid])
    print(pictures.save_grid(os.path.join(args.out, "interpolate_4.png"), images, args.rows, args.cols))


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
    keras.utils.set_random_seed(args.seed)
    dataset = datasets.image_dataset(files, config.img_size, min(config.batch_size, len(files)),
                                     dequantise)
    samples = getattr(args, "samples", 1)
    if samples > 1:
        results = importance_weighted(model, dataset, samples)
    else:
        results = model.evaluate(dataset, return_dict=True, verbose=0)
    results["reconstruction_rmse"] = reconstruction_rmse(model, files, config.img_size)
    print(f"evaluated {len(files)} images ({config.img_size}x{config.img_size}, dequantised "
          f"(x_int + U(0,1))/256*2-1), K = {samples} posterior sample(s), nats per image "
          f"(reconstruction_rmse: G(E(x)) against x, in pixel values 0..255):")
    for name in (*model.LOG_NAMES, "reconstruction_rmse"):
        if results.get(name) is not None:
            print(f"  {name:13s} {results[name]:.4f}")
    common.write_json(os.path.join(args.out, "evaluate.json"),
                      {"images": len(files), "samples": samples,
                       **{k: None if v is None else float(v) for k, v in results.items()}})
    return results


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
    the `loss` and `bits_per_dim` of evaluate (the other parts: their mean over the draws)."""
    bounds, parts = [], {name: [] for name in model.LOG_NAMES if name not in ("loss", "bits_per_dim")}
    for x in dataset:
        draws = [model.loss_parts(x) for _ in range(samples)]  # a new u each call
        bounds.append(iwae_bound([ops.convert_to_numpy(d["loss"]) for d in draws]))
        for name in parts:
            parts[name].append(np.mean([ops.convert_to_numpy(d[name]) for d in draws], axis=0))
    loss = float(np.mean(np.concatenate(bounds)))
    dims = model.img_size ** 2 * 3
    return {"loss": loss, "bits_per_dim": float(bits_per_dim(loss, dims)),
            **{name: float(np.mean(np.concatenate(v))) for name, v in parts.items()}}


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

COMMANDS = {"train": "train a run, or resume the one in --out (the default command)",
            "sample": "9x9 grids of samples at each temperature",
            "reconstruct": "reconstructions of real images, directly and through the flow",
            "interpolate": "interpolations in z between two and between four real images",
            "sweep": "the same noise at a row of temperatures",
            "evaluate": "loss parts and bits/dim on held-out (or --eval-dir) images",
            "encode": "z and bits/dim of every image of a folder, to .npy and .csv",
            "export": "SavedModels of the sampler and the encoder, and inference-only weights"}


def temperature_list(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not values or any(not math.isfinite(t) or t < 0 for t in values):
        raise argparse.ArgumentTypeError(f"{text!r}: temperatures must be numbers >= 0")
    return values


def add_run_command_flags(commands, default_temperatures=(1.0, 0.8)):
    """The flags of the commands on a trained run ({name: sub-parser}; glow.py shares them)."""
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
    commands["evaluate"].add_argument("--eval-dir", default=None,
                                      help="every image of this folder instead of the run's "
                                           "held-out files")
    commands["evaluate"].add_argument("--samples", type=int, default=1, metavar="K",
                                      help="posterior samples per image: K > 1 gives the "
                                           "importance-weighted bound, tighter than the ELBO")


def parse_args(argv=None, doc=__doc__, command_help=None, config_class=None, run_name="fvae",
               temperatures=(1.0, 0.8)):
    """The command and its flags (`f_vaes.py COMMAND --help` lists a command's own); glow.py
    builds its command line here with its own docstring, commands, config and names."""
    parser, commands = cli.command_parser(doc, command_help or COMMANDS)
    cli.add_config_flags(commands["train"], config_class or Config)
    commands["train"].add_argument("--out", default=None,
                                   help="run folder (config, weights, log.csv, pictures); the "
                                        f"same --out resumes (default: runs/{run_name}<img-size>)")
    add_run_command_flags(commands, temperatures)
    args = parser.parse_args(argv)
    cli.check_at_least(args, 1, *[f for f in ("rows", "cols", "samples") if hasattr(args, f)])
    return args


def train_config(args, config_class=None, check=None, run_name="fvae"):
    """Config for `train`: the flags, with the run folder, data folder, hold-out and seed
    resolved (glow.py: its config class, its checks, its name)."""
    config = cli.config_from_args(config_class or Config, args)
    (check or check_config)(config)
    args.out = args.out or os.path.join("runs", f"{run_name}{config.img_size}")
    return resolve_run_data(config, args)


def resolve_run_data(config, args):
    """The data folder (the flag, else the run's, else the shared faces of that size; kept
    relative), the hold-out (-1: 5 %) and the seed (-1: drawn once) of a run to train."""
    saved_path = os.path.join(args.out, "config.json")
    saved = (common.read_run_json(saved_path, cli.config_kinds(type(config)))
             if os.path.exists(saved_path) else {})
    data_dir = (args.data_dir or saved.get("data_dir")
                or (os.path.relpath(DEFAULT_DATA[args.img_size]) if args.img_size in DEFAULT_DATA
                    else None))
    if not data_dir or not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {args.data_dir or data_dir!r}: no such folder (give "
                         "--data-dir, a folder of PNG/JPEG images)")
    config.data_dir = data_dir  # as given: a run folder holds no absolute path (--data-dir moves it)
    if config.holdout < 0:
        config.holdout = saved.get("holdout", len(image_files.list_image_files(config.data_dir)) // 20)
    if config.seed < 0:
        config.seed = saved.get("seed", int(np.random.randint(0, 2**31 - 1)))
    return config


def main(argv=None, script=None):
    """The command line of this script, or of `script` (glow.py: its parse_args, train_config,
    train, Config and build_model, with the same commands on a run)."""
    script = script or sys.modules[__name__]

    def command():
        args = script.parse_args(argv)
        if args.command == "train":
            script.train(script.train_config(args), args.out)
            return
        config, model = load_run(args, script.Config, script.build_model)
        {"sample": command_sample, "sweep": command_sweep, "reconstruct": command_reconstruct,
         "interpolate": command_interpolate, "evaluate": command_evaluate,
         "encode": command_encode, "export": command_export}[args.command](
            args, config, model)
    return common.run_main(command)


if __name__ == "__main__":
    sys.exit(main())
