"""f-VAEs: VAEs with a conditional flow posterior (Su & Wu 2018, arXiv 1809.05861).

The model of docs/model.md, "The f-VAE", in TensorFlow 2 / Keras 3, read top to bottom:
config -> encoder E and decoder G -> the loss -> the model -> its description for training
and pictures. The flow F is `layers.MultiScaleFlow` (layers/multiscale.py); pixels, training
on a face folder, sample grids and the commands on a run are shared with Glow (face_runs.py).

    h = E(x)                       encoder, as many numbers as the image (S/8 x S/8 x 192)
    v = exp(s_u) * u + h           u ~ N(0, I); s_u one trainable scalar (init 0)
    z = F(v)                       unconditional multi-scale flow, scored under N(0, I)
    x ~ N(G(v), exp(-t_x)^2)       decoder with one trainable scalar precision exp(t_x) (init 0)

Sampling: z ~ N(0, T^2 I) -> v = F^-1(z) -> image = G(v), T the temperature.

    python f_vaes.py --img-size 64 --data-dir DIR --out RUN_DIR            # train (or resume)
    python f_vaes.py sample --out RUN_DIR --temperatures 1.0,0.8             # 9x9 grids
    python f_vaes.py reconstruct | interpolate | sweep | evaluate --out RUN_DIR
    python f_vaes.py COMMAND --help                                           # its flags

Bits/dim (docs/model.md, "The f-VAE", "Bits per dimension"). With every constant kept (as
below), the loss is an unbiased one-sample estimate of the negative ELBO, in nats, of the
continuous density of images scaled to [-1, 1]:
log q(v|x) = -0.5*sum(u^2) - D*s_u - 0.5*D*log(2*pi) and
-log p(z) = 0.5*sum(z^2) + 0.5*D*log(2*pi), whose constants cancel, so
`prior + entropy - flow_logdet` is exactly log q(z|x) - log p(z) for the sampled z (no
0.5*log(2*pi*e)*D is needed because the sampled -0.5*sum(u^2) is kept, not its mean).
For 8-bit data, y = (x_int + U(0, 1)) / 256 * 2 - 1 puts each pixel value in a bin of
width 2/256, so -log2 P(x_int) <= (nll + D*log(256/2)) / ln 2 (Jensen), and
bits/dim = (nll + D*log(128)) / (D*ln 2). `evaluate` feeds such dequantised held-out
images; training feeds x/255*2-1 (as the author's script does), and its logged bits/dim
applies the same conversion to the training loss (a monitor, not a bound).
"""

import dataclasses
import sys

import tf_setup  # first: TensorFlow's environment (oneDNN), imported without start-up noise
import numpy as np
import tensorflow as tf
import keras
from keras import ops

import cli
import datasets
import face_runs
import pictures
from cli import option
from common import UsageError
from face_runs import LOG_2PI, FaceRunSettings, bits_per_dim, dequantise, scale_pixels
from layers import MultiScaleFlow, Reshape, Squeeze, UnSqueeze
from speedups import BatchNormalization, dead_taps
from training import distribute, guards
from training.monitor import count_parameters
from training.precision import full_precision, networks, to_float32


# =========================================================================== config

LATENT_CHANNELS = 192  # three squeezes of an RGB image: 3 x 4^3; the paper's (and the default) C


@dataclasses.dataclass
class Config(FaceRunSettings):
    """Hyperparameters, named as in docs/model.md, "The f-VAE" (defaults are the paper's
    script)."""
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
    decoder_scale: str = option("learnt", "learnt: the decoder's log-precision t_x is a weight "
                                "trained by Adam (the author's model); calibrated: every "
                                "training step sets it to the batch's optimum t_x* = "
                                "-1/2 ln(mean squared residual) (the sigma-VAE of Rybkin et "
                                "al. 2021; docs/model.md)", choices=("learnt", "calibrated"))

    # A resumed run must keep these (latent_channels: compared only with runs that saved it;
    # earlier runs have 192)
    MODEL_KEYS = ("img_size", "depth", "level", "res_steps", "coupling_width", "seed", "holdout",
                  "latent_channels", "posterior", "decoder_scale", "data_order")
    # absent from older runs, and what a run saved before the key existed had
    ADDED_KEYS = ("latent_channels", "posterior", "decoder_scale", "data_order")
    ASSUMED_BEFORE = {"decoder_scale": "learnt", "data_order": datasets.SHARED_SEED}


def check_config(c):
    """Every bad value is a one-line UsageError naming its flag, before anything is built."""
    cli.check_at_least(c, 1, "batch_size", "epochs", "steps_per_epoch", "depth", "level",
                          "coupling_width")
    cli.check_at_least(c, 0, "res_steps", "nan_patience", "held_out_images")
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
            x = ResidualStep(channels, sync_bn, name=f"encoder_block{block}_res{step}")(x)
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
            x = ResidualStep(channels, sync_bn, name=f"decoder_block{block}_res{step}")(x)
        x, _ = UnSqueeze(2, name=f"unsqueeze_{block}")(x)
    return keras.Model(v, ops.tanh(x), name="decoder")


