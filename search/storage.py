"""The files of an index, a folder:

    index.json              what the codes are: the image folder, the encoder and its
                            fingerprint, the current generation's file names, the unreadable
                            files; replacing it (atomically) is what commits an update
    codes-<gen>.npy         float32 (N, z_dim): row i is the code of files-<gen>.csv's row i
                            (np.load(..., mmap_mode="r") reads it without loading it)
    files-<gen>.csv         row, path (relative to the folder, "/"-separated), size, mtime_ns
    approximate-<gen>.faiss an optional approximate index (faiss) and, in index.json, its
                            recall against the exact search
    .update/                an indexing in progress (search/update.py); a killed one resumes
    .lock                   held by the indexing in progress (`IndexLock`)
"""

import csv
import dataclasses
import fcntl
import glob
import hashlib
import io
import os

import numpy as np

import image_files
from common import UsageError, read_json, write_text

FORMAT = 1


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


def default_index_path(encoder_source, folder):
    """Where an index of `folder` lives unless --index says: in the encoder's run, one per
    folder."""
    real = os.path.realpath(folder)
    name = os.path.basename(real.rstrip(os.sep)) or "root"
    return os.path.join(encoder_source, "indexes",
                        f"{name}-{hashlib.sha1(real.encode()).hexdigest()[:8]}")


def read_meta(index_path, required=True):
    """index.json of the index at `index_path`, checked to be of this code's format; None if
    there is none and it is not `required` (a first indexing)."""
    meta_path = os.path.join(index_path, "index.json")
    if not os.path.isfile(meta_path):
        if not required:
            return None
        raise UsageError(f"--index {index_path!r}: no index there (make one with "
                         "`infomax.py index --folder DIR`)")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise UsageError(f"--index {index_path!r}: written in format {meta.get('format')}, this "
                         f"code reads format {FORMAT}; index the folder again (another --index, "
                         "or delete it)")
    return meta


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


# =========================================================================== file lists

def write_file_list(path, files):
    """files-<gen>.csv: row, path, size, mtime_ns (atomically: common.write_text)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["row", "path", "size", "mtime_ns"])
    writer.writerows([row, file.path, file.size, file.mtime_ns] for row, file in enumerate(files))
    write_text(path, text.getvalue())


def read_file_list(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return [ImageFile(name, int(size), int(mtime)) for _, name, size, mtime in reader]


def remove_other_generations(index_path, meta):
    """Delete the code, file-list and approximate files that index.json no longer names."""
    current = {meta["codes"], meta["files"], (meta.get("approximate") or {}).get("file")}
    for pattern in ("codes-*.npy", "files-*.csv", "approximate-*.faiss", "*.tmp"):
        for path in glob.glob(os.path.join(index_path, pattern)):
            if os.path.basename(path) not in current:
                os.remove(path)


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
