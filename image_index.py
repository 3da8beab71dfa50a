"""Search by image (以图搜图) over a folder: index every image once with a trained InfoMax
encoder, keep the index up to date, query it in milliseconds.

    index = Index.build("photos/", "runs/dim-cifar10")        # or again: only what changed
    matches = Index.open(index.path).search(["query.jpg"], k=9)
    python infomax.py index --out runs/dim-cifar10 --folder photos/
    python infomax.py search --out runs/dim-cifar10 --folder photos/ --query query.jpg

An index is a folder:
    index.json              what the codes are: the image folder, the encoder and its
                            fingerprint, the current generation's file names, the unreadable
                            files; replacing it (atomically) is what commits an update
    codes-<gen>.npy         float32 (N, z_dim): row i is mu of files-<gen>.csv's row i
                            (np.load(..., mmap_mode="r") reads it without loading it)
    files-<gen>.csv         row, path (relative to the folder, "/"-separated), size, mtime_ns
    approximate-<gen>.faiss an optional approximate index (faiss) and, in index.json, its
                            recall against the exact search
    .update/                an indexing in progress (see `Update`); a killed one resumes

Rows are sorted by path, so an index updated after adds, changes and deletions is the one
indexing the folder from scratch gives. A file is new or changed when its path, size or
modification time is; only those are encoded. An index belongs to one encoder: its weights
file's sha256, image size, pixel range, code size and preprocessing (`fingerprint`); another
encoder is refused.
"""

import csv
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import time
import warnings

import numpy as np
import tensorflow as tf
import keras

import code_search
import common
import pictures
import image_files
import infomax
from common import UsageError, read_json, write_json

FORMAT = 1
# What turns a file into the encoder's input; part of the fingerprint, so that an index and
# its queries always see the same pixels. Rounding to uint8 is what training saw
# (datasets.decode_images) and what infomax.embed takes.
PREPROCESSING = "common.load_image: centre square, area resize with antialias; rounded to uint8"
BATCH_SIZE = 256
COMMIT_EVERY = 8192  # images between committed chunks of an indexing (what a kill can lose)


# =========================================================================== files and encoder

@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One image file of the folder as the index knows it: its path relative to the folder
    ("/"-separated), size in bytes and modification time in nanoseconds."""
    path: str
    size: int
    mtime_ns: int


def scan_folder(folder, flag="--folder"):
    """Every PNG/JPEG under `folder` (recursively, as `image_files.list_image_files`) with its size
    and modification time, sorted by relative path. Unreadable files are found later, once,
    by the encoding itself."""
    files = []
    for full in image_files.list_image_files(folder, flag):
        try:
            stat = os.stat(full)
        except OSError:  # gone since it was listed
            continue
        relative = os.path.relpath(full, folder).replace(os.sep, "/")
        files.append(ImageFile(relative, stat.st_size, stat.st_mtime_ns))
    return sorted(files, key=lambda f: f.path)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoder_files(encoder_folder):
    """(config, weights path) of a run's encoder, or the one-line UsageError of load_encoder."""
    if not os.path.isfile(os.path.join(encoder_folder, "encoder.weights.h5")) or not os.path.isfile(
            os.path.join(encoder_folder, "config.json")):
        raise UsageError(f"--out {encoder_folder!r}: no trained encoder there (expected "
                         "config.json and encoder.weights.h5 from a training run)")
    return infomax.load_run_config(encoder_folder, "encoder")


def fingerprint(encoder_folder):
    """What makes codes comparable: the encoder's weights (sha256 of the file's bytes), the
    image size, pixel range and code size of its run, and the preprocessing."""
    config, weights = encoder_files(encoder_folder)
    return {"weights_sha256": file_sha256(weights), "img_size": int(config.img_size),
            "pixel_range": [float(v) for v in config.pixel_range], "z_dim": int(config.z_dim),
            "preprocessing": PREPROCESSING}


