"""Guards of a training step: a step whose loss or gradients are not finite changes
nothing (`apply_if_finite`), the epoch's means leave it out (`AppliedMean`), it is counted
(`SkippedSteps`), and too many in a row roll the run back to its best save with a lower
learning rate (`NonFiniteRollback`)."""

import tensorflow as tf
import keras
from keras import ops

from common import TrainingStopped
from training import distribute
from training.checkpoint import load_weights

def all_finite(tensors):
    """One boolean tensor: every value of every tensor (None skipped) is finite."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors if t is not None]))


def snapshot(variables):
    """(variable, value now) for the float variables a forward pass changes by itself (batch-norm
    statistics), read before that pass, so that a skipped step can put them back."""
    return [(v, tf.identity(v.value)) for v in variables if "float" in str(v.dtype)]


def apply_if_finite(optimizer, loss, gradients, variables, restore=()):
    """`optimizer.apply(gradients, variables)` only if the loss and every gradient are finite
    on every replica; otherwise nothing changes: not the weights, not the optimiser state
    (its step count included), and the `restore` pairs of `snapshot` are put back.
    Returns the decision as a boolean tensor, the same on every replica.

    Under tf.distribute the non-finite count is all-reduced first, so every replica (and
    worker) takes the same branch. A `cond` in a replica context cannot hold a merge_call
    (which `optimizer.apply` makes), so where the strategy needs merge_call the cond runs in
    cross-replica context, as in Keras' LossScaleOptimizer._tf_apply. No host round trip:
    the step runs unchanged on a GPU and under XLA.
    """
    restore = list(restore)
    finite = all_finite([loss, *gradients])
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        non_finite = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                        1.0 - ops.cast(finite, "float32"))
        finite = ops.equal(non_finite, 0.0)

    def apply(gradients):
        optimizer.apply(gradients, variables)

    def undo(values):
        for (variable, _), value in zip(restore, values):
            variable.assign(value)

    values = [value for _, value in restore]
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # mixed_float16: the optimiser unscales, applies only finite gradients and otherwise
        # lowers its loss scale (an overflow is how it finds the scale); the step is skipped
        # all the same, batch-norm statistics put back
        optimizer.apply(gradients, variables)
        ops.cond(finite, lambda: None, lambda: undo(values))
        return finite
    if context is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
        ops.cond(finite, lambda: apply(gradients), lambda: undo(values))
    else:
        def cross_replica(distribution, finite, gradients, values):
            decision = distribution.experimental_local_results(finite)[0]  # equal on all
            ops.cond(decision,
                     lambda: distribution.extended.call_for_each_replica(apply, args=(gradients,)),
                     lambda: distribution.extended.call_for_each_replica(undo, args=(values,)))

        context.merge_call(cross_replica, args=(finite, gradients, values))
    return finite


class AppliedMean(keras.metrics.Mean):
    """The epoch mean of a logged value over the steps that were applied; NaN while none was.
    A skipped step's NaN does not poison the epoch's number, and an epoch of skipped steps
    does not look like a loss of 0 (which would make it the best)."""

    def update_state(self, values, applied=True):
        values = ops.cast(values, self.dtype)
        weights = ops.cast(applied, self.dtype) * ops.ones_like(values)
        super().update_state(ops.where(applied, values, ops.zeros_like(values)),
                             sample_weight=weights)

    def result(self):
        return ops.where(self.count > 0, ops.divide_no_nan(self.total, self.count), float("nan"))


class SkippedSteps(keras.metrics.Metric):
    """Steps of the epoch whose update was skipped (non-finite loss or gradients). Every
    replica takes the same decision and counts it; a read across replicas takes the first
    replica's count (not the sum), so each skipped step counts once under tf.distribute."""

    def __init__(self, name="skipped_steps", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total",
                                       aggregation="only_first_replica")

    def update_state(self, applied):
        self.total.assign_add(1.0 - ops.cast(applied, self.dtype))

    def reset_state(self):
        self.total.assign(0.0)

    def result(self):
        return ops.convert_to_tensor(self.total)


