"""How good a set of generated images is, measured against real ones: sharpness from the
images' power spectra, and the Fréchet distance and improved precision and recall of their
features. Pure numpy, float64 inside.

Images are (N, H, W, 3) arrays, uint8 or float in [0, 255]; features are (N, F) arrays
from an encoder. Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics
and their unfair treatment of diffusion models") find that a self-supervised encoder's
features rank generated images closer to how people do than the supervised Inception
features FID was defined with; here that encoder can be the project's Deep InfoMax one."""

import numpy as np

HIGH_BAND = 1 / 3  # the top third of the frequency bins: above 2/3 of the Nyquist radius


def radial_power_spectrum(images, batch=256):
    """(frequencies, power): the images' power spectrum averaged over directions.

    Each image channel, less its own mean, goes through a 2-D FFT; its power |FFT2|^2 / (H W)
    (by Parseval these sum, over all frequencies, to the channel's sum of squared pixels) is
    averaged over images and channels. A frequency point (fy, fx), in cycles per image, is
    `np.fft.fftfreq(size) * size` along each axis, so indices past the middle count as
    negative frequencies; it falls in the bin of radius round(sqrt(fy^2 + fx^2)). `power[r]`
    is the mean power of the points in bin r, for r = 0 .. floor(min(H, W) / 2) (Nyquist);
    the corner points beyond that radius are left out. Bin 0 is the removed mean: 0."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]  # grey images
    count, height, width, channels = images.shape
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    radius = np.rint(np.hypot(fy[:, None], fx[None, :])).astype(int)
    power = np.zeros((height, width))
    for start in range(0, count, batch):  # a batch at a time: a float64 copy of all is large
        chunk = images[start:start + batch].astype(np.float64)
        chunk -= chunk.mean(axis=(1, 2), keepdims=True)
        power += (np.abs(np.fft.fft2(chunk, axes=(1, 2))) ** 2).sum(axis=(0, 3))
    power /= count * channels * height * width
    nyquist = min(height, width) // 2
    kept = radius <= nyquist
    totals = np.bincount(radius[kept], weights=power[kept], minlength=nyquist + 1)
    return np.arange(nyquist + 1), totals / np.bincount(radius[kept], minlength=nyquist + 1)


def high_frequency_share(power, top=HIGH_BAND):
    """The fraction of a radial spectrum's non-DC power (the sum of its curve over bins 1 ..
    Nyquist) that lies in its top `top` of the bins, those of radius > (1 - top) * Nyquist."""
    radius = np.arange(len(power))
    return power[radius > (1 - top) * radius[-1]].sum() / power[1:].sum()


def high_frequency_ratio(samples, reals, top=HIGH_BAND):
    """How sharp the samples are next to the real images: the samples' high-frequency share
    divided by the reals'. 1.0 is as sharp as the real images; below 1 is blurrier. Shares,
    not absolute powers, so that a global change of contrast does not count as sharpness."""
    samples, reals = np.asarray(samples), np.asarray(reals)
    if samples.shape[1:3] != reals.shape[1:3]:
        raise ValueError(f"samples are {samples.shape[1:3]} pixels, reals {reals.shape[1:3]}")
    share = [high_frequency_share(radial_power_spectrum(x)[1], top) for x in (samples, reals)]
    return float(share[0] / share[1])


def plot_spectra(curves, path, top=HIGH_BAND):
    """Write a PNG of radial spectra, {name: (frequencies, power)}, power on a log scale; the
    shaded band is the one high_frequency_ratio measures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (frequencies, power) in curves.items():
        axes.semilogy(frequencies[1:], power[1:], label=name)  # bin 0, the removed mean, is 0
    nyquist = max(frequencies[-1] for frequencies, _ in curves.values())
    axes.axvspan((1 - top) * nyquist, nyquist, color="grey", alpha=0.15)
    axes.set_xlabel("spatial frequency (cycles per image)")
    axes.set_ylabel("mean power")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


MEASURES = ("sharpness", "frechet_distance", "precision", "recall")  # as face_runs reports them