# =========================================================================== loss

def fvae_loss(x, reconstruction, noise, flow_latent, flow_logdet, log_precision, log_noise_scale):
    """The loss of docs/model.md, "The f-VAE", "The loss" (paper eq. 6 for
    z = F(exp(s_u) * u + E(x))), per example, in nats, with the D image numbers and the d
    latent numbers kept apart (d = D in the paper's model; d < D in the dimension-reducing
    one, where eq. 6 holds as written):

    recon   = -log N(x; G(v), exp(-t_x)^2): 0.5*sum((exp(t_x)*(G(v)-x))^2) + 0.5*log(2pi)*D - D*t_x
    prior   = 0.5*sum(z^2)                  (-log N(z; 0, I) without its 0.5*log(2pi)*d)
    entropy = -0.5*sum(u^2) - d*s_u         (log p(v|x) without its -0.5*log(2pi)*d)
    loss    = recon + prior + entropy - flow_logdet
    The two dropped constants cancel, so `loss` estimates the negative ELBO without bias;
    bits/dim divides by the D image numbers whatever d is.
    """
    dims = int(np.prod(x.shape[1:]))
    latent_dims = int(np.prod(noise.shape[1:]))
    recon = (0.5 * sum_per_example(ops.square(ops.exp(log_precision) * (reconstruction - x)))
             + 0.5 * LOG_2PI * dims - dims * log_precision)
    prior = 0.5 * sum_per_example(ops.square(flow_latent))
    entropy = -0.5 * sum_per_example(ops.square(noise)) - latent_dims * log_noise_scale
    loss = recon + prior + entropy - flow_logdet
    return {"loss": loss, "recon": recon, "prior": prior, "entropy": entropy,
            "flow_logdet": flow_logdet, "bits_per_dim": bits_per_dim(loss, dims),
            "squared_error": squared_error(x, reconstruction)}


def sum_per_example(t):
    return ops.sum(ops.reshape(t, (ops.shape(t)[0], -1)), axis=-1)


def squared_error(x, reconstruction):
    """sum((G(v) - x)^2) per example: what the decoder scale is fitted to (`evaluate`) and
    calibrated on (`calibrated_log_precision`)."""
    return sum_per_example(ops.square(reconstruction - x))


def calibrated_log_precision(x, reconstruction):
    """t_x* = -1/2 ln(mean squared residual over every number of the global batch), the decoder
    log-precision that minimises the batch's summed reconstruction term
    0.5*exp(2t)*sum(r^2) - N*D*t (+ const) (the sigma-VAE's optimal sigma, Rybkin et al.
    2021), as a constant: no gradient flows through it. None needs to: at t_x* the loss's
    derivative in t is 0, so by the envelope theorem the gradient of every other weight is
    the same with or without the path through t_x* (docs/model.md)."""
    total = distribute.replica_sum(ops.sum(ops.square(reconstruction - x)))
    count = distribute.replica_sum(ops.cast(ops.size(x), "float32"))
    return ops.stop_gradient(-0.5 * ops.log(ops.maximum(total / count, 1e-12)))


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


# =========================================================================== model

