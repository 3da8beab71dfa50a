"""Run a script's command line, then save the trained model's state, for tests/test_distribute.py:

    python tests/train_and_dump.py OUT.npz f_vaes|infomax ARGS...

runs `SCRIPT.main(ARGS)` unchanged, except that the model its `train` returns (f_vaes and
glow: face_runs.train, which their `main` calls) is saved to OUT.npz (every weight, then every optimiser variable, in order), so that the test can compare
what each worker process of a multi-worker run ended with.
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(out, script, *argv):
    import fault_hooks  # the NaN steps of TEST_NAN_AT_STEPS, if set
    fault_hooks.install()
    module = importlib.import_module(script)
    trainer = importlib.import_module("face_runs") if script in ("f_vaes", "glow") else module
    train = trainer.train

    def train_and_dump(*args, **kwargs):
        model = train(*args, **kwargs)
        import numpy as np
        np.savez(out, *[v.numpy() for v in model.weights + model.optimizer.variables])
        return model

    trainer.train = train_and_dump
    return module.main(list(argv))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