def fingerprint_differences(saved, current):
    """'img_size 32, not 64' for each part of the fingerprint that differs."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            show = (lambda v: str(v)[:12]) if key == "weights_sha256" else str
            differences.append(f"{key} {show(saved.get(key))}, not {show(current.get(key))}")
    return differences


def default_index_path(encoder_folder, folder):
    """Where an index of `folder` lives unless --index says: in the run, one per folder."""
    real = os.path.realpath(folder)
    name = os.path.basename(real.rstrip(os.sep)) or "root"
    return os.path.join(encoder_folder, "indexes",
                        f"{name}-{hashlib.sha1(real.encode()).hexdigest()[:8]}")


def model_pixels(path, config):
    """The encoder's input for one image file: decoded, centre square, resized, rounded to
    uint8 values, then scaled to the run's pixel range (PREPROCESSING)."""
    return infomax.to_model_pixels(tf.round(image_files.load_image(path, config.img_size)),
                                   config.pixel_range)


def code_function(encoder, config):
    """images in the model's range (B, S, S, 3) -> mu (B, z_dim), in inference mode, one
    compiled graph for every batch size."""
    extractor = infomax.feature_extractor(encoder)
    spec = tf.TensorSpec((None, config.img_size, config.img_size, 3), tf.float32)
    return tf.function(lambda images: extractor(images, training=False), input_signature=[spec])


# =========================================================================== code files

def create_code_file(path, rows, dim):
    """A .npy file of float32 (rows, dim), zeros, whose rows are then written in place through
    a file handle (`write_rows`), so that writing codes never holds them in memory. Returns
    the offset of row 0."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (rows, dim)})
        offset = f.tell()
        f.truncate(offset + rows * dim * 4)
    return offset


def code_file_offset(path):
    """The offset of row 0 of a .npy file written by `create_code_file`."""
    return np.load(path, mmap_mode="r").offset


def write_rows(f, offset, first_row, rows):
    f.seek(offset + first_row * rows.shape[1] * 4)
    f.write(np.ascontiguousarray(rows, np.float32).tobytes())


def sync(f):
    f.flush()
    os.fsync(f.fileno())


def write_file_list(path, files):
    """files-<gen>.csv: row, path, size, mtime_ns (through a temporary file, synced)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "path", "size", "mtime_ns"])
        writer.writerows([row, file.path, file.size, file.mtime_ns]
                         for row, file in enumerate(files))
        sync(f)
    os.replace(tmp, path)