class FVAE(guards.GuardedModel):
    """E, G, F and the two scalars t_x (log_precision) and s_u (log_noise_scale), trained on
    the mean of `loss_parts`' loss (guards.GuardedModel: non-finite steps are skipped)."""

    LOG_NAMES = ("loss", "recon", "prior", "entropy", "flow_logdet", "bits_per_dim",
                 "squared_error")

    def __init__(self, img_size, level=4, depth=12, res_steps=12, coupling_width=256, seed=0,
                 sync_bn=False, latent_channels=LATENT_CHANNELS, posterior="flow",
                 precision="float32", decoder_scale="learnt", **kwargs):
        super().__init__(dtype=full_precision(), **kwargs)  # the loss, t_x and s_u: float32
        self.img_size = img_size
        self.latent_dims = int(np.prod(latent_shape(img_size, latent_channels)))  # d (D at 192)
        self.gaussian = posterior == "gaussian"
        with networks(precision):  # E, G and the coupling networks; the flow's layers: float32
            self.encoder = build_encoder(img_size, res_steps, sync_bn, latent_channels)
            self.decoder = build_decoder(img_size, res_steps, sync_bn, latent_channels)
            if not self.gaussian:
                self.flow = MultiScaleFlow(latent_shape(img_size, latent_channels), level,
                                           depth, coupling_width, seed, name="flow")
        if self.gaussian:  # the VAE: z = v, log sigma(x) = s_u + Conv1x1_zeroinit(E(x))
            self.flow = Reshape((-1,), source_shape=latent_shape(img_size, latent_channels),
                                name="flatten")
            self.log_scale_head = keras.layers.Conv2D(latent_channels, 1,  # a log-determinant
                                                      kernel_initializer="zeros",
                                                      name="log_scale_head")
        # calibrated: set by every training step (so not trained, the same on every replica),
        # fixed for evaluation: the held-out bound is then a bound at one given t_x
        self.calibrated = decoder_scale == "calibrated"
        self.log_precision = self.add_weight(
            shape=(), initializer="zeros", name="log_precision", trainable=not self.calibrated,
            aggregation="only_first_replica" if self.calibrated else "none")
        self.log_noise_scale = self.add_weight(shape=(), initializer="zeros",
                                               name="log_noise_scale")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.init_trackers()

    def build(self, input_shape):
        """Every layer built by one eager pass on a zero image, with u = 0 given (no draw from
        the training noise stream). Keras would otherwise build a subclassed model by tracing
        its whole call symbolically before the eager pass: about 5 s more of the f-VAE 64's
        build on an AMD EPYC, one run (docs/benchmark.md, "Start-up"). Eager also when the
        first call is being traced (the variables are made outside the graph, as Keras'
        initialisers are)."""
        dtype = self.compute_dtype
        with tf.init_scope():
            u = ops.zeros((1, *self.encoder.output.shape[1:]), dtype)
            self.loss_parts(ops.zeros((1, *input_shape[1:]), dtype), noise=u)

    def loss_parts(self, x, training=False, noise=None):
        """The loss terms per example; `noise` (u) is drawn unless given (tests fix it). On
        several replicas each draws its own rows of the global batch's noise."""
        h = to_float32(self.encoder(x, training=training))
        if noise is None:
            noise = distribute.replica_draw(
                lambda shape: keras.random.normal(shape, seed=self.seed_generator), ops.shape(h))
        if self.gaussian:  # posterior N(h, diag(exp(s_u + head(h))^2)): flow = identity
            log_scale = self.log_noise_scale + self.log_scale_head(h)
            v = ops.exp(log_scale) * noise + h
            reconstruction = to_float32(self.decoder(v, training=training))
            flow_latent, _ = self.flow(v)
            # log|det dv/du| = sum(log sigma(x)) = d*s_u (fvae_loss's entropy term) + the
            # head's sum, which takes the flow log-determinant's place (z = v)
            flow_logdet = ops.sum(ops.reshape(log_scale - self.log_noise_scale,
                                              (ops.shape(h)[0], -1)), axis=-1)
        else:
            v = ops.exp(self.log_noise_scale) * noise + h
            reconstruction = to_float32(self.decoder(v, training=training))
            flow_latent, flow_logdet = self.flow(v)
        return fvae_loss(x, reconstruction, noise, flow_latent, flow_logdet,
                         self.decoder_log_precision(x, reconstruction, training),
                         self.log_noise_scale)

    def decoder_log_precision(self, x, reconstruction, training):
        """t_x of the loss: the trained weight (learnt), or in a calibrated model's training
        step the batch's t_x*, kept in the weight for evaluation and for log.csv."""
        if not (self.calibrated and training):
            return self.log_precision
        log_precision = calibrated_log_precision(x, reconstruction)
        self.log_precision.assign(log_precision)
        return log_precision

    def call(self, x, training=False):
        return self.loss_parts(x, training=training)

    # ----------------------------------------------------------------------- pictures

    def latent(self, x, noise=None):
        """z = F(v) of the posterior draw v = exp(s_u) * u + E(x) with u = `noise` (shaped as
        E(x)), as the author's total_encoder gives it (his random normal layer stays in it);
        without `noise`, u = 0: z = F(E(x)), the flow latent of the posterior mean. (The VAE:
        v = sigma(x) * u + E(x), z = v.)"""
        h = to_float32(self.encoder(x, training=False))
        if noise is not None:
            log_scale = self.log_noise_scale + (self.log_scale_head(h) if self.gaussian else 0.0)
            h = ops.exp(log_scale) * ops.convert_to_tensor(noise, h.dtype) + h
        return self.flow(h)[0]

    def posterior_latent(self, x, seed=0):
        """`latent(x, noise=u)`, u ~ N(0, I) drawn from numpy's `seed`: the z of one posterior
        draw per image, the author's (`interpolate --image-latent draw`)."""
        noise = np.random.RandomState(seed).randn(len(x), *self.encoder.output.shape[1:])
        return self.latent(x, noise=noise.astype("float32"))

    def generate(self, flow_latent):
        """image = G(F^-1(z))."""
        return to_float32(self.decoder(self.flow.inverse(flow_latent), training=False))

    def reconstruct(self, x):
        """G(E(x)), the author's reconstruction (posterior mean, no flow)."""
        return to_float32(self.decoder(self.encoder(x, training=False), training=False))

    # ----------------------------------------------------------------------- for notebooks
    # Images in and out are uint8 (N, S, S, 3), as read from files and as shown.

    @classmethod
    def from_run(cls, out, weights="best"):
        """The trained model of a run folder (`best` or `latest` weights), in one call."""
        return face_runs.load_run(FVAE_RUNS, out, weights)[1]

    def sample(self, n, temperature=1.0, seed=0):
        """n images G(F^-1(z)), z ~ N(0, T^2 I) from numpy's seed, as uint8."""
        return pictures.to_uint8(face_runs.sample_images(self, n, temperature, seed))

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
        one posterior draw u), for uint8 images. Both noises are drawn from numpy's `seed` for
        all images at once: the same seed gives the same numbers, whatever `batch`, and the
        model's own noise stream (training's) is left where it was."""
        x = np.asarray(images, np.float32)
        rng = np.random.RandomState(seed)
        uniform = rng.uniform(size=x.shape).astype(np.float32)
        noise = rng.randn(len(x), *self.encoder.output.shape[1:]).astype(np.float32)
        return np.concatenate([ops.convert_to_numpy(self.loss_parts(
            dequantise(tf.constant(x[i:i + batch]), uniform[i:i + batch]),
            noise=noise[i:i + batch])["bits_per_dim"]) for i in range(0, len(x), batch)])


def build_model(config, verbose=False):
    """The f-VAE of `config`, compiled and built (weights, optimiser slots), ready to load;
    with `verbose`, its parameter counts printed."""
    model = FVAE(config.img_size, config.level, config.depth, config.res_steps,
                 config.coupling_width, config.seed, config.sync_bn, config.latent_channels,
                 config.posterior, config.precision, config.decoder_scale,
                 name="vae" if config.posterior == "gaussian" else "fvae")
    return face_runs.compile_model(model, config, parameter_report if verbose else None)


def parameter_report(model):
    """Counts to compare with docs/model.md ("The f-VAE", "Architecture"). 128x128: E and G
    4,729,536 each, flow + 2 scalars 86,371,010, all 95,830,082, as the author's; 64x64: the
    flow's last level runs on 1x1 maps, where its couplings keep only the centre tap of their
    3x3 kernels (the 37,748,736 others never touch data): flow + 2 scalars 48,622,274, all
    58,081,346. Non-trainable: 12,096 batch-norm statistics and 34,560 permutation indices."""
    count = count_parameters
    permutations = [w for w in model.non_trainable_weights if "permutation" in w.path]
    trainable = count(model.trainable_weights)
    report = [
        f"encoder trainable parameters:        {count(model.encoder.trainable_weights):,}",
        f"decoder trainable parameters:        {count(model.decoder.trainable_weights):,}",
        f"flow + 2 scalars trainable:          "
        f"{count(model.flow.trainable_weights) + 2:,}",
        f"whole model trainable:               {trainable:,}",
    ]
    dead = dead_taps(model)
    if dead:
        report.append(f"  the author's model also stores {dead:,} kernel taps on 1x1 maps that "
                      f"never touch data ({trainable + dead:,} in all; docs/model.md)")
    return report + [
        f"non-trainable batch-norm statistics: "
        f"{count(model.non_trainable_weights) - count(permutations):,}",
        f"non-trainable permutation indices:   {count(permutations):,}",
    ]


# =========================================================================== training and pictures
# Training on a folder of faces, the sample grids after every epoch and the commands on a
# trained run are Glow's too: face_runs.py, given this description of the model.

class LogScalars(keras.callbacks.Callback):
    """The decoder's log-precision t_x, the posterior's log noise scale s_u and exp(s_u) into
    the epoch's logs (log.csv), to follow them over a long run."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            log_noise_scale = float(ops.convert_to_numpy(self.model.log_noise_scale))
            logs.update(log_precision=float(ops.convert_to_numpy(self.model.log_precision)),
                        log_noise_scale=log_noise_scale, noise_scale=float(np.exp(log_noise_scale)))


FVAE_RUNS = face_runs.FaceModel(
    name="fvae", config_class=Config, check=check_config, build=build_model, doc=__doc__,
    commands=face_runs.COMMANDS, temperatures=(1.0, 0.8),
    monitors=(lambda run_dir, config: LogScalars(),),
    quick=dict(depth=2, res_steps=1, coupling_width=32, batch_size=4))

main = FVAE_RUNS.main  # train, sample, reconstruct, ...: `python f_vaes.py --help`
benchmark_setup = FVAE_RUNS.benchmark_setup  # bench/bench.py's model and batch


if __name__ == "__main__":
    sys.exit(main())
