"""What an index takes of an encoder: a function from images to codes and the fingerprint
that says when two encoders' codes are comparable. The images are uint8, decoded from files
the way training decoded them (`read_image`), at the encoder's size.
"""

import dataclasses
import hashlib

import tensorflow as tf

import image_files
from common import UsageError

# What turns a file into the encoder's input; part of the fingerprint, so that an index and
# its queries always see the same pixels. Rounding to uint8 is what training saw
# (datasets.decode_images). The text is stored in every index: it names the loader
# (now image_files.load_image) as it was named when the first indexes were written.
PREPROCESSING = "common.load_image: centre square, area resize with antialias; rounded to uint8"


@dataclasses.dataclass(frozen=True)
class Encoder:
    """An encoder as search by image takes it. `codes_of` maps uint8 images (B, S, S, 3),
    S = img_size, to float32 codes (B, z_dim); `fingerprint` (see `fingerprint`) is what
    makes its codes comparable with an index's; `source` is where it comes from (a run
    folder): recorded in the indexes it builds, and where they go by default."""
    codes_of: object
    fingerprint: dict
    source: str

    @property
    def img_size(self):
        return self.fingerprint["img_size"]

    @property
    def z_dim(self):
        return self.fingerprint["z_dim"]


def fingerprint(weights_path, img_size, pixel_range, z_dim):
    """What makes codes comparable: the encoder's weights (sha256 of the file's bytes), the
    image size, pixel range and code size of its run, and the preprocessing."""
    return {"weights_sha256": file_sha256(weights_path), "img_size": int(img_size),
            "pixel_range": [float(v) for v in pixel_range], "z_dim": int(z_dim),
            "preprocessing": PREPROCESSING}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_differences(saved, current):
    """'img_size 32, not 64' for each part of the fingerprint that differs."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            show = (lambda v: str(v)[:12]) if key == "weights_sha256" else str
            differences.append(f"{key} {show(saved.get(key))}, not {show(current.get(key))}")
    return differences


def check_same_encoder(index_path, saved_fingerprint, encoder, remedy):
    """A one-line UsageError (ending in `remedy`) unless `encoder` made the index's codes."""
    differences = fingerprint_differences(saved_fingerprint, encoder.fingerprint)
    if differences:
        raise UsageError(f"--index {index_path!r} was built by another encoder than the one in "
                         f"{encoder.source!r} ({'; '.join(differences)}); {remedy}")


def read_image(path, img_size):
    """An image file as the encoder sees it (PREPROCESSING): decoded, centre square, resized to
    img_size, rounded to uint8. A tensor; works inside tf.data pipelines."""
    return tf.cast(tf.round(image_files.load_image(path, img_size)), tf.uint8)