class NonFiniteRollback(keras.callbacks.Callback):
    """After `patience` non-finite (skipped) steps in a row, reload the best weights (else the
    latest save) with their optimiser state, divide the learning rate by `factor`, and log it
    (stderr, events.log; RunCheckpoint's CSV has a `learning_rate` column). The author's Glow did this
    by hand. The lowered rate is in the optimiser state, so it survives a resume. After
    `max_rollbacks` rollbacks with no new best epoch in between, the run stops
    (TrainingStopped): lowering the rate again would not help. `patience` 0: only skip.
    """

    FACTOR = 10.0  # the learning rate is divided by this at each rollback

    def __init__(self, checkpoint, patience=20, max_rollbacks=3):
        super().__init__()
        self.checkpoint, self.patience, self.factor = checkpoint, patience, self.FACTOR
        self.max_rollbacks = max_rollbacks
        self.streak, self.rollbacks, self._best_at_rollback = 0, 0, None
        self._skipped_before = self._last_batch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._skipped_before, self._last_batch = 0.0, -1

    def on_train_batch_end(self, batch, logs=None):
        skipped = float((logs or {}).get("skipped_steps", 0.0))
        steps = batch - self._last_batch  # more than 1 with steps_per_execution > 1
        self.streak = self.streak + steps if skipped > self._skipped_before else 0
        self._skipped_before, self._last_batch = skipped, batch
        if self.patience and self.streak >= self.patience:
            self.roll_back()

    def roll_back(self):
        if self.checkpoint.best_value != self._best_at_rollback:
            self.rollbacks = 0  # a new best since the last rollback: that one helped
        if self.rollbacks >= self.max_rollbacks:
            message = (f"{self.streak} non-finite steps in a row again after {self.rollbacks} "
                       f"rollbacks without a better epoch; stopping (the saves are intact)")
            self.checkpoint.log_event(message, echo=False)
            raise TrainingStopped(message)
        learning_rate = self.model.optimizer.learning_rate
        before = float(learning_rate.numpy())
        source = None
        for path in (self.checkpoint.best, self.checkpoint.latest):
            try:
                load_weights(self.model, path)  # weights, batch-norm statistics, Adam moments
                source = path
                break
            except Exception:  # noqa: BLE001 - missing or unreadable: try the next one
                continue
        learning_rate.assign(before / self.factor)
        self.rollbacks += 1
        self._best_at_rollback = self.checkpoint.best_value
        self.checkpoint.log_event(
            f"{self.streak} non-finite steps in a row (epoch {self.checkpoint.epochs_done + 1}, "
            f"step {self.checkpoint.steps_done}): "
            + (f"rolled back to {source}" if source else "no readable save yet, kept the weights "
               "(no step was applied since the first non-finite one)")
            + f", learning rate {before:.3g} -> {before / self.factor:.3g}")
        self.streak = 0


class GuardedModel(keras.Model):
    """A model trained on the "loss" of its `loss_parts(x, training)` (per example, or already
    the batch's mean): one Adam step on the mean over the global batch, applied only if the
    loss and gradients are finite (else the step, batch-norm statistics included, is undone
    and counted as skipped), with the epoch means of every part in LOG_NAMES. The f-VAE, Glow
    and InfoMax train through it. Call `init_trackers()` at the end of `__init__`."""

    LOG_NAMES = ("loss",)

    def init_trackers(self):
        self.trackers = {name: AppliedMean(name=name) for name in self.LOG_NAMES}
        self.skipped = SkippedSteps()

    @property
    def metrics(self):
        return [*self.trackers.values(), self.skipped]

    def loss_parts(self, x, training=False):
        raise NotImplementedError

    def _track(self, parts, applied=True):
        for name, tracker in self.trackers.items():
            tracker.update_state(parts[name], applied)
        return distribute.step_logs({metric.name: metric.result() for metric in self.metrics})

    def train_step(self, x):
        statistics = snapshot(self.non_trainable_variables)
        with tf.GradientTape() as tape:
            parts = self.loss_parts(x, training=True)
            loss = parts["loss"]
            if len(loss.shape):  # per example (a mean already is used as it is)
                loss = ops.mean(loss)
            loss = distribute.replica_share(loss)  # the mean over the global batch
            scaled = self.optimizer.scale_loss(loss)  # mixed_float16 only; else the loss itself
        gradients = tape.gradient(scaled, self.trainable_variables)
        applied = apply_if_finite(self.optimizer, loss, gradients, self.trainable_variables,
                                  restore=statistics)
        self.skipped.update_state(applied)
        return self._track(parts, applied)

    def test_step(self, x):
        return self._track(self.loss_parts(x, training=False))
