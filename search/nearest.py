"""Nearest codes among many: exact search over a (memory-mapped) matrix of codes in chunks,
and an optional approximate index (faiss) whose recall against the exact search is measured.

Scores are "higher is nearer": the cosine similarity, or for the Euclidean metric
2 q.b - |b|^2 (= |q|^2 - |q - b|^2, the same order as the distance); `distances` turns the
latter back into |q - b|. Nothing here knows about images; the rest of search/ does.
"""

import numpy as np

from common import UsageError

METRICS = ("cosine", "euclidean")
CHUNK_ROWS = 131072   # 128 MB of 256-d float32 codes per matrix product


def row_norms(codes, chunk_rows=CHUNK_ROWS):
    """|b| of every row of `codes`, read in chunks (a memory map is never loaded whole)."""
    norms = np.empty(len(codes), np.float32)
    for start in range(0, len(codes), chunk_rows):
        block = np.asarray(codes[start:start + chunk_rows], np.float32)
        norms[start:start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return norms


def chunk_scores(queries, block, metric, block_norms):
    """(Q, rows) scores of the queries against one block of codes; higher is nearer."""
    if len(queries) == 1:  # a matrix-vector product reads the block once, row by row
        products = (block @ queries[0])[None]
    else:
        products = queries @ block.T
    if metric == "cosine":  # the queries are normalised already
        return products * (1.0 / np.maximum(block_norms, 1e-12))[None]
    return 2.0 * products - np.square(block_norms)[None]


def exact_top_k(codes, queries, k, metric="cosine", norms=None, chunk_rows=CHUNK_ROWS):
    """The exact k nearest rows of `codes` (N, d) for each query (Q, d): (rows (Q, k) int64,
    scores (Q, k) float32), nearest first; k is cut to N. Chunked matrix products (float32,
    the machine's BLAS) and a running top-k (argpartition), so memory stays at one chunk of
    scores whatever N is. `norms`: `row_norms(codes)`, if already known."""
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    k = min(int(k), len(codes))
    best_rows = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    if k == 0:
        return best_rows, best_scores
    if metric == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    for start in range(0, len(codes), chunk_rows):
        block = np.asarray(codes[start:start + chunk_rows], np.float32)
        block_norms = (norms[start:start + len(block)] if norms is not None
                       else np.sqrt(np.einsum("ij,ij->i", block, block)))
        scores = chunk_scores(queries, block, metric, block_norms)
        columns = np.arange(scores.shape[1])
        if best_rows.shape[1] == k:
            # only the rows that beat some query's k-th best so far can enter its top k: a
            # comparison instead of a partition of every score (most chunks have few)
            kth_best = best_scores.min(axis=1, keepdims=True)
            columns = np.flatnonzero((scores >= kth_best).any(axis=0))
            scores = scores[:, columns]
        if scores.shape[1] > k:
            top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
            scores = np.take_along_axis(scores, top, axis=1)
            top = columns[top]
        else:
            top = np.broadcast_to(columns, scores.shape)
        best_rows = np.concatenate([best_rows, top + start], axis=1)
        best_scores = np.concatenate([best_scores, scores.astype(np.float32)], axis=1)
        if best_rows.shape[1] > k:
            keep = np.argpartition(best_scores, best_rows.shape[1] - k, axis=1)[:, -k:]
            best_rows = np.take_along_axis(best_rows, keep, axis=1)
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
    # nearest first; equal scores by row number, so that the order does not depend on chunks
    order = np.lexsort((best_rows, -best_scores), axis=1)
    return (np.take_along_axis(best_rows, order, axis=1),
            np.take_along_axis(best_scores, order, axis=1))


def distances(queries, scores):
    """|q - b| from the Euclidean scores 2 q.b - |b|^2 of `exact_top_k` (rows of `scores`
    belong to the rows of `queries`)."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    squared = np.sum(np.square(queries), axis=1, keepdims=True) - scores
    return np.sqrt(np.maximum(squared, 0.0))


# --------------------------------------------------------------------------- approximate search

def import_faiss():
    """faiss, or a one-line UsageError saying how to get it (it is optional)."""
    try:
        import faiss  # optional: only the approximate index needs it
    except ImportError:
        raise UsageError("--approximate needs the faiss library: pip install faiss-cpu") from None
    return faiss


def inverted_list_count(count):
    """Clusters of an inverted-file index of `count` codes: about sqrt(N), at least 1, at most
    N/39 (faiss wants 39 training codes per cluster), capped at 65536."""
    return int(max(1, min(4 * round(np.sqrt(count) / 4), count // 39, 65536)))


def faiss_vectors(block, metric):
    """Codes as faiss stores them: unit rows for cosine (inner product), as they are else."""
    block = np.ascontiguousarray(block, np.float32)
    if metric == "cosine":
        block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return block


def build_approximate(codes, metric, seed=0, chunk_rows=CHUNK_ROWS, training_codes=65536):
    """An inverted-file faiss index (IVF, flat codes) of `codes`: k-means on a random sample of
    at most `training_codes` rows, then every row added chunk by chunk. Search it with
    `approximate_top_k`; `measure_recall` says how close to exact it is."""
    faiss = import_faiss()
    lists = inverted_list_count(len(codes))
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index = faiss.index_factory(codes.shape[1], f"IVF{lists},Flat", faiss_metric)
    sample = np.sort(np.random.default_rng(seed).choice(
        len(codes), min(len(codes), max(training_codes, 39 * lists)), replace=False))
    index.train(faiss_vectors(codes[sample], metric))
    for start in range(0, len(codes), chunk_rows):
        index.add(faiss_vectors(codes[start:start + chunk_rows], metric))
    return index


def approximate_top_k(index, queries, k, metric, probes):
    """(rows, scores) of the approximate index, in `exact_top_k`'s conventions: scores are
    cosines, or 2 q.b - |b|^2 for the Euclidean metric; rows of -1 mark missing results."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    index.nprobe = int(probes)
    found, rows = index.search(faiss_vectors(queries, metric), int(min(k, index.ntotal)))
    if metric == "euclidean":  # faiss gives |q - b|^2
        found = np.sum(np.square(queries), axis=1, keepdims=True) - found
    return rows.astype(np.int64), found.astype(np.float32)


def recall_at_k(exact_rows, approximate_rows):
    """The share of the exact k nearest that the approximate search also returns."""
    hits = [len(set(e) & set(a)) for e, a in zip(exact_rows.tolist(), approximate_rows.tolist())]
    return float(np.sum(hits) / exact_rows.size)


def measure_recall(index, codes, metric, k=10, queries=200, target=0.95, seed=1, norms=None):
    """Recall@k of the approximate index against `exact_top_k`, with `queries` random rows of
    `codes` as the queries (each query's own row left out of both answers, so that finding
    itself does not count), for a growing number of probed clusters: the smallest that
    reaches `target` (else the largest tried). Returns {"probes", "recall", "k", "queries",
    "tried": {probes: recall}}."""
    picked = np.sort(np.random.default_rng(seed).choice(len(codes), min(queries, len(codes)),
                                                        replace=False))
    query_codes = np.asarray(codes[picked], np.float32)
    exact, _ = exact_top_k(codes, query_codes, k + 1, metric, norms)

    def without_self(rows):
        return np.array([[r for r in row if r != own][:k] for row, own in zip(rows, picked)])

    exact = without_self(exact)
    tried, probes = {}, 1
    while True:
        rows, _ = approximate_top_k(index, query_codes, k + 1, metric, probes)
        tried[probes] = recall_at_k(exact, without_self(rows))
        if tried[probes] >= target or probes >= index.nlist:
            break
        probes = min(2 * probes, index.nlist)
    chosen = min((p for p, r in tried.items() if r >= target), default=probes)
    return {"probes": chosen, "recall": tried[chosen], "k": k, "queries": len(picked),
            "target": target, "tried": {str(p): round(r, 4) for p, r in tried.items()}}


def write_approximate(index, path):
    import_faiss().write_index(index, path)


def read_approximate(path):
    return import_faiss().read_index(path)
