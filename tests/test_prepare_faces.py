"""tools/prepare_faces.py: a folder of photographs becomes SIZE x SIZE JPEGs made by the
training loader's own crop and resize, under the same relative paths; bad files are named,
a second run writes nothing, a missing folder is one line."""

import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import image_files  # noqa: E402
import prepare_faces  # noqa: E402


def test_prepare_faces(tmp_path):
    source, target = tmp_path / "src", tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    # a tall photograph (CelebA's aligned images are 178 wide, 218 high) with a smooth picture
    # and a bright band at the top that the centred square must cut away
    tall = np.tile(np.linspace(0, 255, 178, dtype=np.uint8)[None, :, None], (218, 1, 3))
    tall[:20] = 255
    imageio.imwrite(source / "a.png", tall)
    imageio.imwrite(source / "sub" / "b.jpg", rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    (source / "broken.jpg").write_text("not an image")

    written, kept, bad = prepare_faces.prepare(str(source), str(target), 64)
    assert (written, kept) == (2, 0) and bad == [str(source / "broken.jpg")]
    a = imageio.imread(target / "a.jpg")
    assert a.shape == (64, 64, 3) and imageio.imread(target / "sub" / "b.jpg").shape == (64, 64, 3)
    expected = image_files.load_image(str(source / "a.png"), 64).numpy()
    assert np.abs(a.astype(float) - expected).mean() < 2.0  # JPEG q95 round-off only
    assert a[:3].mean() < 250  # the band above the centred square is gone

    assert prepare_faces.prepare(str(source), str(target), 64)[:2] == (0, 2)


@pytest.mark.slow
def test_missing_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_faces.py"),
                             str(tmp_path / "nope"), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: SOURCE")


def test_a_zip_file_gives_what_its_unpacked_folder_gives(tmp_path):
    """CelebA comes as img_align_celeba.zip: its members are read in place, and the folder they
    share is left out of the written paths, so the JPEGs are those of the unpacked folder."""
    import zipfile
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("000001.jpg", "000002.png"):
        imageio.imwrite(folder / name, rng.integers(0, 256, (109, 89, 3), dtype=np.uint8))
    with zipfile.ZipFile(tmp_path / "img_align_celeba.zip", "w") as archive:
        for name in ("000001.jpg", "000002.png"):
            archive.write(folder / name, f"img_align_celeba/{name}")
    assert prepare_faces.prepare(str(tmp_path / "img_align_celeba.zip"), str(tmp_path / "z"),
                                 32)[:2] == (2, 0)
    assert prepare_faces.prepare(str(folder), str(tmp_path / "f"), 32)[:2] == (2, 0)
    for name in ("000001.jpg", "000002.jpg"):
        assert (tmp_path / "z" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()
