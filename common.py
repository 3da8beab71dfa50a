"""Small plumbing both scripts share: errors and the command line, image files, picture
grids, JSON files. The training machinery lives in `training/`, the data sets in
`datasets.py`."""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import struct
import sys
import tempfile
import warnings

import numpy as np
import tensorflow as tf
import imageio.v3 as iio

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# An image whose header says it has more pixels is skipped before it is decoded: 50 megapixels
# (e.g. 8660 x 5773) are 150 MB decoded and 600 MB as load_image's float32 copy; a decompression
# bomb (a tiny file whose header claims 100,000 x 100,000) would be 30 GB.
MAX_IMAGE_PIXELS = 50_000_000


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: argument --epochs: ...`) and exit status 2: the
    usage block is one `--help` away and would push the reason off a short terminal."""

    def error(self, message):
        fail(f"{message} (see --help)")



def command_parser(doc, commands):
    """A parser with one sub-parser per command ({name: help}, the first the default), each
    showing its flags' defaults; returns (parser, {name: sub-parser}). `parse_args` of a
    command line that starts with a flag runs the default command: `script.py --epochs 5`
    is `script.py train --epochs 5`."""
    parser = CommandParser(description=doc.split("\n\n")[0],
                           epilog=f"{next(iter(commands))} is the default command; "
                                  "COMMAND --help lists its flags")
    parser.default_command = next(iter(commands))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    return parser, {name: sub.add_parser(name, help=text, description=text,
                                         formatter_class=DefaultsHelpFormatter)
                    for name, text in commands.items()}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once, after its help: none for a flag without a default (None) or
    whose help already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CommandParser(ArgumentParser):
    """`ArgumentParser` whose command may be left out (then it is the default one)."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if not args or (args[0] not in self._subparsers._group_actions[0].choices
                        and args[0] not in ("-h", "--help")):
            args.insert(0, self.default_command)
        return super().parse_args(args, namespace)


def flag_name(key):
    """The command-line flag of a configuration key: img_size -> --img-size."""
    return "--" + key.replace("_", "-")


def option(default, help, **flag):
    """A configuration field that is also a command-line flag, `--field-name`, with its help
    text; `flag` goes to argparse (type, choices, metavar, aliases: old spellings)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def add_config_flags(parser, config_class):
    """One flag per `option` field of the dataclass (the script's own fields first, those it
    inherits last), its default taken from the field, so that a name, a default and a help
    text are each written once. A bool field is `--x/--no-x`; a field whose default is None
    names its type."""
    fields = [f for f in dataclasses.fields(config_class) if "help" in f.metadata]

    def declared_by(field):  # 0: the class itself, 1: its base, ...
        return next(i for i, cls in enumerate(config_class.__mro__)
                    if field.name in cls.__dict__.get("__annotations__", {}))

    for field in sorted(fields, key=declared_by):
        flag = dict(field.metadata)
        names = [flag_name(field.name), *flag.pop("aliases", ())]
        if isinstance(field.default, bool) or flag.get("type") is bool:
            flag.pop("type", None)
            flag["action"] = argparse.BooleanOptionalAction
        elif field.default is not None:
            flag.setdefault("type", type(field.default))
        parser.add_argument(*names, dest=field.name, default=field.default, **flag)


def config_from_args(config_class, args):
    """The dataclass of the parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def config_from_json(config_class, saved):
    """The dataclass of a saved config.json (keys it no longer has are ignored)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in saved.items() if k in names})


def config_kinds(config_class):
    """{field: (its type, whether null is allowed)} of a config dataclass, for `read_run_json`:
    null where the field's default is None."""
    return {f.name: (f.type, f.default is None) for f in dataclasses.fields(config_class)}


def read_run_config(path, config_class):
    """The dataclass saved in a run's config.json, checked by `read_run_json` against the
    fields' types (the model's keys, `MODEL_KEYS`, must be there)."""
    required = [k for k in getattr(config_class, "MODEL_KEYS", ())
                if k not in getattr(config_class, "ADDED_KEYS", ())]
    return config_from_json(config_class, read_run_json(path, config_kinds(config_class),
                                                        required=required))


def check_at_least(config, minimum, *names):
    """`--epochs 0: must be at least 1` (`must be 0 or more` for 0), the one wording of a
    too-small number (None: unset)."""
    expected = "0 or more" if minimum == 0 else f"at least {minimum}"
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise UsageError(f"{flag_name(name)} {value}: must be {expected}")


def check_positive(config, *names):
    """`--lr 0.0: must be a positive number`."""
    for name in names:
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag_name(name)} {value}: must be a positive number")


# --------------------------------------------------------------------------- image files

def list_image_files(folder, flag="--data-dir"):
    """Every PNG/JPEG under `folder`, recursively, any case of extension, sorted."""
    if not folder or not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder!r}: no such folder (expected a folder of PNG/JPEG images)")
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names)
                     if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not files:
        raise UsageError(f"{flag} {folder!r}: no .png/.jpg/.jpeg files found (searched recursively)")
    return files


def image_header_size(path):
    """(width, height, pixels to decode) from the header of an image file, read without decoding
    it: PNG's IHDR, JPEG's start of frame, BMP's info header, WebP's VP8/VP8L/VP8X chunk, and
    for GIF the logical screen and every frame's descriptor (giflib reads every frame of an
    animation into memory before TensorFlow takes the first: the pixels are those of all
    frames). None for a file in none of these formats (the decoder refuses it). OSError if
    the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
        elif head.startswith(b"\xff\xd8"):
            return _jpeg_header_size(f)
        elif head[:6] in (b"GIF87a", b"GIF89a"):
            return _gif_header_size(f)
        elif head.startswith(b"BM") and len(head) >= 26:
            if struct.unpack("<I", head[14:18])[0] == 12:  # the old OS/2 header: 16-bit sizes
                width, height = struct.unpack("<HH", head[18:22])
            else:
                width, height = struct.unpack("<ii", head[18:26])  # height < 0: top-down
        elif head.startswith(b"RIFF") and head[8:12] == b"WEBP" and len(head) >= 30:
            chunk = head[12:16]
            if chunk == b"VP8 ":
                width, height = (v & 0x3FFF for v in struct.unpack("<HH", head[26:30]))
            elif chunk == b"VP8L":
                bits = struct.unpack("<I", head[21:25])[0]
                width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            elif chunk == b"VP8X":
                width = int.from_bytes(head[24:27], "little") + 1
                height = int.from_bytes(head[27:30], "little") + 1
            else:
                return None
        else:
            return None
    width, height = abs(width), abs(height)
    return width, height, width * height


def _jpeg_header_size(f):
    """The size in the first start-of-frame marker, walking the segments from the start."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":  # stray bytes between segments: skip them
            byte = f.read(1)
        while byte == b"\xff":  # fill bytes
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0x01, *range(0xD0, 0xD9)):  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2 or marker in (0xD9, 0xDA):  # end of image, start of scan: no frame
            return None
        length = struct.unpack(">H", length)[0]
        if length < 2:  # a damaged segment (and no walking backwards)
            return None
        if marker in (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                      *range(0xCD, 0xD0)):
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height, width * height
        f.seek(length - 2, os.SEEK_CUR)


def _gif_header_size(f):
    """The logical screen, and the pixels of every frame (image descriptor) of the file,
    walking its blocks without decompressing them; stops once they pass MAX_IMAGE_PIXELS."""
    f.seek(6)
    screen = f.read(7)
    if len(screen) < 7:
        return None
    width, height, flags = struct.unpack("<HHB", screen[:5])
    if flags & 0x80:  # global colour table
        f.seek(3 * 2 ** ((flags & 7) + 1), os.SEEK_CUR)
    pixels = 0

    def skip_sub_blocks():
        while True:
            size = f.read(1)
            if not size or size == b"\0":
                return
            f.seek(size[0], os.SEEK_CUR)

    while pixels <= MAX_IMAGE_PIXELS:
        block = f.read(1)
        if block == b"\x21":  # extension: label, then sub-blocks
            f.read(1)
            skip_sub_blocks()
        elif block == b"\x2c":  # a frame: position, size, flags, colours, LZW data
            descriptor = f.read(9)
            if len(descriptor) < 9:
                break
            frame_width, frame_height, frame_flags = struct.unpack("<HHB", descriptor[4:9])
            pixels += frame_width * frame_height
            if frame_flags & 0x80:
                f.seek(3 * 2 ** ((frame_flags & 7) + 1), os.SEEK_CUR)
            f.read(1)  # LZW minimum code size
            skip_sub_blocks()
        else:  # the trailer, or the end of a truncated file
            break
    return width, height, max(pixels, width * height)


def _decode_rgb(path):
    """File → uint8 (h, w, 3). Greyscale and RGBA become RGB; 16-bit PNGs are scaled to 8 bits."""
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    return image


def centre_square(image):
    """The centred square of an (h, w, c) image: rows (h-w)/2 .. (h-w)/2+w when taller than wide
    (SPEC.md, f-VAE data), and the same for columns when wider than tall."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def load_image(path, img_size):
    """Decode one file, take its centred square, resize it to float32 (img_size, img_size, 3)
    with values in [0, 255]."""
    image = centre_square(_decode_rgb(path))
    image = tf.image.resize(tf.cast(image, tf.float32), (img_size, img_size), method="area",
                            antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def find_readable_images(files, img_size=None, verbose=True):
    """Split `files` into (readable, unreadable) by decoding each once, in parallel.

    An unreadable file (empty, truncated, not an image, a text file named .png) is reported
    with a warning naming it and a count at the end, and is left out of training, so a
    bad file can never stop a run in the middle of an epoch. So is a file whose header says
    it has more than MAX_IMAGE_PIXELS pixels (a decompression bomb, a huge scan, a long
    animated GIF): it is never decoded, so that memory and time stay bounded.
    """
    files = list(files)
    if not files:
        return [], []
    def header_size(path):
        with contextlib.suppress(OSError):  # unreadable: the decoder says so below
            return image_header_size(path)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # file opens wait, the GIL is free
        sizes = dict(zip(files, pool.map(header_size, files)))
    too_large = {f: size for f, size in sizes.items() if size and size[2] > MAX_IMAGE_PIXELS}
    decoded = [f for f in files if f not in too_large]
    readable = set()
    if decoded:
        def check(index, path):
            # the very function training uses, so that a file that passes cannot fail mid-epoch
            image = _decode_rgb(path) if img_size is None else load_image(path, img_size)
            return index, tf.reduce_max(image)  # a value, not a shape: the decode must run

        ok = tf.data.Dataset.zip((tf.data.Dataset.range(len(decoded)),
                                  tf.data.Dataset.from_tensor_slices(decoded)))
        ok = ok.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        readable = {decoded[int(i)] for i, _ in ok.as_numpy_iterator()}
    unreadable = [f for f in files if f not in readable]
    if verbose:
        for f in unreadable:
            if f in too_large:
                width, height, pixels = too_large[f]
                size = (f"its header says {width} x {height} pixels," if pixels == width * height
                        else f"the frames of its {width} x {height} animation add up to")
                warnings.warn(f"skipping image {f}: {size} more than the "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels allowed "
                              "(common.MAX_IMAGE_PIXELS), not decoded", stacklevel=2)
            else:
                warnings.warn(f"skipping unreadable image {f}", stacklevel=2)
        if unreadable:
            print(f"skipped {len(unreadable)} unreadable image file(s) of {len(files)}"
                  + (f" ({len(too_large)} of them too large to decode)" if too_large else ""),
                  file=sys.stderr)
    return [f for f in files if f in readable], unreadable


def scan_image_folder(folder, img_size=None, flag="--data-dir"):
    """The readable images of a folder (recursively), or a clear UsageError before any training:
    unreadable files are skipped with a warning naming each, and a folder with none left is
    an error naming the folder."""
    files = list_image_files(folder, flag)
    readable, unreadable = find_readable_images(files, img_size)
    if not readable:
        raise UsageError(f"{flag} {folder!r}: none of its {len(files)} image file(s) could be read "
                         f"(first: {unreadable[0]})")
    return readable



# --------------------------------------------------------------------------- pictures

def to_uint8(images, value_range=(-1.0, 1.0)):
    """Map model pixels to 0..255: for [-1, 1] this is `(x+1)/2*255`, clipped (SPEC.md)."""
    lo, hi = value_range
    images = (np.asarray(images, dtype=np.float32) - lo) / (hi - lo) * 255.0
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def image_grid(images, rows, cols, value_range=(-1.0, 1.0)):
    """Tile (rows*cols, h, w, 3) images, row by row, into one (rows*h, cols*w, 3) uint8 picture."""
    images = to_uint8(images, value_range)
    n, h, w, c = images.shape
    if n < rows * cols:
        images = np.concatenate([images, np.zeros((rows * cols - n, h, w, c), np.uint8)])
    images = images[:rows * cols].reshape(rows, cols, h, w, c)
    return images.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_grid(path, images, rows=None, cols=None, value_range=(-1.0, 1.0), kept=None):
    """Write images as one PNG grid (atomically: a half-written PNG never replaces a good one;
    one that cannot be written is a CannotWrite, `kept` saying what is safe)."""
    n = len(images)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = rows or int(math.ceil(n / cols))
    return write_png(path, image_grid(images, rows, cols, value_range), kept)


def write_png(path, picture, kept=None):
    """Write a uint8 picture as PNG through a temporary file: a half-written PNG never
    replaces a good one; one that cannot be written is a CannotWrite, `kept` saying what is
    safe."""
    tmp = path + ".tmp.png"
    try:
        iio.imwrite(tmp, picture)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise cannot_write(path, e, picture.nbytes, kept) from None
    return path


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

