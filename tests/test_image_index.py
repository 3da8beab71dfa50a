"""Search by image (issue 17): search/ with the InfoMax encoder on real folders of PNG and
JPEG files (nested, with bad files) through the real loaders: the exact search is a
brute-force search; an index updated after adds, changes and deletions is the index built
from scratch; a killed indexing resumes to the same index; another encoder is refused."""

import csv
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
import common
import image_files
import infomax
from search import nearest, storage, update
from search.index import Index

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- fixtures

def write_run(folder, img_size=8, z_dim=8, seed=0):
    """A run folder as training leaves it (config.json, encoder.weights.h5), untrained: the
    index only needs an encoder, and seeds make different ones."""
    config = infomax.resolve(infomax.Config(dataset="folder", img_size=img_size, z_dim=z_dim,
                                            seed=seed))
    folder.mkdir(parents=True, exist_ok=True)
    common.write_json(str(folder / "config.json"), dataclasses.asdict(config))
    infomax.keras.utils.set_random_seed(seed)
    infomax.build_encoder(img_size, z_dim).save_weights(str(folder / "encoder.weights.h5"))
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run") / "run")


def picture(seed, size=(12, 16)):
    """A small smooth picture (blocky noise) of `size` (h, w)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
    return blocks.repeat(4, 0).repeat(4, 1)


def write_picture(path, seed, size=(12, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(picture(seed, size))
    image.save(str(path), format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=95)
    return path


def write_folder(root, count=14):
    """Nested PNG and JPEG pictures, one greyscale and one RGBA, a text file named .png, an
    empty .jpg and a .txt. Returns (good relative paths, bad relative paths)."""
    good = []
    for i in range(count):
        sub = ["", "people", "people/close-ups", "places"][i % 4]
        name = f"{sub}/{i:02d}.{'png' if i % 3 else 'JPG'}".lstrip("/")
        write_picture(root / name, seed=i)
        good.append(name)
    Image.fromarray(picture(100)[..., 0]).save(str(root / "grey.png"))
    Image.fromarray(np.dstack([picture(101), picture(102)[..., :1]])).save(str(root / "rgba.png"))
    good += ["grey.png", "rgba.png"]
    (root / "people" / "not-an-image.png").write_text("not an image")
    (root / "places" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return sorted(good), sorted(["people/not-an-image.png", "places/empty.jpg"])


def load_codes(index):
    """{relative path: code} of an index."""
    return {f.path: np.array(code) for f, code in zip(index.files, index.codes)}


def assert_same_index(updated, scratch):
    """Same files (paths, sizes, modification times) in the same rows, same unreadable files,
    the same codes (to float32 rounding: batches are composed differently)."""
    assert updated.files == scratch.files
    assert updated.meta["unreadable"] == scratch.meta["unreadable"]
    assert updated.meta["fingerprint"] == scratch.meta["fingerprint"]
    np.testing.assert_allclose(np.asarray(updated.codes), np.asarray(scratch.codes), atol=1e-5)


def expected_codes(files, run):
    """mu of each file as `infomax.embed` computes it from uint8 images, decoded by the loader
    training uses (`image_files.load_image`, rounded to uint8)."""
    encoder, config = infomax.load_encoder(run)
    images = np.stack([np.round(image_files.load_image(f, config.img_size).numpy()).astype(np.uint8)
                       for f in files])
    return infomax.embed(images, encoder, config)


def encoder(run):
    """The run's encoder as search/ takes it."""
    return infomax.search_encoder(run)


def run_cli(*argv):
    try:
        return infomax.main(list(argv)) or 0
    except SystemExit as e:
        return e.code


# --------------------------------------------------------------------------- exact search

@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_search_equals_a_brute_force_numpy_search(metric):
    """Chunks smaller than k and uneven, a running top-k: the same rows and scores as one
    full matrix of scores sorted by numpy."""
    codes = RNG.standard_normal((1000, 16)).astype(np.float32)
    queries = RNG.standard_normal((7, 16)).astype(np.float32)
    rows, scores = nearest.exact_top_k(codes, queries, 12, metric, chunk_rows=9)
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        brute = unit(queries) @ unit(codes).T
        expected = np.argsort(-brute, axis=1)[:, :12]
        np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), atol=1e-5)
    else:
        brute = np.linalg.norm(queries[:, None] - codes[None], axis=2)
        expected = np.argsort(brute, axis=1)[:, :12]
        np.testing.assert_allclose(nearest.distances(queries, scores),
                                   np.take_along_axis(brute, expected, 1), atol=1e-4)
    np.testing.assert_array_equal(rows, expected)


