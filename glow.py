"""Glow as in the same author's repository (bojone/flow, glow.py): the baseline of the f-VAE
paper (docs/model.md, "Glow, the paper's baseline"), on this project's flow layers.

    x = pixels x/255*2-1, plus U(0, 1/256) noise in training only (the author's dequantisation)
    level i = 0..L-1:  Squeeze; K steps of ActNorm -> Permute -> additive coupling (width 512);
                       if i < L-1: split, CondActNorm on x2 given x1, x2 set aside, go on with x1
                       (layers.MultiScaleFlow with squeeze_first)
    z = concat(set-aside parts, flatten(ActNorm(x)))            D = S*S*3 numbers
    loss = 0.5*sum(z^2) + 0.5*log(2*pi)*D - logdet              nats per image

Sampling: x = F^-1(z), z ~ N(0, T^2 I), T = 0.9 in the author's script. The author's collapse
rule: from epoch 12 on (his `epoch > 10`, Keras counting from 0), an epoch whose loss turns
positive again reloads the best epoch's weights (not the optimiser's state) and sets the
learning rate to 1e-5 (CollapseRule).

    python glow.py --img-size 64                 # train (or resume) into runs/glow64
    python glow.py sample | interpolate | sweep | evaluate --out runs/glow64

Bits/dim follow the f-VAE's convention (f_vaes.py): `evaluate` scores held-out images
dequantised as (x_int + U(0, 1)) / 256 * 2 - 1 and reports (nll + D*log(128)) / (D*ln 2).
Training, sample grids and the commands on a run are the f-VAE's (face_runs.py).
"""

import dataclasses
import os
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
from face_runs import LOG_2PI, FaceRunSettings, bits_per_dim, scale_pixels
from layers import MultiScaleFlow
from training import distribute, guards
from training.checkpoint import weights_attrs
from training.monitor import count_parameters
from training.precision import full_precision, networks

# =========================================================================== config


@dataclasses.dataclass
class Config(FaceRunSettings):
    """The author's glow.py (defaults); the schedule and data flags are the f-VAE's."""
    img_size: int = option(64, "S: a multiple of 2^level (the author's script: 64)")
    batch_size: int = option(64, "images per step (the author's data generator: 64)")
    depth: int = option(10, "flow steps per level (K; the Glow paper uses 32)")
    level: int = option(3, "flow levels (L)")
    coupling_width: int = option(512, "hidden channels of the coupling NN")
    collapse_lr: float = option(1e-5, "the learning rate after a collapse (CollapseRule)")

    MODEL_KEYS = ("img_size", "depth", "level", "coupling_width", "seed", "holdout", "data_order")
    ADDED_KEYS = ("data_order",)  # absent from runs saved before it existed
    ASSUMED_BEFORE = {"data_order": datasets.SHARED_SEED}  # what those runs had


def check_config(c):
    cli.check_at_least(c, 1, "batch_size", "epochs", "steps_per_epoch", "depth", "level",
                          "coupling_width")
    cli.check_at_least(c, 0, "nan_patience", "held_out_images")
    cli.check_positive(c, "lr", "collapse_lr")
    multiple = 2 ** c.level
    if c.img_size < multiple or c.img_size % multiple:
        raise UsageError(f"--img-size {c.img_size}: must be a positive multiple of 2^level = "
                         f"{multiple} with --level {c.level} (e.g. 32, 64 or 128)")


# =========================================================================== loss

def glow_loss(z, logdet, dims):
    """0.5*sum(z^2) + 0.5*log(2*pi)*D - logdet (docs/model.md, "Glow, the paper's baseline"),
    per example, in nats: -log p(x) of the flow's density, exactly (no bound)."""
    prior = 0.5 * ops.sum(ops.square(z), axis=-1) + 0.5 * LOG_2PI * dims
    loss = prior - logdet
    return {"loss": loss, "prior": prior, "logdet": logdet,
            "bits_per_dim": bits_per_dim(loss, dims)}


# =========================================================================== model

