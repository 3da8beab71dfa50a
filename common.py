"""Errors and exits every script shares, and files written safely: atomic replacement,
all-or-nothing appends, a one-line error for a full disk, and JSON read back with its types
checked. The command line is `cli.py`, image files `image_files.py`, pictures `pictures.py`;
the training machinery lives in `training/`, the data sets in `datasets.py`."""

import json
import os
import shutil
import signal
import sys
import tempfile


class UsageError(ValueError):
    """Bad flag, path or data detected before any work is done (the scripts exit with 2)."""


class TrainingStopped(RuntimeError):
    """A run that cannot go on safely (weights not finite, rollbacks that do not help, a save
    that cannot be written); its last checkpoint is intact. The scripts exit with 1."""
    exit_code = 1


class CannotWrite(TrainingStopped):
    """A file that could not be written (a full disk, a quota), made by `cannot_write`: the
    file it would have replaced, and every earlier save, are intact. The scripts exit with 1."""


class Interrupted(TrainingStopped):
    """Ctrl-C or SIGTERM during training, after the run was saved; exit 128 + signal number."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def fail(message):
    """Print a one-line error naming the flag or path and exit with status 2 (argparse's code)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def stop(error):
    """Print why a run stopped (one line, after what Keras printed) and exit with its code."""
    print(f"\n{'stopped' if isinstance(error, Interrupted) else 'error'}: {error}", file=sys.stderr)
    sys.exit(error.exit_code)


def run_main(command):
    """`command()` as a script's whole run: 0, or the exit a user should see. A bad
    flag, path or file exits 2 with one line; a run that stopped (after saving) exits with its
    code; Ctrl-C before training started, or a second one, exits saying nothing was saved."""
    try:
        command()
        return 0
    except UsageError as e:
        fail(str(e))
    except TrainingStopped as e:
        stop(e)
    except KeyboardInterrupt:
        stop(Interrupted("nothing saved since the last save"))


def ensure_writable_dir(path, flag="--out"):
    """Create `path` if needed and check that a file can be written there, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path, prefix=".write_test") as f:
            f.write("ok")  # a name of its own: two commands starting at once may both probe
            f.flush()
    except OSError as e:
        raise UsageError(f"{flag} {path!r}: cannot write there ({e.strerror or e})") from None
    return path


# --------------------------------------------------------------------------- files

def write_json(path, obj, kept=None):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True), kept)


def write_text(path, text, kept=None):
    """Replace a file's text atomically: a temporary file, synced, then renamed. One that cannot
    be written (a full disk) leaves the old file as it was, removes the temporary one and
    raises CannotWrite (`kept`: what else is safe, for its message)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise cannot_write(path, e, len(text.encode()), kept) from None


def append_text(path, text, kept=None):
    """Append to a file all of `text` or nothing: a write that fails (a full disk) cuts the file
    back to its length before, so that it never ends in half a line, and raises CannotWrite."""
    size = os.path.getsize(path) if os.path.exists(path) else None
    try:
        with open(path, "a", newline="") as f:
            f.write(text)
            f.flush()
    except OSError as e:
        try:
            if size is None:
                os.remove(path)
            else:
                os.truncate(path, size)  # frees space, needs none
        except OSError:
            pass
        raise cannot_write(path, e, len(text.encode()), kept) from None


def cannot_write(path, error, needed=None, kept=None):
    """The one-line CannotWrite for a file that could not be written: what, why, about how much
    space it needs and how much is free there, what is intact, and what to do."""
    why = (os.strerror(error.errno) if getattr(error, "errno", None)
           else str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    space = []
    if needed:
        space.append(f"it needs about {human_size(needed)}")
    try:
        space.append(f"{human_size(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)}"
                     " free there")
    except OSError:
        pass
    return CannotWrite(f"cannot write {path} ({why})" + (f": {', '.join(space)}" if space else "")
                       + f"; {kept or 'the file it would replace is intact'}: free some space "
                       "and run the same command again")


def human_size(count):
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def read_json(path):
    with open(path) as f:
        return json.load(f)


JSON_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              list: "a list", tuple: "a list", dict: "an object"}


def is_json_kind(value, kind):
    """Whether a value read from JSON fits the Python type `kind`: a list for a tuple, an
    integer also for a float, true/false for a bool only."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, list if kind is tuple else kind)


def read_run_json(path, kinds, required=(), fix="repair it, or move the run folder away"):
    """The JSON object in a run folder's file (config.json, state.json), checked before anything
    uses it: `kinds` maps keys to (type, null allowed); `required` keys must be there and not
    null. A file that is not JSON, not an object, without a required key or with a value of
    another type (damaged, or edited by hand) is a one-line UsageError naming the file and the
    key, never a traceback, and `fix`, what to do; the file is left as it is."""
    fix = f"damaged or edited by hand? {fix}"
    try:
        saved = read_json(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise UsageError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path}: holds {short_repr(saved)}, not a JSON object; {fix}")
    for key in required:
        if saved.get(key) is None:
            raise UsageError(f"{path}: key {key!r} is {'null' if key in saved else 'missing'}; "
                             f"{fix}")
    for key, (kind, nullable) in kinds.items():
        if key not in saved or (saved[key] is None and nullable):
            continue
        if not is_json_kind(saved[key], kind):
            raise UsageError(f"{path}: key {key!r} is {short_repr(saved[key])}, expected "
                             f"{JSON_KINDS.get(kind, kind.__name__)}; {fix}")
    return saved


def short_repr(value, width=40):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."

