"""The answer to a search shown: printed, written as CSV or JSON, drawn next to its query."""

import csv
import io
import json
import os
import sys

import numpy as np
import tensorflow as tf

import pictures
from common import write_text
from search.encoder import read_image


def write_matches(path, matches):
    """The matches as CSV (query, rank, file, score, metric) or, for a .json path, JSON
    (atomically: common.write_text)."""
    records = [r for m in matches for r in m.records()]
    if path.lower().endswith(".json"):
        text = json.dumps(records, indent=1)
    else:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, ["query", "rank", "file", "score", "metric"])
        writer.writeheader()
        writer.writerows(records)
        text = buffer.getvalue()
    write_text(path, text)
    return path


def neighbour_picture(path, query_image, files, size):
    """The query (in a red frame, pictures.neighbour_grid) followed by its neighbours (decoded
    as indexed; a file gone since: black)."""
    tiles = []
    for file in files:
        try:
            tiles.append(read_image(file, size).numpy())
        except (tf.errors.OpError, ValueError):
            tiles.append(np.zeros_like(query_image))
    picture, _ = pictures.neighbour_grid(np.asarray(query_image)[None],
                                         [np.stack(tiles)[None]] if tiles else [], (0, 255))
    return pictures.write_png(path, picture)


def print_matches(matches):
    for query, files, scores in zip(matches.queries, matches.files, matches.scores):
        print(f"query {query}:")
        for rank, (file, score) in enumerate(zip(files, scores), 1):
            value = f"cosine {score:.4f}" if matches.metric == "cosine" else f"distance {score:.4f}"
            print(f"  {rank:3d}. {file}  ({value})")
    sys.stdout.flush()


def report(index, matches, images, out, max_pictures=16, results=None, pictures=None):
    """What the search command shows of `matches` (of `index`, for the uint8 query `images`):
    printed, one picture per query for the first `max_pictures` (search_<query>_<metric>.png
    in `pictures`, default `out`), and the CSV or JSON at `results` (default:
    search_results.csv in `out`)."""
    print_matches(matches)
    if matches.approximate:
        about = index.meta["approximate"]
        print(f"approximate search: recall@{about['k']} {about['recall']:.3f} against the exact "
              f"search, measured when it was built")
    size = index.meta["fingerprint"]["img_size"]
    drawn = list(zip(matches.queries, images, matches.files))[:max_pictures]
    pictures = pictures or out
    if drawn:
        os.makedirs(pictures, exist_ok=True)
    for name, image, files in drawn:
        stem = os.path.splitext(os.path.basename(name))[0]
        picture = os.path.join(pictures, f"search_{stem}_{matches.metric}.png")
        neighbour_picture(picture, image, files, size)
        print(f"picture of {name}: {picture}")
    results = results or os.path.join(out, "search_results.csv")
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    print(f"results: {write_matches(results, [matches])}")
