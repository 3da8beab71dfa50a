"""An index of the images under one folder (the files: search/storage.py): `Index.build`
makes or updates one with an encoder, `Index.open` reads one, `Index.search` queries it.

An index belongs to one encoder: its fingerprint (search/encoder.py: weights, image size,
pixel range, code size, preprocessing) is in index.json, and another encoder is refused.
"""

import dataclasses
import os

import numpy as np

import common
import image_files
from common import UsageError
from search import nearest
from search.encoder import check_same_encoder, read_image
from search.storage import IndexLock, default_index_path, read_file_list, read_meta
from search.update import Update, add_approximate

BATCH_SIZE = 256
COMMIT_EVERY = 8192  # images between committed chunks of an indexing (what a kill can lose)


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
    """An index of the images under one folder: `build` makes or updates one, `open` reads
    one, `search` queries it. `encoder` (a search.Encoder, checked against the index's
    fingerprint) encodes the queries; an index opened without one searches codes only."""

    def __init__(self, path, meta, encoder=None):
        self.path = path
        self.meta = meta
        self.folder = meta["folder"]
        self.encoder_folder = meta["encoder"]  # the run that built it
        self.codes = np.load(os.path.join(path, meta["codes"]), mmap_mode="r")
        self.encoder = encoder
        self._files = self._norms = self._approximate = None

    # ----------------------------------------------------------------- reading

    @classmethod
    def open(cls, path, encoder=None):
        """The index at `path`; `encoder`, if given, must be the index's (else a one-line
        UsageError) and encodes the queries."""
        index = cls(path, read_meta(path))
        if encoder is not None:
            index.use_encoder(encoder)
        return index

    def use_encoder(self, encoder):
        """Encode the queries with `encoder`, if it is the one that made the codes (else a
        one-line UsageError)."""
        check_same_encoder(self.path, self.meta["fingerprint"], encoder,
                           "index the folder again with this encoder (another --index) or "
                           "search with that one")
        self.encoder = encoder
        return self

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
        return names, np.stack([read_image(n, size).numpy() for n in names])

    def query_codes(self, images, batch_size=BATCH_SIZE):
        """The codes of uint8 images, by the index's encoder, `batch_size` at a time."""
        if self.encoder is None:
            raise UsageError(f"--index {self.path!r}: opened without its encoder, it searches "
                             "codes only")
        return np.concatenate([np.asarray(self.encoder.codes_of(images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def norms(self):
        """|code| of every row (one pass over the codes, on the first search)."""
        if self._norms is None:
            self._norms = nearest.row_norms(self.codes)
        return self._norms

    def search(self, images_or_files, k=9, metric="cosine", approximate=False):
        """The k nearest indexed images of each query (files, folders of them, or uint8
        images at the index's size), by cosine similarity or Euclidean distance of the codes:
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
            rows, scores = nearest.exact_top_k(self.codes, codes, k, metric, self.norms())
        if metric == "euclidean":
            scores = nearest.distances(codes, scores)
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
            self._approximate = nearest.read_approximate(os.path.join(self.path, about["file"]))
        return nearest.approximate_top_k(self._approximate, codes, k, metric, about["probes"])

    # ----------------------------------------------------------------- building

    @classmethod
    def build(cls, folder, encoder, index_path=None, batch_size=BATCH_SIZE,
              commit_every=COMMIT_EVERY, approximate=False, metric="cosine", verbose=True):
        """Index every image under `folder` with `encoder` (a search.Encoder), or bring the
        index at `index_path` (default: in the encoder's run, `default_index_path`) up to
        date: encode the new and changed files only, drop the deleted ones, resume an
        indexing that was killed. Refuses (UsageError) an index of another folder or encoder.
        `approximate`: also (re)build the faiss index for `metric` and measure its recall.
        Returns the Index."""
        if not os.path.isdir(folder):
            raise UsageError(f"--folder {folder!r}: no such folder (expected a folder of "
                             "PNG/JPEG images)")
        folder = os.path.abspath(folder)
        index_path = os.path.abspath(index_path or default_index_path(encoder.source, folder))
        common.ensure_writable_dir(index_path, "--index")
        with IndexLock(index_path):
            update = Update(index_path, folder, encoder, verbose)
            meta = update.run(batch_size, commit_every)
            # an approximate index, once asked for, is kept up to date with the codes
            before = (update.previous_meta or {}).get("approximate")
            wanted = metric if approximate else before and before["metric"]
            if wanted and (meta.get("approximate") or {}).get("metric") != wanted:
                meta = add_approximate(index_path, meta, wanted, verbose)
        return cls(index_path, meta, encoder)
