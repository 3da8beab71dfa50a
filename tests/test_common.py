"""The shared plumbing: image folders with bad files, the tf.data pipeline, picture grids,
run folders and resumable checkpoints."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf
import keras
from PIL import Image

import common
import pictures
import image_files
import datasets
import training.checkpoint

RNG = np.random.RandomState(0)


def write_messy_folder(root):
    """A real folder of image files of every kind a user's folder may hold."""
    rgb = (RNG.rand(40, 30, 3) * 255).astype("uint8")
    nested = root / "nested" / "deeper"
    nested.mkdir(parents=True)
    good = {
        "rgb.png": lambda p: Image.fromarray(rgb).save(p),
        "upper.JPG": lambda p: Image.fromarray(rgb).save(p, format="JPEG"),
        "grey.jpeg": lambda p: Image.fromarray(rgb[..., 0]).save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "deep16.png": lambda p: tf.io.write_file(
            p, tf.io.encode_png((RNG.rand(20, 20, 3) * 65535).astype("uint16"))),
        "small.png": lambda p: Image.fromarray(rgb[:5, :7]).save(p),
        "large.jpg": lambda p: Image.fromarray((RNG.rand(1500, 2000, 3) * 255).astype("uint8")).save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "nested/deeper/wide.png": lambda p: Image.fromarray(rgb.transpose(1, 0, 2)).save(p),
    }
    bad = {
        "empty.png": lambda p: open(p, "wb").close(),
        "text.png": lambda p: open(p, "w").write("not an image"),
        "truncated.jpg": None,
    }
    for name, write in good.items():
        write(str(root / name))
    for name, write in bad.items():
        if write:
            write(str(root / name))
    data = open(root / "upper.JPG", "rb").read()
    open(root / "truncated.jpg", "wb").write(data[: len(data) // 2])
    (root / "notes.txt").write_text("ignored: not an image extension")
    return sorted(str(root / n) for n in good), sorted(str(root / n) for n in bad)


def test_messy_folder_keeps_every_readable_image_and_names_the_bad_ones(tmp_path, capsys):
    good, bad = write_messy_folder(tmp_path)
    files = image_files.list_image_files(str(tmp_path))
    assert sorted(files) == sorted(good + bad)  # recursive, any case, no .txt
    with pytest.warns(UserWarning) as caught:
        readable = image_files.scan_image_folder(str(tmp_path), img_size=16)
    assert sorted(readable) == good
    warned = " ".join(str(w.message) for w in caught)
    for path in bad:
        assert path in warned
    assert f"skipped 3 unreadable image file(s) of {len(good) + 3}" in capsys.readouterr().err
    batch = next(iter(datasets.image_dataset(readable, 16, len(good), lambda x: x / 255 * 2 - 1)))
    assert batch.shape == (len(good), 16, 16, 3)
    assert -1.0 <= float(tf.reduce_min(batch)) and float(tf.reduce_max(batch)) <= 1.0


def test_missing_or_empty_or_unusable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(common.UsageError, match=r"--data-dir '.*nowhere': no such folder"):
        image_files.list_image_files(str(tmp_path / "nowhere"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(common.UsageError, match="no .png/.jpg/.jpeg files found"):
        image_files.list_image_files(str(tmp_path))
    open(tmp_path / "x.png", "wb").close()
    with pytest.warns(UserWarning), pytest.raises(common.UsageError, match="none of its 1 image file"):
        image_files.scan_image_folder(str(tmp_path), 8)


def test_centre_square_crop_of_a_tall_image_takes_the_middle_rows():
    image = np.zeros((10, 4, 3), np.uint8)
    image[3:7] = 255  # rows (h-w)/2 .. (h-w)/2+w = 3..7
    crop = image_files.centre_square(tf.constant(image)).numpy()
    assert crop.shape == (4, 4, 3) and crop.min() == 255
    assert image_files.centre_square(tf.constant(image.transpose(1, 0, 2))).numpy().min() == 255


def test_dataset_scales_pixels_and_reshuffles_each_pass(tmp_path):
    paths = []
    for i in range(6):
        p = str(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(p)
        paths.append(p)
    ds = datasets.image_stream(paths, 8, 6, lambda x: x / 255 - 0.5, seed=1)
    it = iter(ds)
    images = next(it).numpy()
    labels = np.round((images[:, 0, 0, 0] + 0.5) * 255 / 40)  # each file's pixel value names it
    np.testing.assert_allclose(images[:, 0, 0, 0], labels * 40 / 255 - 0.5, atol=1e-6)
    assert sorted(labels) == list(range(6))  # one pass: every image once
    orders = [tuple(np.round((next(it).numpy()[:, 0, 0, 0] + 0.5) * 255 / 40)) for _ in range(4)]
    assert len(set(orders + [tuple(labels)])) > 1


def test_grid_tiles_row_by_row_with_the_spec_pixel_mapping(tmp_path):
    images = np.stack([np.full((2, 3, 3), v, np.float32) for v in (-1.0, 0.0, 1.0, 2.0)])
    grid = pictures.image_grid(images, rows=2, cols=2)
    assert grid.shape == (4, 6, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 128 and grid[2, 0, 0] == 255 and grid[2, 3, 0] == 255
    path = pictures.save_grid(str(tmp_path / "g.png"), images, 2, 2)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    assert os.listdir(tmp_path) == ["g.png"]


def test_neighbour_grid_frames_the_query_and_leaves_every_tile_untouched():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    blocks = [rng.integers(0, 256, (2, k, 4, 5, 3), dtype=np.uint8) for k in (3, 2)]
    grid, offsets = pictures.neighbour_grid(queries, blocks, value_range=(0, 255))
    frame, gap = pictures.QUERY_FRAME, pictures.NEIGHBOUR_GAP
    assert offsets == [5 + 2 * frame + gap, 5 + 2 * frame + gap + 3 * 5 + gap]
    assert grid.shape == (2 * (4 + 2 * frame), offsets[1] + 2 * 5, 3)
    for row in range(2):
        top = row * (4 + 2 * frame)
        framed = grid[top:top + 4 + 2 * frame, :5 + 2 * frame]
        inside = np.zeros(framed.shape[:2], bool)
        inside[frame:frame + 4, frame:frame + 5] = True
        assert (framed[~inside] == pictures.QUERY_FRAME_COLOUR).all()  # a red frame all round
        np.testing.assert_array_equal(framed[inside].reshape(4, 5, 3), queries[row])
        assert (grid[top:top + 4 + 2 * frame, 5 + 2 * frame:offsets[0]] == 255).all()  # white
        for x, block in zip(offsets, blocks):
            for k, tile in enumerate(block[row]):  # each neighbour pixel for pixel
                np.testing.assert_array_equal(
                    grid[top + frame:top + frame + 4, x + 5 * k:x + 5 * k + 5], tile)
    assert (grid[:, offsets[0] + 3 * 5:offsets[1]] == 255).all()  # the gap between blocks


def test_a_png_over_its_size_limit_is_stored_in_256_colours(tmp_path):
    picture = RNG.randint(0, 256, (64, 64, 3)).astype(np.uint8)  # noise: 4096 colours
    full = pictures.write_png(str(tmp_path / "full.png"), picture, max_bytes=10**6)
    np.testing.assert_array_equal(np.asarray(Image.open(full)), picture)
    small = pictures.write_png(str(tmp_path / "small.png"), picture, max_bytes=10_000)
    assert Image.open(small).mode == "P" and len(Image.open(small).getcolors()) <= 256
    assert os.path.getsize(small) < os.path.getsize(full)
    assert sorted(os.listdir(tmp_path)) == ["full.png", "small.png"]


def test_labels_go_in_strips_above_the_columns_and_left_of_the_rows():
    grid = np.zeros((2 * 16, 3 * 16, 3), np.uint8)
    labelled = pictures.with_labels(grid, 16, ["a", "b", "c"], ["row 1", "row 2"])
    height, width, _ = labelled.shape
    assert 2 * 16 < height < 2 * 16 + 30 and 3 * 16 < width < 3 * 16 + 60
    np.testing.assert_array_equal(labelled[height - 32:, width - 48:], grid)  # bottom right
    assert labelled[:height - 32].min() < 128 and labelled[:, :width - 48].min() < 128  # text
    np.testing.assert_array_equal(pictures.with_labels(grid, 16), grid)


def test_unwritable_out_is_reported_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(common.UsageError, match=r"--out '.*file/run': cannot write there"):
        common.ensure_writable_dir(str(blocker / "run"))


def test_resumed_run_must_have_the_same_model_flags(tmp_path):
    training.checkpoint.check_run_config(str(tmp_path), {"img_size": 128, "lr": 1e-4}, ["img_size"])
    training.checkpoint.check_run_config(str(tmp_path), {"img_size": 128, "lr": 1e-5}, ["img_size"])
    with pytest.raises(common.UsageError, match="saved with --img-size 128, asked for 64"):
        training.checkpoint.check_run_config(str(tmp_path), {"img_size": 64, "lr": 1e-5}, ["img_size"])


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_run_checkpoint_resumes_with_weights_optimiser_state_and_one_csv_line_per_epoch(tmp_path):
    x = RNG.randn(32, 3).astype("float32")
    y = x.sum(1, keepdims=True)
    run = str(tmp_path)
    model = tiny_model()
    cb = training.checkpoint.RunCheckpoint(run)
    model.fit(x, y, batch_size=8, epochs=2, initial_epoch=cb.restore(model), callbacks=[cb], verbose=0)
    saved = [w.numpy() for w in model.weights]
    steps = int(model.optimizer.iterations.numpy())

    resumed = tiny_model()
    cb2 = training.checkpoint.RunCheckpoint(run)
    start = cb2.restore(resumed)
    assert start == 2
    for a, b in zip(saved, resumed.weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(resumed.optimizer.iterations.numpy()) == steps
    resumed.fit(x, y, batch_size=8, epochs=3, initial_epoch=start, callbacks=[cb2], verbose=0)
    rows = list(csv.reader(open(os.path.join(run, "log.csv"))))
    assert [r[0] for r in rows] == ["epoch", "1", "2", "3"]
    assert sorted(os.listdir(run)) == ["best.weights.h5", "events.log", "latest.weights.h5", "log.csv",
                                       "previous.weights.h5", "state.json"]
    assert common.read_json(os.path.join(run, "state.json"))["epochs_done"] == 3


def test_best_weights_are_the_lowest_loss_epochs_also_across_a_resume(tmp_path):
    """best.weights.h5 holds the weights of the epoch whose logged loss is lowest (found here by
    brute force in log.csv): not the last epoch, not the highest loss, never a NaN epoch, and
    a resumed run remembers the best loss so far."""
    run = str(tmp_path)

    def finish_epochs(checkpoint, model, first, losses):
        for number, loss in enumerate(losses, start=first):
            for w in model.trainable_weights:  # weights that say which epoch they are
                w.assign(np.full(w.shape, number, "float32"))
            checkpoint.on_epoch_end(number - 1, {"loss": loss})

    def best_epoch_saved():
        model = tiny_model()
        model.load_weights(os.path.join(run, "best.weights.h5"))
        (number,) = {float(v) for w in model.trainable_weights for v in w.numpy().ravel()}
        return int(number)

    def lowest_loss_epoch():
        rows = list(csv.DictReader(open(os.path.join(run, "log.csv"))))
        losses = [float(row["loss"]) for row in rows]
        return int(rows[int(np.nanargmin(losses))]["epoch"])

    model = tiny_model()
    checkpoint = training.checkpoint.RunCheckpoint(run)
    checkpoint.set_model(model)
    finish_epochs(checkpoint, model, 1, [3.0, 1.0, 2.0, float("nan"), 1.5])
    assert lowest_loss_epoch() == 2 and best_epoch_saved() == 2

    resumed = tiny_model()
    checkpoint = training.checkpoint.RunCheckpoint(run)
    assert checkpoint.restore(resumed) == 5
    checkpoint.set_model(resumed)
    finish_epochs(checkpoint, resumed, 6, [1.2])  # lower than the epochs before, not than 1.0
    assert lowest_loss_epoch() == 2 and best_epoch_saved() == 2
    finish_epochs(checkpoint, resumed, 7, [0.5, 0.7])
    assert lowest_loss_epoch() == 7 and best_epoch_saved() == 7


def test_resume_cuts_csv_lines_written_after_the_last_saved_epoch(tmp_path):
    x = RNG.randn(16, 3).astype("float32")
    model = tiny_model()
    cb = training.checkpoint.RunCheckpoint(str(tmp_path))
    model.fit(x, x[:, :1], epochs=1, callbacks=[cb], verbose=0)
    with open(tmp_path / "log.csv", "a") as f:  # a line from an epoch whose save never finished
        f.write("2,0.5\n")
    assert training.checkpoint.RunCheckpoint(str(tmp_path)).restore(tiny_model()) == 1
    assert [r[0] for r in csv.reader(open(tmp_path / "log.csv"))] == ["epoch", "1"]


def test_unreadable_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    model = tiny_model()
    cb = training.checkpoint.RunCheckpoint(str(tmp_path))
    model.fit(RNG.randn(8, 3), RNG.randn(8, 1), epochs=1, callbacks=[cb], verbose=0)
    for name in ("latest.weights.h5", "best.weights.h5"):  # every save damaged: no fallback
        with open(tmp_path / name, "r+b") as f:
            f.truncate(100)
    with pytest.raises(common.UsageError, match=r"no checkpoint can be read \(.*latest.weights.h5: "
                                                r"OSError: .*truncated"):
        training.checkpoint.RunCheckpoint(str(tmp_path)).restore(tiny_model())


def test_epoch_count_travels_inside_the_weights_file(tmp_path):
    """A run killed after the weights were renamed but before state.json was written
    resumes at the epoch of the weights, not one behind."""
    x = RNG.randn(16, 3).astype("float32")
    model = tiny_model()
    cb = training.checkpoint.RunCheckpoint(str(tmp_path))
    model.fit(x, x[:, :1], epochs=2, callbacks=[cb], verbose=0)
    common.write_json(str(tmp_path / "state.json"), {"epochs_done": 1, "best": None})  # stale
    assert training.checkpoint.weights_attrs(str(tmp_path / "latest.weights.h5"))["epochs_done"] == 2
    assert training.checkpoint.RunCheckpoint(str(tmp_path)).restore(tiny_model()) == 2


def test_unshuffled_dataset_keeps_the_file_order(tmp_path):
    paths = []
    for i in range(40):
        p = str(tmp_path / f"{i:02d}.png")
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(p)
        paths.append(p)
    ds = datasets.image_dataset(paths, 4, 40, lambda x: x)
    np.testing.assert_allclose(next(iter(ds)).numpy()[:, 0, 0, 0], np.arange(40), atol=1e-4)


def test_resume_continues_the_models_random_stream():
    """SeedGenerator states are not in save_weights; RunCheckpoint keeps them, so a resumed
    run draws the noise an uninterrupted run would have drawn next, not epoch 1's again."""
    import tempfile

    class Noisy(keras.Sequential):
        def __init__(self):
            super().__init__([keras.Input((3,)), keras.layers.Dense(1)])
            self.noise = keras.random.SeedGenerator(7)

    run = tempfile.mkdtemp()
    model = Noisy()
    model.compile("adam", "mse")
    model.optimizer.build(model.trainable_variables)
    keras.random.normal((2,), seed=model.noise)
    cb = training.checkpoint.RunCheckpoint(run)
    cb.set_model(model)
    cb.on_epoch_end(0, {"loss": 1.0})
    expected_next = keras.random.normal((2,), seed=model.noise).numpy()

    resumed = Noisy()
    resumed.compile("adam", "mse")
    resumed.optimizer.build(resumed.trainable_variables)
    assert training.checkpoint.RunCheckpoint(run).restore(resumed) == 1
    np.testing.assert_array_equal(keras.random.normal((2,), seed=resumed.noise).numpy(), expected_next)
