"""Turn a folder or a zip file of face photographs (e.g. CelebA's official aligned and cropped
`img_align_celeba.zip`, 178x218 JPEGs) into a folder of SIZE x SIZE JPEGs, the folders the
f-VAE reads by default:

    python tools/prepare_faces.py img_align_celeba.zip data/celeba_64x64 --size 64
    python tools/prepare_faces.py img_align_celeba.zip data/celeba_128x128 --size 128

(A zip's members are read in place, without unpacking it; the folder they share, such as
`img_align_celeba/`, is left out of the written paths.)

Each image goes through the training loader's own steps (its centred square, an area
resize to SIZE, `image_files.load_image`) and is written as a JPEG of quality 95 under the
same relative path. The scripts can also read the original folder directly (they do the
same steps at load time); a prepared folder only makes every epoch's decoding cheaper.
Files already written are skipped, so an interrupted run goes on where it stopped;
unreadable files are named and left out.
"""

import argparse
import os
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_setup  # noqa: E402,F401  (first: TensorFlow's environment, quiet start-up)
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import image_files  # noqa: E402


def images_of(source):
    """[(relative path, a function that gives the decoded uint8 image)] of a folder or a zip."""
    if source.lower().endswith(".zip") and os.path.isfile(source):
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            common.fail(f"SOURCE {source}: not a readable zip file")
        names = sorted(n for n in archive.namelist() if n.lower().endswith(
            image_files.IMAGE_EXTENSIONS) and not os.path.basename(n).startswith("."))
        shared = os.path.commonpath([os.path.dirname(n) for n in names]) if names else ""
        return [(os.path.relpath(n, shared or "."), lambda n=n: tf.io.decode_image(
            archive.read(n), channels=3, dtype=tf.uint8, expand_animations=False))
                for n in names]
    return [(os.path.relpath(path, source), lambda path=path: image_files.decode_rgb(path))
            for path in image_files.list_image_files(source, flag="SOURCE")]


def prepare(source, target, size, quality=95):
    """Write every readable image of `source` (a folder, or a zip file) as a `size` x `size`
    JPEG under `target`; returns (written, skipped as already there, unreadable)."""
    files = images_of(source)
    written = kept = 0
    bad = []
    for i, (relative, decode) in enumerate(files, 1):
        path = os.path.join(source, relative)
        if i % 1000 == 0:
            print(f"{i}/{len(files)} files", file=sys.stderr)
        out = os.path.join(target, os.path.splitext(relative)[0] + ".jpg")
        if os.path.exists(out):
            kept += 1
            continue
        try:
            image = image_files.square_resized(decode(), size)
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            print(f"warning: {path}: not a readable image ({type(e).__name__}), left out",
                  file=sys.stderr)
            bad.append(path)
            continue
        data = tf.io.encode_jpeg(tf.cast(tf.round(image), tf.uint8), quality=quality).numpy()
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "wb") as f:  # renamed when whole: a killed run leaves no half file
            f.write(data)
        os.replace(out + ".tmp", out)
        written += 1
    return written, kept, bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder of face images (PNG/JPEG, searched recursively), "
                                       "or a zip file of them")
    parser.add_argument("target", help="folder to write the SIZE x SIZE JPEGs into")
    parser.add_argument("--size", type=int, default=64, help="side in pixels (default: 64)")
    args = parser.parse_args()
    if args.size < 8:
        common.fail(f"--size {args.size}: expected a side of at least 8 pixels")
    written, kept, bad = prepare(args.source, args.target, args.size)
    print(f"{written} written, {kept} already there, {len(bad)} unreadable -> {args.target}")


if __name__ == "__main__":
    common.run_main(main)