def read_file_list(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return [ImageFile(name, int(size), int(mtime)) for _, name, size, mtime in reader]


# =========================================================================== an update

def commit_progress(update_dir, progress):
    """Record how far an indexing got (after its codes up to there are on disk): the commit
    point of one chunk. tests/fault_hooks.py can pause here, so that a test kills the
    process at a known place."""
    write_json(os.path.join(update_dir, "progress.json"), progress)


def todo_digest(encoder_fingerprint, base_generation, todo):
    """What an interrupted indexing was doing: the encoder, the generation it started from
    and the files it had to encode. Equal digests: the saved progress applies."""
    digest = hashlib.sha256(json.dumps([encoder_fingerprint, base_generation]).encode())
    for file in todo:
        digest.update(f"{file.path}\0{file.size}\0{file.mtime_ns}\n".encode())
    return digest.hexdigest()


def encode_files(folder, todo, codes_path, update_dir, progress, encoder, config, batch_size,
                 commit_every, verbose=True):
    """Encode `todo` (ImageFiles of `folder`) into rows 0..len-1 of `codes_path`, from
    `progress["encoded"]` on, streaming: a tf.data pipeline decodes files in parallel, in
    order, while the encoder runs on the previous batch; a file that does not decode is
    dropped by the pipeline and recorded in `progress["unreadable"]` (row numbers). After
    every `commit_every` images the codes are synced and the progress committed, so that a
    killed indexing loses at most that much. Returns the progress."""
    start = progress["encoded"]
    if start >= len(todo):
        return progress
    paths = [os.path.join(folder, f.path) for f in todo[start:]]
    positions = np.arange(start, len(todo), dtype=np.int64)
    stream = tf.data.Dataset.from_tensor_slices((paths, positions))
    stream = stream.map(lambda path, position: (model_pixels(path, config), position),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.ignore_errors().batch(batch_size).prefetch(2)
    codes_of = code_function(encoder, config)
    offset = code_file_offset(codes_path)
    bar = keras.utils.Progbar(len(todo), unit_name="image", verbose=1 if verbose else 0)
    bar.update(start)
    expected = committed = start  # every file before `expected` is encoded or unreadable

    def unreadable(rows):
        for row in sorted(rows):
            progress["unreadable"].append(row)
            warnings.warn(f"skipping unreadable image {paths[row - start]}", stacklevel=3)

    with open(codes_path, "r+b") as f:
        for images, batch_rows in stream:
            codes = codes_of(images).numpy()
            batch_rows = batch_rows.numpy()
            end = int(batch_rows[-1]) + 1  # order is kept: the files before `end` are settled
            block = np.zeros((end - expected, codes.shape[1]), np.float32)
            block[batch_rows - expected] = codes  # rows of unreadable files stay zero
            write_rows(f, offset, expected, block)
            unreadable(set(range(expected, end)) - set(batch_rows.tolist()))
            expected = end
            bar.update(expected)
            if expected - committed >= commit_every:
                sync(f)
                progress["encoded"] = committed = expected
                commit_progress(update_dir, progress)
        unreadable(range(expected, len(todo)))  # dropped at the very end
        sync(f)
    progress["encoded"] = len(todo)
    commit_progress(update_dir, progress)
    return progress


# =========================================================================== the index

@dataclasses.dataclass
class Matches:
    """The answer to a search: for each query (its name) the k nearest images, nearest first:
    their files (paths under the indexed folder), rows in the index and scores (cosine
    similarity, or Euclidean distance between the codes)."""
    queries: list
    files: list          # [[path, ...] per query]
    rows: np.ndarray     # (Q, k)
    scores: np.ndarray   # (Q, k)
    metric: str
    approximate: bool = False

    def records(self):
        """One dict per (query, rank): query, rank (1 = nearest), file, score, metric."""
        return [{"query": query, "rank": rank, "file": file, "score": float(score),
                 "metric": self.metric}
                for query, files, scores in zip(self.queries, self.files, self.scores)
                for rank, (file, score) in enumerate(zip(files, scores), 1)]


class Index:
    """An index of the images under one folder (see the module's docstring): `build` makes or
    updates one, `open` reads one, `search` queries it."""

    def __init__(self, path, meta, encoder_folder=None):
        self.path = path
        self.meta = meta
        self.folder = meta["folder"]
        self.encoder_folder = encoder_folder or meta["encoder"]
        self.codes = np.load(os.path.join(path, meta["codes"]), mmap_mode="r")
        self._files = self._norms = self._encoder = self._approximate = None

    # ----------------------------------------------------------------- reading

    @classmethod
    def open(cls, path, encoder_folder=None):
        """The index at `path`. `encoder_folder`: the run whose encoder encodes the queries
        (default: the one that built the index); it must be the index's encoder."""
        meta_path = os.path.join(path, "index.json")
        if not os.path.isfile(meta_path):
            raise UsageError(f"--index {path!r}: no index there (make one with "
                             "`infomax.py index --folder DIR`)")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise UsageError(f"--index {path!r}: written in format {meta.get('format')}, this "
                             f"code reads format {FORMAT}; index the folder again")
        index = cls(path, meta, encoder_folder)
        index.check_encoder(index.encoder_folder)
        return index

    def check_encoder(self, encoder_folder):
        """A UsageError, one line, unless `encoder_folder` holds the encoder of this index."""
        differences = fingerprint_differences(self.meta["fingerprint"], fingerprint(encoder_folder))
        if differences:
            raise UsageError(f"--index {self.path!r} was built by another encoder than the one "
                             f"in {encoder_folder!r} ({'; '.join(differences)}); index the folder "
                             "again with this encoder (another --index) or search with that one")

    @property
    def files(self):
        """The indexed files, one ImageFile per row of `codes` (read on first use)."""
        if self._files is None:
            self._files = read_file_list(os.path.join(self.path, self.meta["files"]))
        return self._files

    def __len__(self):
        return len(self.codes)

    def full_path(self, relative):
        return os.path.join(self.folder, *relative.split("/"))

    # ----------------------------------------------------------------- queries

    def encoder(self):
        """(encoder, config) that made the codes (loaded once)."""
        if self._encoder is None:
            self._encoder = infomax.load_encoder(self.encoder_folder)
        return self._encoder

    def query_images(self, images_or_files, flag="--query"):
        """(names, uint8 images (Q, S, S, 3)) of query files or folders of them (decoded as
        the index was), or of uint8 images already at the index's size."""
        size = self.meta["fingerprint"]["img_size"]
        if isinstance(images_or_files, (str, os.PathLike)):
            images_or_files = [images_or_files]
        if isinstance(images_or_files, np.ndarray):
            images = images_or_files[None] if images_or_files.ndim == 3 else images_or_files
            if images.shape[1:] != (size, size, 3):
                raise UsageError(f"query images of shape {images.shape[1:]}: this index takes "
                                 f"({size}, {size}, 3) uint8 images, or files")
            return [f"image {i}" for i in range(len(images))], np.asarray(images, np.uint8)
        names = []
        for name in map(os.fspath, images_or_files):  # a folder: every image in it, bad ones named
            names += image_files.scan_image_folder(name, size, flag) if os.path.isdir(name) else [name]
        for name in names:
            if not os.path.isfile(name):
                raise UsageError(f"{flag} {name!r}: no such file")
        readable, unreadable = image_files.find_readable_images(names, size, verbose=False)
        if unreadable:
            raise UsageError(f"{flag} {unreadable[0]!r}: not a readable image")
        return names, np.stack([tf.round(image_files.load_image(n, size)).numpy().astype(np.uint8)
                                for n in names])

    def query_codes(self, images):
        encoder, config = self.encoder()
        return infomax.embed(images, encoder, config)

    def norms(self):
        """|code| of every row (one pass over the codes, on the first search)."""
        if self._norms is None:
            self._norms = code_search.row_norms(self.codes)
        return self._norms

    def search(self, images_or_files, k=9, metric="cosine", approximate=False):
        """The k nearest indexed images of each query (files, folders of them, or uint8
        images at the index's size), by cosine similarity or Euclidean distance of mu:
        exact (chunked matrix products over the memory-mapped codes), or with `approximate`
        through the faiss index built with `Index.build(..., approximate=True)`. Returns
        Matches."""
        names, images = self.query_images(images_or_files)
        return self.search_codes(names, self.query_codes(images), k, metric, approximate)

    def search_codes(self, names, codes, k=9, metric="cosine", approximate=False):
        """`search` for query codes already computed (names label them in the Matches)."""
        if len(self) == 0:
            raise UsageError(f"--index {self.path!r}: no images in it")
        if approximate:
            rows, scores = self.approximate_search(codes, k, metric)
        else:
            rows, scores = code_search.exact_top_k(self.codes, codes, k, metric, self.norms())
        if metric == "euclidean":
            scores = code_search.distances(codes, scores)
        files = [[self.full_path(self.files[r].path) if r >= 0 else "" for r in row]
                 for row in rows]
        return Matches(names, files, rows, scores, metric, approximate)

    def approximate_search(self, codes, k, metric):
        about = self.meta.get("approximate")
        if not about:
            raise UsageError(f"--index {self.path!r}: has no approximate index (build it with "
                             "`infomax.py index --approximate`)")
        if about["metric"] != metric:
            raise UsageError(f"--metric {metric}: the approximate index of {self.path!r} is "
                             f"for {about['metric']} (index it again with --metric {metric})")
        if self._approximate is None:
            self._approximate = code_search.read_approximate(os.path.join(self.path, about["file"]))
        return code_search.approximate_top_k(self._approximate, codes, k, metric, about["probes"])

    # ----------------------------------------------------------------- building

    @classmethod
    def build(cls, folder, encoder_folder=infomax.PRETRAINED, index_path=None,
              batch_size=BATCH_SIZE, commit_every=COMMIT_EVERY, approximate=False,
              metric="cosine", verbose=True):
        """Index every image under `folder` with the encoder of the run `encoder_folder`, or
        bring the index at `index_path` up to date: encode the new and changed files only,
        drop the deleted ones, resume an indexing that was killed. Refuses (UsageError) an
        index of another folder or encoder. `approximate`: also (re)build the faiss index
        for `metric` and measure its recall. Returns the Index."""
        if not os.path.isdir(folder):
            raise UsageError(f"--folder {folder!r}: no such folder (expected a folder of "
                             "PNG/JPEG images)")
        folder = os.path.abspath(folder)
        encoder_folder = os.path.abspath(encoder_folder)
        index_path = os.path.abspath(index_path or default_index_path(encoder_folder, folder))
        current = fingerprint(encoder_folder)
        common.ensure_writable_dir(index_path, "--index")
        with IndexLock(index_path):
            update = Update(index_path, folder, encoder_folder, current, verbose)
            meta = update.run(batch_size, commit_every)
            # an approximate index, once asked for, is kept up to date with the codes
            before = (update.previous_meta or {}).get("approximate")
            wanted = metric if approximate else before and before["metric"]
            if wanted and (meta.get("approximate") or {}).get("metric") != wanted:
                meta = add_approximate(index_path, meta, wanted, verbose)
        return cls(index_path, meta, encoder_folder)


class IndexLock:
    """An exclusive lock on an index folder for an indexing: a second one at the same time
    is a one-line error, not two processes writing the same files."""

    def __init__(self, index_path):
        self.path = os.path.join(index_path, ".lock")

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UsageError(f"--index {os.path.dirname(self.path)!r}: another process is "
                             "indexing into it now") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class Update:
    """One indexing of a folder into an index folder: compare the folder with the index,
    encode what is new or changed into .update/ (resumable), then write the next generation
    and commit it by replacing index.json.

    .update/ holds plan.json (the digest of what is to be encoded: `todo_digest`),
    codes.npy (one row per file to encode) and progress.json (`commit_progress`: how many of
    them are on disk, which were unreadable). An indexing that finds a plan with the same
    digest resumes from its progress; any other plan is stale and is started over."""

    def __init__(self, index_path, folder, encoder_folder, current_fingerprint, verbose=True):
        self.index_path, self.folder, self.encoder_folder = index_path, folder, encoder_folder
        self.fingerprint, self.verbose = current_fingerprint, verbose
        self.work = os.path.join(index_path, ".update")
        self.previous_meta = None

    def say(self, text):
        if self.verbose:
            print(text, flush=True)

    def previous(self):
        """(meta, {path: (row, ImageFile)}, {path: ImageFile} unreadable) of the committed
        index, after checking that it is this folder's and this encoder's."""
        meta_path = os.path.join(self.index_path, "index.json")
        if not os.path.isfile(meta_path):
            return None, {}, {}
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise UsageError(f"--index {self.index_path!r}: written in format "
                             f"{meta.get('format')}, not {FORMAT}; use another --index")
        if meta["folder"] != self.folder:
            raise UsageError(f"--index {self.index_path!r} indexes {meta['folder']!r}, not "
                             f"{self.folder!r} (use another --index)")
        differences = fingerprint_differences(meta["fingerprint"], self.fingerprint)
        if differences:
            raise UsageError(f"--index {self.index_path!r} was built by another encoder "
                             f"({'; '.join(differences)}); use another --index, or delete it "
                             "to index the folder again with this one")
        rows = {f.path: (row, f) for row, f in
                enumerate(read_file_list(os.path.join(self.index_path, meta["files"])))}
        unreadable = {path: ImageFile(path, size, mtime)
                      for path, size, mtime in meta["unreadable"]}
        return meta, rows, unreadable

    def run(self, batch_size, commit_every):
        meta, previous_rows, previous_unreadable = self.previous()
        self.previous_meta = meta
        base = meta["generation"] if meta else 0
        scanned = scan_folder(self.folder)
        kept = [f for f in scanned if previous_rows.get(f.path, (None, None))[1] == f]
        known_bad = [f for f in scanned if previous_unreadable.get(f.path) == f]
        settled = {f.path for f in kept} | {f.path for f in known_bad}
        todo = [f for f in scanned if f.path not in settled]
        deleted = len(previous_rows) - len(kept)
        if meta and not todo and not deleted and len(known_bad) == len(previous_unreadable):
            self.say(f"index {self.index_path}: up to date ({len(kept)} images)")
            self.discard_work()
            return meta
        self.say(f"indexing {self.folder} into {self.index_path}: {len(todo)} new or changed "
                 f"image file(s) to encode, {len(kept)} unchanged, {deleted} deleted or changed "
                 f"since the last indexing")
        if known_bad:
            self.say(f"{len(known_bad)} file(s) known to be unreadable and unchanged, skipped "
                     "(listed in index.json)")
        progress = self.plan(todo, base)
        encoder, config = infomax.load_encoder(self.encoder_folder)
        progress = encode_files(self.folder, todo, os.path.join(self.work, "codes.npy"),
                                self.work, progress, encoder, config, batch_size, commit_every,
                                self.verbose)
        if not len(kept) + len(todo) - len(progress["unreadable"]):
            self.discard_work()
            raise UsageError(f"--folder {self.folder!r}: none of its {len(scanned)} image "
                             f"file(s) could be read")
        return self.commit(meta, previous_rows, kept, todo, progress, known_bad)

    def plan(self, todo, base):
        """The progress of the interrupted indexing of exactly `todo`, or a fresh start."""
        digest = todo_digest(self.fingerprint, base, todo)
        plan_path = os.path.join(self.work, "plan.json")
        progress_path = os.path.join(self.work, "progress.json")
        if os.path.isfile(plan_path) and os.path.isfile(progress_path):
            try:
                if read_json(plan_path)["digest"] == digest:
                    progress = read_json(progress_path)
                    self.say(f"resuming an interrupted indexing: {progress['encoded']} of "
                             f"{len(todo)} already encoded")
                    return progress
            except (OSError, ValueError, KeyError):
                pass
            self.say("an interrupted indexing of other files (the folder or the encoder has "
                     "changed since): starting over")
        self.discard_work()
        os.makedirs(self.work)
        create_code_file(os.path.join(self.work, "codes.npy"), len(todo),
                         self.fingerprint["z_dim"])
        progress = {"encoded": 0, "unreadable": []}
        commit_progress(self.work, progress)
        write_json(plan_path, {"digest": digest, "todo": len(todo)})  # last: the plan is complete
        return progress

    def discard_work(self):
        shutil.rmtree(self.work, ignore_errors=True)

    def commit(self, meta, previous_rows, kept, todo, progress, known_bad):
        """Write generation base+1 (codes and file list, merged by path from the kept rows of
        the previous codes and the new rows), replace index.json, remove what it replaced."""
        generation = (meta["generation"] if meta else 0) + 1
        unreadable_rows = set(progress["unreadable"])
        new = [(f, row) for row, f in enumerate(todo) if row not in unreadable_rows]
        merged = sorted([(f, "previous", previous_rows[f.path][0]) for f in kept]
                        + [(f, "new", row) for f, row in new], key=lambda item: item[0].path)
        names = {"codes": f"codes-{generation}.npy", "files": f"files-{generation}.csv"}
        codes_path = os.path.join(self.index_path, names["codes"])
        new_codes_path = os.path.join(self.work, "codes.npy")
        if not kept and len(new) == len(todo):  # a first indexing without holes: as it is
            os.replace(new_codes_path, codes_path)
        else:
            self.merge_codes(codes_path, merged, meta, new_codes_path)
        write_file_list(os.path.join(self.index_path, names["files"]), [m[0] for m in merged])
        unreadable = sorted([[f.path, f.size, f.mtime_ns] for f in known_bad]
                            + [[todo[r].path, todo[r].size, todo[r].mtime_ns]
                               for r in unreadable_rows])
        new_meta = {"format": FORMAT, "folder": self.folder, "encoder": self.encoder_folder,
                    "fingerprint": self.fingerprint, "generation": generation,
                    "count": len(merged), "unreadable": unreadable,
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **names,
                    "approximate": None}
        write_json(os.path.join(self.index_path, "index.json"), new_meta)  # the commit point
        self.discard_work()
        remove_other_generations(self.index_path, new_meta)
        self.say(f"index {self.index_path}: {len(merged)} images"
                 + (f", {len(unreadable)} unreadable file(s) skipped" if unreadable else ""))
        return new_meta

    def merge_codes(self, codes_path, merged, meta, new_codes_path, chunk_rows=65536):
        """Copy the merged rows, chunk by chunk, into a new code file (synced)."""
        previous = (np.load(os.path.join(self.index_path, meta["codes"]), mmap_mode="r")
                    if meta else None)
        new = np.load(new_codes_path, mmap_mode="r")
        tmp = codes_path + ".tmp"
        offset = create_code_file(tmp, len(merged), self.fingerprint["z_dim"])
        with open(tmp, "r+b") as f:
            for start in range(0, len(merged), chunk_rows):
                part = merged[start:start + chunk_rows]
                block = np.empty((len(part), self.fingerprint["z_dim"]), np.float32)
                for source, codes in (("previous", previous), ("new", new)):
                    where = [i for i, m in enumerate(part) if m[1] == source]
                    if where:
                        block[where] = codes[[part[i][2] for i in where]]
                write_rows(f, offset, start, block)
            sync(f)
        os.replace(tmp, codes_path)


def remove_other_generations(index_path, meta):
    """Delete the code, file-list and approximate files that index.json no longer names."""
    current = {meta["codes"], meta["files"], (meta.get("approximate") or {}).get("file")}
    for pattern in ("codes-*.npy", "files-*.csv", "approximate-*.faiss", "*.tmp"):
        for path in glob.glob(os.path.join(index_path, pattern)):
            if os.path.basename(path) not in current:
                os.remove(path)


def add_approximate(index_path, meta, metric, verbose=True):
    """Build the faiss index of the current codes for `metric`, measure its recall@10
    against the exact search, and commit both (index.json names the file)."""
    codes = np.load(os.path.join(index_path, meta["codes"]), mmap_mode="r")
    if len(codes) == 0:
        return meta
    start = time.time()
    approximate = code_search.build_approximate(codes, metric)
    recall = code_search.measure_recall(approximate, codes, metric,
                                        norms=code_search.row_norms(codes))
    name = f"approximate-{meta['generation']}.faiss"
    tmp = os.path.join(index_path, name + ".tmp")
    code_search.write_approximate(approximate, tmp)
    os.replace(tmp, os.path.join(index_path, name))
    meta = {**meta, "approximate": {"file": name, "metric": metric,
                                    "kind": f"IVF{approximate.nlist},Flat",
                                    "seconds_to_build": round(time.time() - start, 1), **recall}}
    write_json(os.path.join(index_path, "index.json"), meta)
    remove_other_generations(index_path, meta)
    if verbose:
        print(f"approximate index ({meta['approximate']['kind']}, {metric}): recall@{recall['k']} "
              f"{recall['recall']:.3f} against the exact search on {recall['queries']} of the "
              f"indexed images, {recall['probes']} of {approximate.nlist} clusters probed",
              flush=True)
    return meta


# =========================================================================== results

def write_matches(path, matches):
    """The matches as CSV (query, rank, file, score, metric) or, for a .json path, JSON."""
    records = [r for m in matches for r in m.records()]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        if path.lower().endswith(".json"):
            json.dump(records, f, indent=1)
        else:
            writer = csv.DictWriter(f, ["query", "rank", "file", "score", "metric"])
            writer.writeheader()
            writer.writerows(records)
    os.replace(tmp, path)
    return path


def neighbour_picture(path, query_image, files, size):
    """The query followed by its neighbours (decoded as indexed; a file gone since: black)."""
    tiles = [query_image]
    for file in files:
        try:
            tiles.append(tf.round(image_files.load_image(file, size)).numpy().astype(np.uint8))
        except (tf.errors.OpError, ValueError):
            tiles.append(np.zeros_like(query_image))
    return pictures.save_grid(path, np.stack(tiles), rows=1, cols=len(tiles), value_range=(0, 255))


def print_matches(matches):
    for query, files, scores in zip(matches.queries, matches.files, matches.scores):
        print(f"query {query}:")
        for rank, (file, score) in enumerate(zip(files, scores), 1):
            value = f"cosine {score:.4f}" if matches.metric == "cosine" else f"distance {score:.4f}"
            print(f"  {rank:3d}. {file}  ({value})")
    sys.stdout.flush()
