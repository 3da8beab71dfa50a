"""Turn a folder of face photographs (e.g. CelebA's official aligned and cropped
`img_align_celeba`, 178x218 JPEGs) into a folder of SIZE x SIZE JPEGs, the form of the
folders the f-VAE reads by default:

    python tools/prepare_faces.py img_align_celeba data/celeba_64x64 --size 64
    python tools/prepare_faces.py img_align_celeba data/celeba_128x128 --size 128

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_setup  # noqa: E402,F401  (first: TensorFlow's environment, quiet start-up)
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import image_files  # noqa: E402


def prepare(source, target, size, quality=95):
    """Write every readable image of `source` as a `size` x `size` JPEG under `target`;
    returns (written, skipped as already there, unreadable)."""
    files = image_files.list_image_files(source, flag="SOURCE")
    written = kept = 0
    bad = []
    for i, path in enumerate(files, 1):
        if i % 1000 == 0:
            print(f"{i}/{len(files)} files", file=sys.stderr)
        out = os.path.join(target, os.path.splitext(os.path.relpath(path, source))[0] + ".jpg")
        if os.path.exists(out):
            kept += 1
            continue
        try:
            image = image_files.load_image(path, size)
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
    parser.add_argument("source", help="folder of face images (PNG/JPEG, searched recursively)")
    parser.add_argument("target", help="folder to write the SIZE x SIZE JPEGs into")
    parser.add_argument("--size", type=int, default=64, help="side in pixels (default: 64)")
    args = parser.parse_args()
    if args.size < 8:
        common.fail(f"--size {args.size}: expected a side of at least 8 pixels")
    written, kept, bad = prepare(args.source, args.target, args.size)
    print(f"{written} written, {kept} already there, {len(bad)} unreadable -> {args.target}")


if __name__ == "__main__":
    common.run_main(main)