def test_exact_search_of_more_neighbours_than_codes_returns_them_all():
    codes = RNG.standard_normal((5, 4)).astype(np.float32)
    rows, scores = nearest.exact_top_k(codes, codes[:2], 9, "euclidean", chunk_rows=2)
    assert rows.shape == (2, 5) and list(rows[:, 0]) == [0, 1]  # each code is its own nearest
    assert sorted(rows[0]) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- a real folder

def test_an_index_of_a_real_folder_holds_every_readable_image_and_names_the_bad_ones(
        run, tmp_path, capsys):
    good, bad = write_folder(tmp_path / "photos")
    with pytest.warns(UserWarning) as caught:
        index = Index.build(str(tmp_path / "photos"), encoder(run), str(tmp_path / "index"),
                            batch_size=4)
    warned = " ".join(str(w.message) for w in caught)
    for name in bad:
        assert str(tmp_path / "photos" / name) in warned
    assert [f.path for f in index.files] == good  # sorted by path, nested, any case
    assert [u[0] for u in index.meta["unreadable"]] == bad
    assert index.codes.dtype == np.float32 and index.codes.shape == (len(good), 8)
    assert isinstance(np.load(os.path.join(index.path, index.meta["codes"]), mmap_mode="r"),
                      np.memmap)
    with open(os.path.join(index.path, index.meta["files"])) as f:
        header = next(csv.reader(f))
    assert header == ["row", "path", "size", "mtime_ns"]
    photos = [str(tmp_path / "photos" / name) for name in good]
    np.testing.assert_allclose(index.codes, expected_codes(photos, run), atol=1e-5)
    for name in good:
        stat = os.stat(tmp_path / "photos" / name)
        assert storage.ImageFile(name, stat.st_size, stat.st_mtime_ns) in index.files
    assert not (tmp_path / "index" / ".update").exists()
    assert "16 images, 2 unreadable file(s) skipped" in capsys.readouterr().out


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_searching_an_index_equals_a_brute_force_search_of_the_folder(run, tmp_path, metric):
    good, _ = write_folder(tmp_path / "photos")
    with pytest.warns(UserWarning):
        Index.build(str(tmp_path / "photos"), encoder(run), str(tmp_path / "index"))
    index = Index.open(str(tmp_path / "index"), encoder(run))
    photos = [str(tmp_path / "photos" / name) for name in good]
    queries = photos[:3] + [str(write_picture(tmp_path / "query.png", seed=7))]
    matches = index.search(queries, k=5, metric=metric)

    bank, asked = expected_codes(photos, run), expected_codes(queries, run)
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        scores = unit(asked) @ unit(bank).T
    else:
        scores = -np.linalg.norm(asked[:, None] - bank[None], axis=2)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert matches.files == [[photos[i] for i in row] for row in expected]
    # distances near 0 are sqrt(|q|^2 - 2 q.b + |b|^2): float32 cancellation, hence 1e-3
    np.testing.assert_allclose(np.abs(matches.scores),
                               np.abs(np.take_along_axis(scores, expected, 1)),
                               atol=1e-4 if metric == "cosine" else 1e-3)
    for query, found in zip(queries[:3], matches.files):
        assert found[0] == query  # an indexed image is its own nearest neighbour
    # uint8 images at the index's size are queries too: the same answer
    images = np.stack([np.round(image_files.load_image(q, 8).numpy()).astype(np.uint8) for q in queries])
    assert index.search(images, k=5, metric=metric).files == matches.files


# --------------------------------------------------------------------------- keeping it up to date

def test_an_updated_index_equals_the_index_built_from_scratch(run, tmp_path, capsys):
    photos = tmp_path / "photos"
    good, _ = write_folder(photos)
    with pytest.warns(UserWarning):
        Index.build(str(photos), encoder(run), str(tmp_path / "index"), batch_size=4)
    capsys.readouterr()

    write_picture(photos / "new" / "added.jpg", seed=50)                    # added
    write_picture(photos / "places" / "added.png", seed=51)
    changed = photos / good[1]                                              # changed
    before = os.stat(changed)
    write_picture(changed, seed=52)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    os.remove(photos / good[2])                                             # deleted
    (photos / "places" / "empty.jpg").unlink()                              # a bad file gone
    write_picture(photos / "people" / "not-an-image.png", seed=53)          # a bad file mended

    updated = Index.build(str(photos), encoder(run), str(tmp_path / "index"), batch_size=4)
    printed = capsys.readouterr().out
    assert "4 new or changed image file(s) to encode, 14 unchanged, 2 deleted or changed" in printed
    assert updated.meta["generation"] == 2
    assert sorted(os.listdir(tmp_path / "index")) == [".lock", "codes-2.npy", "files-2.csv",
                                                      "index.json"]
    scratch = Index.build(str(photos), encoder(run), str(tmp_path / "scratch"), batch_size=3)
    assert_same_index(Index.open(str(tmp_path / "index")), scratch)
    assert updated.meta["unreadable"] == []

    Index.build(str(photos), encoder(run), str(tmp_path / "index"))  # nothing changed: no write
    assert "up to date (18 images)" in capsys.readouterr().out
    assert Index.open(str(tmp_path / "index")).meta["generation"] == 2


