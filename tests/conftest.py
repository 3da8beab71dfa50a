import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as f_vaes.py and infomax.py set it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

import fault_hooks  # noqa: E402  (test-only NaN batches and paused saves, off unless asked)
from child_processes import no_child_process_outlives_its_test  # noqa: E402, F401 (autouse)

fault_hooks.install()


def load_experiment(name):
    """A script of experiments/ (not a package) as a module, e.g. load_experiment("bf16_noise")."""
    import importlib.util
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
