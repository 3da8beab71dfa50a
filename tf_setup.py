"""TensorFlow's environment for both scripts, set before it is imported, and its import
without the start-up noise.

Import this module before TensorFlow. It
- turns on TensorFlow's oneDNN kernels for convolutions and matmuls on x86 CPUs, which are
  on by default only on recent Intel CPUs; elsewhere (an AMD AVX2 machine, 2026-11-22) they
  ran these models' training steps 1.3-1.5x faster than the default Eigen kernels
  (docs/benchmark.md). `TF_ENABLE_ONEDNN_OPTS=0` turns them off; no effect on GPUs;
- imports TensorFlow with the C++ start-up lines it prints before its logging is set up
  (absl's "All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
  "Could not find cuda drivers") left out of stderr; every other line still gets through.
`visible_gpus()` asks for the GPUs in the same way (the question prints "failed call to
cuInit" on a machine without one).
"""

import contextlib
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations are on"
                   r"|Could not find cuda drivers|failed call to cuInit"
                   r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc"
                   r"|This TensorFlow binary is optimized|To enable the following instructions")


@contextlib.contextmanager
def without_startup_noise():
    """Run the block with file descriptor 2 (where TensorFlow's C++ code writes) caught, then
    write what it caught to stderr, less the lines NOISE matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not NOISE.search(line):
                    sys.stderr.write(line)


with without_startup_noise():
    import tensorflow  # noqa: E402,F401
    tensorflow.config.list_physical_devices("GPU")  # CUDA's one attempt to start, here, quietly


def visible_gpus():
    """The GPUs TensorFlow sees (none on a CPU-only machine, quietly)."""
    with without_startup_noise():
        return tensorflow.config.list_physical_devices("GPU")
