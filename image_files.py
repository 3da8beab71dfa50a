"""Image files: finding them in a folder, reading their size from the header without decoding
them (PNG, JPEG, GIF, BMP, WebP), decoding one to a centred square of a given size, and
sorting a list into readable and unreadable files before any training starts."""

import concurrent.futures
import contextlib
import os
import struct
import sys
import warnings

import tensorflow as tf

from common import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# An image whose header says it has more pixels is skipped before it is decoded: 50 megapixels
# (e.g. 8660 x 5773) are 150 MB decoded and 600 MB as load_image's float32 copy; a decompression
# bomb (a tiny file whose header claims 100,000 x 100,000) would be 30 GB.
MAX_IMAGE_PIXELS = 50_000_000


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


def decode_rgb(path):
    """File → uint8 (h, w, 3). Greyscale and RGBA become RGB; 16-bit PNGs are scaled to 8 bits."""
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    return image


def centre_square(image):
    """The centred square of an (h, w, c) image: rows (h-w)/2 .. (h-w)/2+w when taller than wide
    (the f-VAE's data, docs/model.md, "The f-VAE", "Training and outputs"), and the same for
    columns when wider than tall."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def load_image(path, img_size):
    """Decode one file, take its centred square, resize it to float32 (img_size, img_size, 3)
    and round it to 8-bit values 0..255, as the author's `imresize` returned uint8 (so that
    the dequantisation noise and bits/dim are those of 8-bit images); half to even, as
    `pictures.to_uint8` rounds."""
    return square_resized(decode_rgb(path), img_size)


def square_resized(image, img_size):
    """`load_image` of an already decoded uint8 (h, w, 3) image."""
    image = centre_square(image)
    image = tf.image.resize(tf.cast(image, tf.float32), (img_size, img_size), method="area",
                            antialias=True)
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))


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
            image = decode_rgb(path) if img_size is None else load_image(path, img_size)
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
                              "(image_files.MAX_IMAGE_PIXELS), not decoded", stacklevel=2)
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