def test_an_update_that_only_deletes_drops_the_deleted_photo(run, tmp_path, capsys):
    """Nothing added or changed, one photo deleted: not "up to date"; the photo leaves the
    index and the search results, and the index is the one built from scratch."""
    photos = tmp_path / "photos"
    for i in range(4):
        write_picture(photos / f"{i}.png", seed=i)
    Index.build(str(photos), encoder(run), str(tmp_path / "index"))
    os.remove(photos / "2.png")
    capsys.readouterr()
    updated = Index.build(str(photos), encoder(run), str(tmp_path / "index"))
    assert "0 new or changed image file(s) to encode, 3 unchanged, 1 deleted" in capsys.readouterr().out
    assert [f.path for f in updated.files] == ["0.png", "1.png", "3.png"]
    query = write_picture(tmp_path / "query.png", seed=2)  # the deleted photo itself
    found = [r["file"] for r in updated.search([str(query)], k=4).records()]
    assert sorted(os.path.basename(f) for f in found) == ["0.png", "1.png", "3.png"]
    assert_same_index(Index.open(str(tmp_path / "index")),
                      Index.build(str(photos), encoder(run), str(tmp_path / "scratch")))


def test_an_unchanged_bad_file_is_not_decoded_again_but_a_changed_one_is(run, tmp_path, capsys):
    photos = tmp_path / "photos"
    write_folder(photos)
    with pytest.warns(UserWarning):
        Index.build(str(photos), encoder(run), str(tmp_path / "index"))
    write_picture(photos / "another.png", seed=9)
    capsys.readouterr()
    Index.build(str(photos), encoder(run), str(tmp_path / "index"))  # no warning: no bad decoded
    out = capsys.readouterr().out
    assert "1 new or changed" in out and "2 file(s) known to be unreadable" in out
    (photos / "places" / "empty.jpg").write_bytes(b"still not")
    with pytest.warns(UserWarning, match="empty.jpg"):
        Index.build(str(photos), encoder(run), str(tmp_path / "index"))


@pytest.mark.slow
def test_a_killed_indexing_resumes_to_the_same_index(run, tmp_path):
    """A real indexing process, SIGKILLed while it pauses with the codes of its third chunk
    written and not committed (TEST_PAUSE_IN_INDEX_COMMIT, tests/fault_hooks.py); the same
    command again resumes after the second chunk and gives the index built without a kill."""
    photos = tmp_path / "photos"
    write_folder(photos)
    argv = ["index", "--out", run, "--folder", str(photos), "--index", str(tmp_path / "index"),
            "--batch-size", "4", "--commit-every", "4"]
    child = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "fault_hooks.py"), "infomax.py", *argv],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TEST_PAUSE_IN_INDEX_COMMIT": "12:120"})
    try:
        for line in child.stderr:
            if "pausing before committing 12 encoded images" in line:
                break
        else:
            raise AssertionError(f"the indexing ended without pausing (exit {child.wait()})")
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (tmp_path / "index" / "index.json").exists()  # nothing committed but progress
    committed = json.load(open(tmp_path / "index" / ".update" / "progress.json"))["encoded"]
    assert 4 <= committed < 12  # two chunks of 4 images (and the bad files among them)

    resumed_out = subprocess.run([sys.executable, "infomax.py", *argv], cwd=ROOT, text=True,
                                 capture_output=True, timeout=300)
    assert resumed_out.returncode == 0, resumed_out.stderr[-2000:]
    assert f"resuming an interrupted indexing: {committed} of 18 already" in resumed_out.stdout
    with pytest.warns(UserWarning):
        scratch = Index.build(str(photos), encoder(run), str(tmp_path / "scratch"))
    assert_same_index(Index.open(str(tmp_path / "index")), scratch)
    assert not (tmp_path / "index" / ".update").exists()


