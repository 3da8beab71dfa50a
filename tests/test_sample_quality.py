"""sample_quality.py against references computed another way: pixel loops for the spectrum,
a Denman-Beavers matrix square root and closed forms for the Fréchet distance, double loops
for precision and recall."""

import math

import numpy as np
import pytest

from sample_quality import (frechet_distance, frechet_distance_from_moments,
                            high_frequency_ratio, plot_spectra, precision_recall,
                            radial_power_spectrum)


def loop_spectrum(images):
    """The radial spectrum by explicit loops: a DFT sum per frequency, the frequency folded
    to its distance from 0 around the circle (min(u, H - u)), binned by rounded radius."""
    count, height, width, channels = images.shape
    nyquist = min(height, width) // 2
    totals, points = [0.0] * (nyquist + 1), [0] * (nyquist + 1)
    for u in range(height):
        for v in range(width):
            radius = round(math.hypot(min(u, height - u), min(v, width - v)))
            if radius > nyquist:
                continue
            power = 0.0
            for image in images:
                for c in range(channels):
                    pixels = image[:, :, c] - image[:, :, c].mean()
                    coefficient = sum(pixels[y, x] * np.exp(-2j * np.pi * (u * y / height + v * x / width))
                                      for y in range(height) for x in range(width))
                    power += abs(coefficient) ** 2 / (height * width)
            totals[radius] += power / (count * channels)
            points[radius] += 1
    return np.array(totals) / np.array(points)


def box_blur(images):
    """Each pixel the mean of its 3x3 neighbourhood, wrapping around the edges."""
    return sum(np.roll(images, (dy, dx), axis=(1, 2))
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


@pytest.mark.parametrize("shape", [(8, 8), (6, 10)])
def test_spectrum_matches_pixel_loops(shape):
    images = np.random.default_rng(0).uniform(0, 255, (2, *shape, 3))
    frequencies, power = radial_power_spectrum(images, batch=1)  # summed a batch at a time
    assert list(frequencies) == list(range(min(shape) // 2 + 1))
    np.testing.assert_allclose(power, loop_spectrum(images), rtol=1e-10, atol=1e-6)


def test_cosine_puts_its_energy_in_its_frequency_bin():
    y, x = np.mgrid[:32, :32]
    wave = 128 + 100 * np.cos(2 * np.pi * (3 * y + 4 * x) / 32)  # radius sqrt(3^2 + 4^2) = 5
    _, power = radial_power_spectrum(np.repeat(wave[None, :, :, None], 3, axis=3))
    assert np.argmax(power) == 5
    assert np.delete(power, 5).max() < 1e-20 * power[5]


def test_a_blurred_copy_is_less_sharp_and_an_identical_one_exactly_as_sharp():
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    assert high_frequency_ratio(images, images) == 1.0
    assert high_frequency_ratio(box_blur(images.astype(float)), images) < 0.5


def test_a_change_of_contrast_is_not_sharpness():
    images = np.random.default_rng(2).uniform(0, 255, (4, 16, 16, 3))
    assert high_frequency_ratio(images / 2 + 60, images) == pytest.approx(1.0, rel=1e-12)


def test_plot_spectra_writes_a_png(tmp_path):
    images = np.random.default_rng(3).uniform(0, 255, (2, 16, 16, 3))
    curves = {"real": radial_power_spectrum(images), "blurred": radial_power_spectrum(box_blur(images))}
    plot_spectra(curves, tmp_path / "spectra.png")
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def denman_beavers_sqrt(matrix, steps=50):
    """A square root of a matrix with no eigenvalues on the closed negative real axis."""
    root, inverse_root = matrix, np.eye(len(matrix))
    for _ in range(steps):
        root, inverse_root = ((root + np.linalg.inv(inverse_root)) / 2,
                              (inverse_root + np.linalg.inv(root)) / 2)
    return root


def random_covariance(rng, size):
    factor = rng.normal(size=(size, size))
    return factor @ factor.T + 0.1 * np.eye(size)


def test_frechet_distance_of_a_set_to_itself_is_zero():
    features = np.random.default_rng(4).normal(3.0, 10.0, (400, 16))
    scale = np.trace(np.cov(features, rowvar=False))
    assert abs(frechet_distance(features, features)) < 1e-6 * scale


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    rng = np.random.default_rng(5)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == \
        pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_correlated_gaussians_matches_eigenvalues_of_the_product():
    rng = np.random.default_rng(6)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    cov_a, cov_b = random_covariance(rng, 5), random_covariance(rng, 5)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_a @ cov_b)).real.sum()  # eigenvalues real, > 0
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_features_matches_unbiased_moments_and_denman_beavers():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(12, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(9, 4)) @ rng.normal(size=(4, 4)) + 1
    moments = []
    for features in (a, b):
        centred = features - features.mean(0)
        moments.append((features.mean(0), centred.T @ centred / (len(features) - 1)))
    (mu_a, cov_a), (mu_b, cov_b) = moments
    trace_sqrt = np.trace(denman_beavers_sqrt(cov_a @ cov_b))
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def loop_precision_recall(real, fake, k):
    """Kynkäänniemi et al.'s definitions, one pair of points at a time."""
    def radii(points):
        return [sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)[k - 1]
                for i, p in enumerate(points)]

    def fraction_inside(points, centres):
        centre_radii = radii(centres)
        return sum(any(np.linalg.norm(p - c) <= r for c, r in zip(centres, centre_radii))
                   for p in points) / len(points)

    return fraction_inside(fake, real), fraction_inside(real, fake)


