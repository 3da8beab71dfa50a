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