def test_an_interrupted_indexing_of_a_folder_changed_since_starts_over(run, tmp_path,
                                                                       monkeypatch, capsys):
    photos = tmp_path / "photos"
    write_folder(photos)
    commit = update.commit_progress

    def interrupted_after_the_first_chunk(update_dir, progress):
        commit(update_dir, progress)
        if progress["encoded"] >= 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(update, "commit_progress", interrupted_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        Index.build(str(photos), encoder(run), str(tmp_path / "index"), batch_size=4,
                    commit_every=4)
    monkeypatch.setattr(update, "commit_progress", commit)
    write_picture(photos / "later.png", seed=60)
    capsys.readouterr()
    with pytest.warns(UserWarning):
        index = Index.build(str(photos), encoder(run), str(tmp_path / "index"))
    assert "starting over" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        scratch = Index.build(str(photos), encoder(run), str(tmp_path / "scratch"))
    assert_same_index(index, scratch)


# --------------------------------------------------------------------------- refusals

def test_an_index_of_another_encoder_or_image_size_is_refused_in_one_line(run, tmp_path, capsys):
    photos = tmp_path / "photos"
    write_folder(photos)
    with pytest.warns(UserWarning):
        Index.build(str(photos), encoder(run), str(tmp_path / "index"))
    other_weights = write_run(tmp_path / "other", seed=1)
    other_size = write_run(tmp_path / "sixteen", img_size=16)
    query = str(photos / "rgba.png")
    for other, difference in ((other_weights, "weights_sha256"),
                              (other_size, "img_size 8, not 16")):
        with pytest.raises(common.UsageError, match=difference):
            Index.build(str(photos), encoder(other), str(tmp_path / "index"))
        with pytest.raises(common.UsageError, match="another encoder"):
            Index.open(str(tmp_path / "index"), encoder(other))
        capsys.readouterr()
        for argv in (["index", "--out", other], ["search", "--out", other, "--query", query]):
            assert run_cli(*argv, "--folder", str(photos), "--index", str(tmp_path / "index")) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("error: --index") and difference in err
        assert run_cli("search", "--out", other, "--index", str(tmp_path / "index"),
                       "--query", query) == 2
        assert "another encoder" in capsys.readouterr().err
    assert Index.open(str(tmp_path / "index")).meta["generation"] == 1  # untouched


def test_an_index_of_another_folder_and_a_second_indexing_at_once_are_refused(run, tmp_path):
    write_folder(tmp_path / "photos")
    write_picture(tmp_path / "elsewhere" / "a.png", seed=1)
    with pytest.warns(UserWarning):
        Index.build(str(tmp_path / "photos"), encoder(run), str(tmp_path / "index"))
    with pytest.raises(common.UsageError, match="indexes .*photos.*not .*elsewhere"):
        Index.build(str(tmp_path / "elsewhere"), encoder(run), str(tmp_path / "index"))
    with storage.IndexLock(str(tmp_path / "index")):
        with pytest.raises(common.UsageError, match="another process is indexing"):
            Index.build(str(tmp_path / "photos"), encoder(run), str(tmp_path / "index"))


def test_bad_queries_and_places_are_one_line_errors(run, tmp_path, capsys):
    write_picture(tmp_path / "photos" / "a.png", seed=1)
    index = str(tmp_path / "index")
    assert run_cli("index", "--out", run, "--folder", str(tmp_path / "photos"),
                   "--index", index) == 0
    for argv, message in (
            (["search", "--index", index, "--query", str(tmp_path / "nowhere.png")],
             "no such file"),
            (["search", "--index", str(tmp_path / "none"), "--query", "x.png"], "no index there"),
            (["search", "--query", "x.png"], "needs --index"),
            (["index", "--out", run, "--folder", str(tmp_path / "nowhere")], "no such folder"),
            (["search", "--index", index, "--query", str(tmp_path / "photos" / "a.png"),
              "--approximate"], "no approximate index")):
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


# --------------------------------------------------------------------------- the command line

def test_search_command_prints_draws_and_writes_csv_and_json(run, tmp_path, capsys):
    good, _ = write_folder(tmp_path / "photos")
    index = str(tmp_path / "index")
    with pytest.warns(UserWarning):
        assert run_cli("index", "--out", run, "--folder", str(tmp_path / "photos"),
                       "--index", index) == 0
    queries = tmp_path / "queries"
    write_picture(queries / "q1.jpg", seed=3)
    write_picture(queries / "deeper" / "q2.png", seed=4)
    own = str(tmp_path / "photos" / good[0])
    results = tmp_path / "out"
    results.mkdir()
    assert run_cli("search", "--index", index, "--query", own, str(queries), "-k", "3",
                   "--out", run, "--results", str(results / "found.csv")) == 0
    printed = capsys.readouterr().out
    assert f"query {own}:\n    1. {own}  (cosine 1.0000)" in printed
    rows = list(csv.DictReader(open(results / "found.csv")))
    assert [(r["query"], r["rank"]) for r in rows] == [
        (q, str(rank)) for q in (own, str(queries / "q1.jpg"), str(queries / "deeper" / "q2.png"))
        for rank in (1, 2, 3)]  # a folder's images in image_files.list_image_files' order
    assert rows[0]["file"] == own and float(rows[0]["score"]) == pytest.approx(1.0, abs=1e-5)
    # the query framed (8 + 2 x 2 px), a 6 px gap, 3 neighbours
    assert iio.imread(os.path.join(run, "search_q1_cosine.png")).shape == (12, 12 + 6 + 3 * 8, 3)

    assert run_cli("search", "--index", index, "--query", own, "--metric", "euclidean",
                   "--results", str(results / "new" / "found.json"), "--max-pictures", "0") == 0
    found = json.load(open(results / "new" / "found.json"))  # its folder made
    assert [r["rank"] for r in found] == list(range(1, 10))
    # the query's own code: distance 0 up to float32 cancellation in |q|^2 - (2 q.b - |b|^2)
    # (exactly 0.0 on an Intel CPU, 8.6e-5 on an AMD one, 2026-12-04)
    assert found[0]["score"] == pytest.approx(0.0, abs=1e-3)
    assert found[0]["score"] < 1e-2 * found[1]["score"]
    assert {r["metric"] for r in found} == {"euclidean"} and found[0]["file"] == own
    assert not os.path.exists(os.path.join(run, f"search_{good[0][:-4]}_euclidean.png"))
    # --pictures: the pictures elsewhere than the run (a shipped encoder's folder stays as it is)
    before = {f: os.path.getmtime(os.path.join(run, f)) for f in os.listdir(run)}
    assert run_cli("search", "--index", index, "--query", own, "--pictures",
                   str(results / "pictures"), "--results", str(results / "again.csv")) == 0
    assert os.path.isfile(results / "pictures" / f"search_{good[0][:-4]}_cosine.png")
    assert {f: os.path.getmtime(os.path.join(run, f)) for f in os.listdir(run)} == before


# --------------------------------------------------------------------------- approximate search

def test_a_missing_faiss_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(common.UsageError, match="pip install faiss-cpu"):
        nearest.import_faiss()


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                    reason="faiss not installed (pip install faiss-cpu)")
def test_the_approximate_index_states_its_recall_and_finds_what_the_exact_search_finds(
        run, tmp_path, capsys):
    centres = RNG.standard_normal((20, 16)).astype(np.float32) * 3
    codes = centres[RNG.integers(0, 20, 4000)] + RNG.standard_normal((4000, 16)).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        approximate = nearest.build_approximate(codes, metric)
        recall = nearest.measure_recall(approximate, codes, metric, k=10, queries=100)
        assert recall["recall"] >= 0.95 and str(recall["probes"]) in recall["tried"]
        exact, exact_scores = nearest.exact_top_k(codes, codes[:50], 10, metric)
        found, scores = nearest.approximate_top_k(approximate, codes[:50], 10, metric,
                                                      approximate.nlist)  # every cluster: exact
        np.testing.assert_array_equal(found, exact)
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-3)

    photos = tmp_path / "photos"
    good, _ = write_folder(photos)
    with pytest.warns(UserWarning):
        index = Index.build(str(photos), encoder(run), str(tmp_path / "index"), approximate=True)
    about = index.meta["approximate"]
    assert about["metric"] == "cosine" and 0.0 <= about["recall"] <= 1.0
    assert "recall@10" in capsys.readouterr().out
    queries = [str(photos / name) for name in good[:4]]
    assert index.search(queries, k=3, approximate=True).files == index.search(queries, k=3).files
    write_picture(photos / "more.png", seed=70)  # an update rebuilds the approximate index too
    updated = Index.build(str(photos), encoder(run), str(tmp_path / "index"))
    assert updated.meta["approximate"]["file"] == "approximate-2.faiss"
    assert sorted(os.listdir(tmp_path / "index")) == [".lock", "approximate-2.faiss",
                                                      "codes-2.npy", "files-2.csv", "index.json"]
