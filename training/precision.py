"""The precision a run computes in (`--precision`), and where low precision may go.

    float32          everything in float32
    mixed_bfloat16   the networks' convolutions, matmuls and activations in bfloat16
    mixed_float16    the same in float16, with Keras' dynamic loss scaling
    auto             mixed_bfloat16 where the hardware runs bfloat16 natively (a CPU with AMX
                     or AVX512-BF16, a GPU of compute capability 8.0 or later), else float32

Weights and optimiser state are float32 in every precision (Keras' mixed policies keep the
variables in float32 and cast them where a layer computes), so a run saved in one precision
resumes in another. Only the layers built inside `networks(precision)` compute in low
precision: the encoders, decoders, coupling networks and discriminators. Everything that
decides a likelihood or an inverse stays float32: the flow's state path and its layers
(they compute in the weights' dtype, whatever the global policy), every log-determinant, the
loss and its parts; each network's output is cast back to float32 where it leaves it.
"""

import contextlib

import keras

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (Linux); an empty set where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_capabilities():
    """The compute capability (major, minor) of each GPU TensorFlow sees (none on a CPU)."""
    import tensorflow as tf
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return capabilities


def hardware_runs_bfloat16(gpus=None, flags=None):
    """Whether bfloat16 is native here: on GPUs, all of compute capability 8.0 (Ampere) or
    later; without one, a CPU with AMX or AVX512-BF16 units (oneDNN uses them)."""
    gpus = gpu_capabilities() if gpus is None else gpus
    if gpus:
        return all(tuple(c) >= (8, 0) for c in gpus)
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def resolve(precision, gpus=None, flags=None):
    """The policy `precision` stands for here: `auto` becomes mixed_bfloat16 or float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "mixed_bfloat16" if hardware_runs_bfloat16(gpus, flags) else "float32"
    return precision


def describe(precision, gpus=None, flags=None):
    """What `precision` means here, for the line a run prints when it starts."""
    gpus = gpu_capabilities() if gpus is None else gpus
    flags = cpu_flags() if flags is None else flags
    policy = resolve(precision, gpus, flags)
    if precision != "auto":
        return policy
    if gpus:
        why = "GPU compute capabilities " + ", ".join(f"{a}.{b}" for a, b in gpus)
    else:
        units = sorted(set(BFLOAT16_CPU_FLAGS) & flags)
        why = "this CPU has " + (" and ".join(units) if units else "no bfloat16 units")
    return f"{policy} (--precision auto: {why})"


def full_precision():
    """The dtype of the weights and of everything outside the networks: float32 (float64
    where the global policy is float64, as tests/mirrored_step.py sets it)."""
    return keras.config.dtype_policy().variable_dtype


@contextlib.contextmanager
def networks(precision):
    """Layers built inside compute in `precision` (resolved); the global policy is restored
    after, so that nothing built elsewhere is affected. float32 leaves the global policy as
    it is."""
    before = keras.config.dtype_policy()
    policy = resolve(precision)
    if policy != "float32":
        keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def to_float32(x):
    """A network's output, back in float32 (`full_precision`) where it enters a likelihood, a
    flow or a loss."""
    return keras.ops.cast(x, full_precision())


def wrap_optimizer(optimizer, precision):
    """float16 needs its loss scaled (gradients below 6e-8 vanish in it): Keras'
    LossScaleOptimizer, dynamic, around `optimizer`; bfloat16 has float32's range and needs
    none."""
    if resolve(precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def in_float32(model):
    """`model` itself where it computes in float32, else a float32 copy with its weights (the
    same layers and names): what evaluation runs, so that k-NN, probes and bounds never
    depend on the precision a run trained in."""
    dtype = full_precision()
    if all(layer.compute_dtype == dtype for layer in model._flatten_layers()):
        return model

    def float32_layer(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    copy = keras.models.clone_model(model, clone_function=float32_layer)
    copy.set_weights(model.get_weights())
    return copy
