"""Images are 8-bit after resizing, as the author's loader gave them (`scipy.misc.imresize`
returned uint8): a large image area-resized to the model's size has whole pixel values,
rounded half to even like `pictures.to_uint8`, in every path that reads image files
(training's stream, evaluation's batches, the real images of reconstruct and interpolate)."""

import dataclasses

import imageio.v3 as iio
import numpy as np
import pytest

import datasets
import face_runs
import f_vaes
import image_files

SIZE = 16


def large_picture(height=200, width=240, seed=0):
    """Random 8-bit pixels, wider than tall: its centred square is columns 20..220."""
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)


def area_resized(picture, size):
    """The centred square averaged over size x size blocks (an area resize by a whole factor),
    in float64, rounded half to even."""
    height, width = picture.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = picture[top:top + side, left:left + side].astype(np.float64)
    factor = side // size
    blocks = square.reshape(size, factor, size, factor, 3).mean(axis=(1, 3))
    return blocks, np.round(blocks)


@pytest.fixture
def large_files(tmp_path):
    """Three large PNGs (200 x 240: resized by 12.5 to 16) in a folder."""
    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(3):
        iio.imwrite(folder / f"{i}.png", large_picture(seed=i))
    return folder, image_files.list_image_files(str(folder))


def test_a_large_image_is_resized_to_8_bit_values(tmp_path):
    """The exact block means are mostly not whole numbers; the loaded image is them rounded."""
    picture = large_picture(height=160, width=200)  # centred square 160: blocks of 10 x 10
    exact, rounded = area_resized(picture, SIZE)
    assert np.mean(exact != np.round(exact)) > 0.9  # what the loader must not give
    iio.imwrite(tmp_path / "large.png", picture)
    loaded = image_files.load_image(str(tmp_path / "large.png"), SIZE).numpy()
    assert loaded.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(loaded, np.round(loaded))
    # float32 block sums can land either side of a tie: compare away from x.5
    away_from_ties = np.abs(exact - np.floor(exact) - 0.5) > 1e-3
    np.testing.assert_array_equal(loaded[away_from_ties], rounded[away_from_ties])
    assert np.max(np.abs(loaded - exact)) <= 0.5 + 1e-3


def test_every_reader_of_image_files_gives_8_bit_values(large_files):
    """Training's stream, evaluation's batches and the real images of reconstruct and
    interpolate (scaled to [-1, 1]): all whole pixel values. (InfoMax's folders are uint8
    arrays, rounded as they are decoded.)"""
    folder, files = large_files
    whole = lambda x: np.testing.assert_allclose(x, np.round(x), atol=0)  # noqa: E731
    stream = datasets.image_stream(files, SIZE, batch_size=3, scale=lambda x: x, seed=0)
    whole(next(iter(stream)).numpy())
    whole(next(iter(datasets.image_dataset(files, SIZE, 3, lambda x: x))).numpy())
    config = dataclasses.replace(f_vaes.Config(img_size=SIZE), data_dir=str(folder), holdout=1)
    real = face_runs.real_images(config, 4, seed=0)
    pixels = (real.astype(np.float64) + 1.0) / 2.0 * 255.0
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
