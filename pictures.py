"""Pictures: model pixels to 0..255, grids of images (with labels of their rows and columns if
wanted), PNG files written so that a half-written one never replaces a good one."""

import math
import os

import imageio.v3 as iio
import numpy as np

from common import cannot_write, remove_quietly


def to_uint8(images, value_range=(-1.0, 1.0)):
    """Map model pixels to 0..255: for [-1, 1] this is `(x+1)/2*255`, clipped (the author's
    scripts; docs/model.md, "The f-VAE", "Training and outputs")."""
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


# The query of a neighbour picture: its tile in a frame of this colour, then a white gap
QUERY_FRAME_COLOUR = (214, 39, 40)  # red
QUERY_FRAME = 2  # pixels of frame around each query tile
NEIGHBOUR_GAP = 6  # white pixels after the query column and between blocks of neighbours


def neighbour_grid(queries, blocks, value_range=(-1.0, 1.0)):
    """One row per query: the query tile in a red frame, a white gap, then its neighbours,
    one or more blocks of them (each (rows, k, h, w, 3), a white gap between blocks). The
    frame and the gaps lie around the tiles: no pixel of an image is covered. Returns the
    uint8 picture and the x offset of each block (for labels above it)."""
    queries = to_uint8(queries, value_range)
    blocks = [to_uint8(block, value_range) for block in blocks]
    rows, h, w, c = queries.shape
    frame, gap = QUERY_FRAME, NEIGHBOUR_GAP
    row_height = h + 2 * frame
    offsets = [w + 2 * frame + gap]
    for block in blocks[:-1]:
        offsets.append(offsets[-1] + block.shape[1] * w + gap)
    width = offsets[-1] + blocks[-1].shape[1] * w if blocks else w + 2 * frame
    picture = np.full((rows * row_height, width, c), 255, np.uint8)
    for row in range(rows):
        top = row * row_height
        picture[top:top + row_height, :w + 2 * frame] = QUERY_FRAME_COLOUR
        picture[top + frame:top + frame + h, frame:frame + w] = queries[row]
        for x, block in zip(offsets, blocks):
            strip = block[row].transpose(1, 0, 2, 3).reshape(h, -1, c)  # k tiles side by side
            picture[top + frame:top + frame + h, x:x + strip.shape[1]] = strip
    return picture, offsets


def save_grid(path, images, rows=None, cols=None, value_range=(-1.0, 1.0), kept=None):
    """Write images as one PNG grid (atomically: a half-written PNG never replaces a good one;
    one that cannot be written is a CannotWrite, `kept` saying what is safe)."""
    n = len(images)
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = rows or int(math.ceil(n / cols))
    return write_png(path, image_grid(images, rows, cols, value_range), kept)


def write_png(path, picture, kept=None, max_bytes=None):
    """Write a uint8 picture as PNG through a temporary file: a half-written PNG never
    replaces a good one; one that cannot be written is a CannotWrite, `kept` saying what is
    safe. With `max_bytes`, a picture whose PNG would be larger is stored in 256 colours
    (median cut) instead."""
    tmp = path + ".tmp.png"
    try:
        iio.imwrite(tmp, picture)
        if max_bytes and os.path.getsize(tmp) > max_bytes:
            iio.imwrite(tmp, picture, bits=8)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise cannot_write(path, e, picture.nbytes, kept) from None
    return path


def label_strip(width, cell, labels):
    """A white strip of text labels (label, x offset in pixels) above a picture grid."""
    from PIL import Image, ImageDraw  # imageio's own image library
    height = max(12, cell // 2)
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for text, x in labels:
        draw.text((x + 2, 1), text, fill="black")
    return np.asarray(strip)


def with_labels(picture, tile, column_labels=(), row_labels=(), font_size=11):
    """The picture with a white strip above naming its columns of `tile`-pixel tiles and one
    on the left naming its rows (no strip where no labels are given)."""
    from PIL import Image, ImageDraw, ImageFont  # imageio's own dependency

    font = ImageFont.load_default(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top = font_size + 8 if column_labels else 0
    left = int(max(measure.textlength(text, font) for text in row_labels)) + 10 if row_labels else 0
    height, width = picture.shape[:2]
    canvas = Image.new("RGB", (left + width, top + height), "white")
    canvas.paste(Image.fromarray(np.asarray(picture, np.uint8)), (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(column_labels):
        draw.text((left + (i + 0.5) * tile, top / 2), text, fill="black", font=font, anchor="mm")
    for i, text in enumerate(row_labels):
        draw.text((left - 5, top + (i + 0.5) * tile), text, fill="black", font=font, anchor="rm")
    return np.asarray(canvas)
