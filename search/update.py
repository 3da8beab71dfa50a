"""One indexing of a folder into an index (search/storage.py has the files): compare the
folder with the index, encode only what is new or changed, streaming and resumable, then
commit the next generation by replacing index.json.

Rows are sorted by path, so an index updated after adds, changes and deletions is the one
indexing the folder from scratch gives. A file is new or changed when its path, size or
modification time is; only those are encoded.
"""

import hashlib
import json
import os
import shutil
import time
import warnings

import numpy as np
import tensorflow as tf
import keras

from common import UsageError, read_json, write_json
from search import nearest
from search.encoder import check_same_encoder, read_image
from search.storage import (FORMAT, ImageFile, code_file_offset, create_code_file, read_file_list,
                            read_meta, remove_other_generations, scan_folder, sync,
                            write_file_list, write_rows)


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


def encode_files(folder, todo, codes_path, update_dir, progress, encoder, batch_size,
                 commit_every, verbose=True):
    """Encode `todo` (ImageFiles of `folder`) into rows 0..len-1 of `codes_path`, from
    `progress["encoded"]` on, streaming: a tf.data pipeline decodes files in parallel, in
    order, while `encoder` (a search.Encoder) runs on the previous batch; a file that does
    not decode is dropped by the pipeline and recorded in `progress["unreadable"]` (row
    numbers). After every `commit_every` images the codes are synced and the progress
    committed, so that a killed indexing loses at most that much. Returns the progress."""
    start = progress["encoded"]
    if start >= len(todo):
        return progress
    paths = [os.path.join(folder, f.path) for f in todo[start:]]
    positions = np.arange(start, len(todo), dtype=np.int64)
    stream = tf.data.Dataset.from_tensor_slices((paths, positions))
    stream = stream.map(lambda path, position: (read_image(path, encoder.img_size), position),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.ignore_errors().batch(batch_size).prefetch(2)
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
            codes = np.asarray(encoder.codes_of(images))
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


class Update:
    """One indexing of `folder` into the index folder `index_path` with `encoder` (a
    search.Encoder): encode what is new or changed into .update/ (resumable), then write the
    next generation and commit it by replacing index.json.

    .update/ holds plan.json (the digest of what is to be encoded: `todo_digest`),
    codes.npy (one row per file to encode) and progress.json (`commit_progress`: how many of
    them are on disk, which were unreadable). An indexing that finds a plan with the same
    digest resumes from its progress; any other plan is stale and is started over."""

    def __init__(self, index_path, folder, encoder, verbose=True):
        self.index_path, self.folder, self.encoder = index_path, folder, encoder
        self.fingerprint, self.verbose = encoder.fingerprint, verbose
        self.work = os.path.join(index_path, ".update")
        self.previous_meta = None

    def say(self, text):
        if self.verbose:
            print(text, flush=True)

    def previous(self):
        """(meta, {path: (row, ImageFile)}, {path: ImageFile} unreadable) of the committed
        index, after checking that it is this folder's and this encoder's."""
        meta = read_meta(self.index_path, required=False)
        if meta is None:
            return None, {}, {}
        if meta["folder"] != self.folder:
            raise UsageError(f"--index {self.index_path!r} indexes {meta['folder']!r}, not "
                             f"{self.folder!r} (use another --index)")
        check_same_encoder(self.index_path, meta["fingerprint"], self.encoder,
                           "use another --index, or delete it to index the folder again with "
                           "this one")
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
        progress = encode_files(self.folder, todo, os.path.join(self.work, "codes.npy"),
                                self.work, progress, self.encoder, batch_size, commit_every,
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
        new_meta = {"format": FORMAT, "folder": self.folder, "encoder": self.encoder.source,
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


def add_approximate(index_path, meta, metric, verbose=True):
    """Build the faiss index of the current codes for `metric`, measure its recall@10
    against the exact search, and commit both (index.json names the file)."""
    codes = np.load(os.path.join(index_path, meta["codes"]), mmap_mode="r")
    if len(codes) == 0:
        return meta
    start = time.time()
    approximate = nearest.build_approximate(codes, metric)
    recall = nearest.measure_recall(approximate, codes, metric, norms=nearest.row_norms(codes))
    name = f"approximate-{meta['generation']}.faiss"
    tmp = os.path.join(index_path, name + ".tmp")
    nearest.write_approximate(approximate, tmp)
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