def plot_against_temperature(quality, temperatures, path):
    """Write a PNG of each measure of `quality` (`face_runs.quality_scores`: {"T<t>": {measure:
    value}, "training faces": {...}}) against the temperatures, the training faces' value (the
    floor) dotted; a measure no set has is left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measures = [m for m in MEASURES if m in quality.get(f"T{temperatures[0]}", {})]
    figure = Figure(figsize=(3.2 * len(measures), 3))
    FigureCanvasAgg(figure)
    for i, measure in enumerate(measures):
        axes = figure.add_subplot(1, len(measures), i + 1)
        axes.plot(temperatures, [quality[f"T{t}"][measure] for t in temperatures], marker="o",
                  label="samples")
        axes.axhline(quality["training faces"][measure], color="grey", linestyle=":",
                     label="training faces (floor)")
        axes.set_title(measure.replace("_", " "), fontsize=9)
        axes.set_xlabel("temperature T")
    figure.axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _symmetric_sqrt(matrix):
    """The square root of a symmetric positive semi-definite matrix, by its eigenvalues
    (tiny negative ones, from rounding, clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b):
    """The Fréchet (2-Wasserstein) distance between the Gaussians N(mu_a, cov_a) and
    N(mu_b, cov_b), as FID uses it (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
    Update Rule Converge to a Local Nash Equilibrium"):

        |mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)).

    cov_a cov_b is not symmetric, but it has the eigenvalues of the symmetric positive
    semi-definite cov_a^(1/2) cov_b cov_a^(1/2), so tr((cov_a cov_b)^(1/2)) is the sum of the
    square roots of those (tiny negative ones clipped to 0)."""
    mu_a, cov_a, mu_b, cov_b = (np.asarray(x, np.float64) for x in (mu_a, cov_a, mu_b, cov_b))
    root_a = _symmetric_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def frechet_distance(features_a, features_b):
    """The Fréchet distance between two sets of features, each summed up by its mean and its
    covariance (ddof=1, as FID's reference code computes it)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False),
                                         b.mean(0), np.cov(b, rowvar=False))


def _squared_distances(a, b):
    """(len(a), len(b)) squared Euclidean distances, |a|^2 + |b|^2 - 2 a.b."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(squared, 0)


def _knn_radii(points, k, rows):
    """The squared distance from each point to its k-th nearest neighbour in its own set,
    the point itself not counted."""
    radii = np.empty(len(points))
    for start in range(0, len(points), rows):
        squared = _squared_distances(points[start:start + rows], points)
        own = np.arange(len(squared))
        squared[own, start + own] = np.inf  # a point is not its own neighbour
        radii[start:start + rows] = np.partition(squared, k - 1, axis=1)[:, k - 1]
    return radii


def _in_manifold(points, centres, radii, rows):
    """The fraction of `points` that lie in the union of the balls around `centres`: within
    some centre's radius of it."""
    inside = 0
    for start in range(0, len(points), rows):
        squared = _squared_distances(points[start:start + rows], centres)
        inside += (squared <= radii[None, :]).any(axis=1).sum()
    return float(inside / len(points))


def precision_recall(real_features, fake_features, k=3, rows=1000):
    """(precision, recall) of Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
    for Assessing Generative Models". Each set's manifold is the union of balls around its
    points, each of radius the Euclidean distance to the point's k-th nearest neighbour
    within the set (the point itself excluded). Precision is the fraction of fake points in
    the real manifold (closer to some real point than that point's radius), how many samples
    look real; recall the fraction of real points in the fake manifold, how much of the real
    variety the samples cover. Distances go `rows` points at a time against the whole other
    set: rows x N x 8 bytes, 80 MB for 10,000 points."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    if not 0 < k < min(len(real), len(fake)):
        raise ValueError(f"k={k} needs more than k points in each set")
    precision = _in_manifold(fake, real, _knn_radii(real, k, rows), rows)
    recall = _in_manifold(real, fake, _knn_radii(fake, k, rows), rows)
    return precision, recall
