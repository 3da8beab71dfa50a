"""The per-test time limit (pytest-timeout, set in pytest.ini) with tests/child_processes.py:
a test that hangs waiting on a child process fails by itself, the run goes on, and the child
is killed."""

import configparser
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HANGING_TESTS = '''
import subprocess
import sys


def test_waits_on_a_hung_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open("child.pid", "w").write(str(child.pid))
    child.wait()  # no timeout of its own: only the time limit ends this test


def test_after_the_hung_one():
    pass
'''


def test_a_test_hung_on_a_child_process_fails_alone_and_its_child_is_killed(tmp_path):
    (tmp_path / "test_hanging.py").write_text(HANGING_TESTS)
    start = time.time()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "child_processes",
         "-c", os.path.join(ROOT, "pytest.ini"), "-o", "timeout=3", "test_hanging.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests")))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout and "Timeout" in run.stdout, run.stdout
    assert time.time() - start < 60
    pid = int((tmp_path / "child.pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"the hung test's child {pid} is still running")


def test_the_default_suite_has_a_time_limit_per_test():
    """pytest.ini sets it: generous for the slowest test (~40 s), well under the 10 minutes the
    whole default suite should stay within."""
    ini = configparser.ConfigParser()
    ini.read(os.path.join(ROOT, "pytest.ini"))
    assert 60 <= int(ini["pytest"]["timeout"]) <= 300
    assert ini["pytest"]["timeout_method"] == "signal"  # the thread method would end the whole run