class Glow(guards.GuardedModel):
    """The flow and its loss; the same picture interface as f_vaes.FVAE (`latent`,
    `generate`, `latent_dims`), so that the commands on a run (face_runs) work on it."""

    LOG_NAMES = ("loss", "prior", "logdet", "bits_per_dim")

    def __init__(self, img_size, level=3, depth=10, coupling_width=512, seed=0,
                 precision="float32", **kwargs):
        super().__init__(dtype=full_precision(), **kwargs)
        self.img_size = img_size
        self.latent_dims = img_size * img_size * 3
        # the f-VAE's flow with Glow's squeeze at the start of each level, as the author's
        # Glow has it; its coupling networks in `precision`, its own layers in float32
        with networks(precision):
            self.flow = MultiScaleFlow((img_size, img_size, 3), level, depth, coupling_width,
                                       seed, squeeze_first=True, name="flow")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.init_trackers()

    def build(self, input_shape):
        """Every layer built by one eager pass on a zero image (no noise is drawn outside
        training), not by Keras' symbolic trace of the whole call (f_vaes.FVAE.build)."""
        with tf.init_scope():
            self.loss_parts(ops.zeros((1, *input_shape[1:]), self.compute_dtype))

    def loss_parts(self, x, training=False):
        """In training the author's dequantisation, x + U(0, 1/256), drawn per replica row."""
        if training:
            x = x + distribute.replica_draw(
                lambda shape: keras.random.uniform(shape, 0.0, 1.0 / 256,
                                                   seed=self.seed_generator), ops.shape(x))
        z, logdet = self.flow(x)
        return glow_loss(z, logdet, self.latent_dims)

    def call(self, x, training=False):
        return self.loss_parts(x, training=training)

    def latent(self, x):
        """z = F(x)."""
        return self.flow(x)[0]

    def generate(self, z):
        """x = F^-1(z)."""
        return self.flow.inverse(z)

    def encode(self, images):
        return ops.convert_to_numpy(self.latent(scale_pixels(np.asarray(images, np.float32))))

    def decode(self, z):
        return pictures.to_uint8(ops.convert_to_numpy(self.generate(np.asarray(z, np.float32))))


def build_model(config, verbose=False):
    """The Glow of `config`, compiled and built (weights, optimiser slots), ready to load."""
    model = Glow(config.img_size, config.level, config.depth, config.coupling_width,
                 config.seed, config.precision, name="glow")
    return face_runs.compile_model(model, config, parameter_report if verbose else None)


def parameter_report(model):
    return [f"Glow trainable parameters: {count_parameters(model.trainable_weights):,}"]


# =========================================================================== training

class CollapseRule(keras.callbacks.Callback):
    """The author's rule (his glow.py's `Evaluate`): after Keras' epoch `after_epoch` = 10,
    counted from 0 (from log.csv's epoch 12 on), an epoch whose loss turns positive (the loss
    is negative once Glow has learnt) and is not the lowest so far means the model collapsed:
    reload the best epoch's weights and set the learning rate to `lr` (`--collapse-lr`, 1e-5).
    The weights only, as his Keras 2 `load_weights` did: Adam's moments and step count go on
    from this epoch (`load_model_weights`). The reload comes before this epoch's save, so that
    the save holds the reloaded weights. A resumed run starts from the lowest loss of its
    earlier epochs, which best.weights.h5 records."""

    def __init__(self, run_dir, lr=1e-5, after_epoch=10):
        super().__init__()
        self.best = os.path.join(run_dir, "best.weights.h5")
        self.lr, self.after_epoch, self.lowest = lr, after_epoch, None

    def on_train_begin(self, logs=None):
        if self.lowest is None and os.path.exists(self.best):
            recorded = weights_attrs(self.best).get("best")
            if recorded not in (None, ""):
                self.lowest = float(recorded)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or not np.isfinite(loss):
            return
        if self.lowest is None or loss <= self.lowest:
            self.lowest = loss
        elif loss > 0 and epoch > self.after_epoch and os.path.exists(self.best):
            load_model_weights(self.model, self.best)
            self.model.optimizer.learning_rate.assign(self.lr)
            logs["collapsed"] = 1.0
            print(f"epoch {epoch + 1}: loss {loss:.1f} > 0 and not the lowest: the model "
                  f"collapsed; reloaded the weights of {self.best}, learning rate {self.lr:g}",
                  file=sys.stderr, flush=True)


def load_model_weights(model, path):
    """The model's weights from the weights file `path`, its optimiser's state left as it is
    (a resume loads both: training.checkpoint.load_weights)."""
    from keras.src.saving import saving_lib  # `load_weights` has no way to leave it out
    saving_lib.load_weights_only(model, path, objects_to_skip=[model.optimizer])


# =========================================================================== training and pictures
# As the f-VAE's (face_runs.py), with the collapse rule and samples at T = 0.9.

COMMANDS = {name: face_runs.COMMANDS[name]
            for name in ("train", "sample", "interpolate", "sweep", "evaluate")}

GLOW_RUNS = face_runs.FaceModel(
    name="glow", config_class=Config, check=check_config, build=build_model, doc=__doc__,
    commands=COMMANDS, temperatures=(0.9,),
    monitors=(lambda run_dir, config: CollapseRule(run_dir, config.collapse_lr),),
    quick=dict(depth=2, coupling_width=32, batch_size=4))

main = GLOW_RUNS.main  # train, sample, interpolate, sweep, evaluate: `python glow.py --help`
benchmark_setup = GLOW_RUNS.benchmark_setup  # bench/bench.py's model and batch


if __name__ == "__main__":
    sys.exit(main())
