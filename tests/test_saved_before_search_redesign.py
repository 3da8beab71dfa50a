"""Run folders and indexes written before search by image moved to search/ (commit f7bd01c)
still resume, open and answer the same.

tests/data/infomax_run_before_search_redesign/ was written by that code: the tiny run of
tests/test_same_weights.py (`--seed 5 --deterministic`, 2 epochs on `write_pictures`), then
an index of `write_pictures(n=10)` and one search of 03.png (search_results.csv). To keep the
fixture small, its kernels and their Adam moments were overwritten with a periodic pattern
(same HDF5 layout) before the index was built, and the weights files are gzipped. The index
records absolute paths, so the test recreates both picture folders (with the recorded
modification times) and points index.json at them.
"""

import csv
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT
from test_same_weights import runs, train_run, write_pictures
import infomax
import search

FIXTURE = os.path.join(ROOT, "tests", "data", "infomax_run_before_search_redesign")


def unpack_run(tmp_path):
    """The fixture's run folder in tmp_path/run (weights unzipped), its gallery recreated with
    the indexed sizes and modification times, and index.json pointing at both."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    for name in ("latest", "best", "encoder"):
        with gzip.open(run / f"{name}.weights.h5.gz") as packed:
            (run / f"{name}.weights.h5").write_bytes(packed.read())
        os.remove(run / f"{name}.weights.h5.gz")
    gallery = write_pictures(str(tmp_path / "gallery"), n=10, size=16)
    with open(run / "index" / "files-1.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = os.path.join(gallery, row["path"])
            assert os.path.getsize(path) == int(row["size"])  # the same bytes as then
            os.utime(path, ns=(int(row["mtime_ns"]), int(row["mtime_ns"])))
    meta = json.loads((run / "index" / "index.json").read_text())
    (run / "index" / "index.json").write_text(json.dumps(
        {**meta, "folder": gallery, "encoder": str(run)}, indent=2, sort_keys=True))
    return str(run), gallery, meta


def test_an_index_written_before_opens_is_up_to_date_and_answers_the_same(tmp_path, capsys):
    run, gallery, meta = unpack_run(tmp_path)
    encoder = infomax.search_encoder(run)
    assert encoder.fingerprint == meta["fingerprint"]  # byte for byte: weights, preprocessing
    index = search.Index.build(gallery, encoder, os.path.join(run, "index"))
    assert "up to date (10 images)" in capsys.readouterr().out
    assert index.meta["generation"] == 1
    files = [os.path.join(gallery, f.path) for f in index.files]
    # today's encoding of the files gives the stored codes (to float32 rounding: the pixel
    # scaling now runs inside the encoder's compiled graph)
    np.testing.assert_allclose(index.query_codes(index.query_images(files)[1]), index.codes,
                               rtol=1e-4, atol=1e-4)

    results = str(tmp_path / "results.csv")
    assert infomax.main(["search", "--index", os.path.join(run, "index"), "--query",
                         os.path.join(gallery, "03.png"), "--top", "3",
                         "--results", results]) == 0
    found = list(csv.DictReader(open(results)))
    before = list(csv.DictReader(open(os.path.join(FIXTURE, "search_results.csv"))))
    assert [os.path.basename(r["file"]) for r in found] == [
        os.path.basename(r["file"]) for r in before]
    np.testing.assert_allclose([float(r["score"]) for r in found],
                               [float(r["score"]) for r in before], atol=1e-4)


@pytest.mark.slow
def test_a_run_written_before_resumes_for_one_more_epoch(tmp_path):
    """The same command with --epochs 3 continues the run: a third epoch, logged."""
    run, _, _ = unpack_run(tmp_path)
    pictures = write_pictures(str(tmp_path / "pictures"))
    _, _, argv = [r for r in runs(pictures, str(tmp_path)) if r[0] == "infomax"][0]
    argv[argv.index("--epochs") + 1] = "3"
    argv[argv.index("--out") + 1] = run
    train_run("infomax", argv)  # a process of its own: --deterministic is process-wide
    state = json.loads(open(os.path.join(run, "state.json")).read())
    assert state["epochs_done"] == 3
    with open(os.path.join(run, "log.csv")) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]
