"""Test-only fault injection, kept out of the production code: two hooks wrapped around the
real data stream and the real save, turned on by environment variables.

- TEST_NAN_AT_STEPS=2,5: those training steps' batches (1 = the run's first step, counted
  across resumes at a fixed batch size) are made all-NaN inside the input pipeline, so that
  the real compiled step sees a non-finite loss, gradients and batch statistics.
- TEST_PAUSE_IN_SAVE=EPOCH:SECONDS: the end-of-epoch saves of that epoch pause between
  writing the temporary file and renaming it, so that a test can kill the process there.
- TEST_PAUSE_IN_INDEX_COMMIT=IMAGES:SECONDS: an indexing (search/update.py) pauses before it
  commits the progress record that marks IMAGES or more images encoded (their codes are
  written, the record not yet), so that a test can kill the process there.

In the test process, conftest.py calls `install()`; a child process runs a script through

    python tests/fault_hooks.py f_vaes.py ARGS...

which installs them and then runs the script as `python f_vaes.py ARGS...` would.
"""

import os
import runpy
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the scripts set it, before TensorFlow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NAN_STEPS_ENV = "TEST_NAN_AT_STEPS"
PAUSE_ENV = "TEST_PAUSE_IN_SAVE"
INDEX_PAUSE_ENV = "TEST_PAUSE_IN_INDEX_COMMIT"


def install():
    """Wrap `datasets.finish_stream` and `training.checkpoint.commit` (once), and
    `search.update.commit_progress` when TEST_PAUSE_IN_INDEX_COMMIT asks for it."""
    if os.environ.get(INDEX_PAUSE_ENV):
        install_index_pause()
    import tensorflow as tf
    import datasets
    from training import checkpoint

    if getattr(datasets.finish_stream, "fault_hook", False):
        return
    finish_stream, commit = datasets.finish_stream, checkpoint.commit

    def poisoned_finish_stream(ds, first_step=0):
        steps = [int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()]
        if steps:
            poisoned = tf.constant(steps, tf.int64)

            def poison(index, batch):
                hit = tf.reduce_any(tf.equal(index + 1, poisoned))
                return tf.where(hit, batch * float("nan"), batch)

            ds = ds.enumerate(int(first_step)).map(poison)
        return finish_stream(ds, first_step)

    def pausing_commit(tmp, path, previous=None, attrs=None):
        pause, attrs = os.environ.get(PAUSE_ENV, ""), attrs or {}
        if (pause and attrs.get("epochs_done") == int(pause.split(":")[0])
                and not attrs.get("steps_done")):
            print(f"pausing before renaming {tmp}", file=sys.stderr, flush=True)
            time.sleep(float(pause.split(":")[1]))
        return commit(tmp, path, previous, attrs)

    poisoned_finish_stream.fault_hook = True
    datasets.finish_stream, checkpoint.commit = poisoned_finish_stream, pausing_commit


def install_index_pause():
    """Pause in `search.update.commit_progress` as TEST_PAUSE_IN_INDEX_COMMIT says (once)."""
    from search import update

    if getattr(update.commit_progress, "fault_hook", False):
        return
    commit_progress = update.commit_progress
    images, seconds = os.environ[INDEX_PAUSE_ENV].split(":")

    def pausing_commit_progress(update_dir, progress):
        if progress["encoded"] >= int(images):
            print(f"pausing before committing {progress['encoded']} encoded images",
                  file=sys.stderr, flush=True)
            time.sleep(float(seconds))
        return commit_progress(update_dir, progress)

    pausing_commit_progress.fault_hook = True
    update.commit_progress = pausing_commit_progress


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    install()
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
