"""A pytest plugin (loaded by conftest.py): no child process outlives the test that started it."""

import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_child_process_outlives_its_test(monkeypatch):
    """Every child process a test starts (subprocess.Popen, run) and leaves running is killed
    when the test ends: a test that pytest.ini's time limit (pytest-timeout) stops while it
    waits on a hung child fails alone, and the child does not slow down the tests after it."""
    started = []
    popen_init = subprocess.Popen.__init__

    def tracked_init(self, *args, **kwargs):
        popen_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", tracked_init)
    yield
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait(30)