def test_precision_and_recall_match_double_loops():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(20, 3)), rng.normal(0.8, 1.3, (25, 3))
    expected = loop_precision_recall(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # so that a wrong radius shows
    assert precision_recall(real, fake, k=3, rows=7) == pytest.approx(expected, abs=1e-12)


def test_a_set_against_itself_has_precision_and_recall_one():
    features = np.random.default_rng(9).normal(size=(300, 8))
    assert precision_recall(features, features, k=3, rows=64) == (1.0, 1.0)


def test_mode_collapse_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(10)
    real = np.concatenate([rng.normal(0, 1, (50, 4)), rng.normal(100, 1, (50, 4))])
    assert precision_recall(real, real[:50]) == (1.0, 0.5)  # the samples cover one mode of two


def test_fakes_far_away_have_zero_precision():
    rng = np.random.default_rng(11)
    real, fake = rng.normal(size=(40, 4)), rng.normal(50, 1, (40, 4))
    assert precision_recall(real, fake) == (0.0, 0.0)


# --------------------------------------------------------------------------- on a model

def test_quality_scores_measure_every_set_against_the_held_out_faces(tmp_path):
    """`face_runs.quality_scores` (what `evaluate --quality-samples N --features ENCODER`
    reports): the training faces (the floor) and the samples at T = 1.0 and 0.8 scored against
    the held-out faces, the spectra plotted; the shipped CIFAR-10 encoder stands in for one
    trained on faces (images resized to its 32x32)."""
    import imageio.v3 as iio
    import f_vaes
    import face_runs
    from test_f_vaes import smooth_images, tiny_model

    faces = tmp_path / "faces"  # the spectra's PNG goes beside, not among the faces
    faces.mkdir()
    pictures = ((smooth_images(24, 16, seed=1) + 1) * 127.5).round().astype(np.uint8)
    for i, picture in enumerate(pictures):
        iio.imwrite(faces / f"{i:03d}.png", picture)
    config = f_vaes.Config(img_size=16, holdout=12, data_dir=str(faces))
    features = face_runs.infomax_features("dim-cifar10", 16)
    model = tiny_model()
    quality = face_runs.quality_scores(model, config, features, samples=10,
                                       spectra_path=str(tmp_path / "spectra.png"))
    assert quality["reference_images"] == 12
    assert set(quality) == {"reference_images", "training faces", "T1.0", "T0.8"}
    for name in ("training faces", "T1.0", "T0.8"):
        numbers = quality[name]
        assert numbers["images"] == 10 and numbers["sharpness"] > 0
        assert numbers["frechet_distance"] > 0
        assert 0 <= numbers["precision"] <= 1 and 0 <= numbers["recall"] <= 1
    # the training faces are drawn like the held-out ones: nearer to them than noise samples
    assert quality["training faces"]["frechet_distance"] < quality["T1.0"]["frechet_distance"]
    assert (tmp_path / "spectra.png").stat().st_size > 1000

    # compare.py keeps the real faces between checkpoints: the same scores, and from the
    # second checkpoint on only the samples are encoded (two sets here, not four)
    encoded = []

    def counted(images):
        encoded.append(len(images))
        return features(images)
    real_faces = {}
    for calls in (4, 2):
        encoded.clear()
        kept = face_runs.quality_scores(model, config, counted, samples=10, real_faces=real_faces)
        assert kept == quality and len(encoded) == calls
    # another seed draws other training faces: the kept ones are not reused
    assert (face_runs.quality_scores(model, config, counted, samples=10, seed=1,
                                     real_faces=real_faces)
            == face_runs.quality_scores(model, config, features, samples=10, seed=1))


def test_the_sweep_scores_every_temperature(tmp_path):
    """`f_vaes.py sweep --quality-samples N --features ENCODER` (the article's temperature
    trade-off as numbers): every temperature of the sweep scored, written to
    sweep_quality.json and plotted. At T = 0 every sample is the same image (z = 0), whose
    k-NN radius among the samples is 0, so no held-out face lies in the samples' manifold:
    recall is exactly 0 there, and the other temperatures' samples score differently."""
    import argparse
    import json
    import imageio.v3 as iio
    import f_vaes
    import face_runs
    from test_f_vaes import smooth_images, tiny_model

    faces = tmp_path / "faces"
    faces.mkdir()
    for i, picture in enumerate(((smooth_images(24, 16, seed=1) + 1) * 127.5).round()
                                .astype(np.uint8)):
        iio.imwrite(faces / f"{i:03d}.png", picture)
    config = f_vaes.Config(img_size=16, holdout=12, data_dir=str(faces))
    args = argparse.Namespace(out=str(tmp_path), rows=2, sweep=[0.0, 0.5, 1.0], seed=0,
                              quality_samples=10, features="dim-cifar10")
    face_runs.command_sweep(args, config, tiny_model())
    quality = json.loads((tmp_path / "sweep_quality.json").read_text())
    assert quality["quality_features"] == "dim-cifar10" and quality["quality_samples"] == 10
    assert {"training faces", "T0.0", "T0.5", "T1.0"} <= set(quality)
    assert quality["T0.0"]["recall"] == 0.0
    assert len({quality[t]["frechet_distance"] for t in ("T0.0", "T0.5", "T1.0")}) == 3
    assert (tmp_path / "sweep_quality.png").stat().st_size > 1000
    assert (tmp_path / "sweep.png").exists()
