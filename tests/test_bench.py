"""The throughput benchmark runs end to end (quick mode: tiny models, few steps; no timing
is asserted, only that every number it reports is there and sensible; a `slow` test), and so
does its timing of the author's original scripts when they are at hand (opt-in:
BENCH_ORIGINAL_SRC names the folder with them, and the legacy Keras 2 package tf_keras must
be installed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import original  # noqa: E402  (bench/original.py imports neither TensorFlow nor Keras)

ORIGINAL_SRC = os.environ.get("BENCH_ORIGINAL_SRC")
needs_original_src = pytest.mark.skipif(
    not ORIGINAL_SRC, reason="set BENCH_ORIGINAL_SRC to a folder with the author's f-VAEs.py, "
                             "glow.py, flow_layers.py, infomax_cifar10.py, infomax_tiny_imagenet.py")
needs_tf_keras = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None,
                                    reason="tf_keras not installed (pip install tf_keras==2.21.0)")


@pytest.mark.slow
def test_quick_benchmark_reports_every_number(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, BENCH, "--quick",
                          "--models", "fvae64", "infomax_cifar10", "glow64", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["peak_gflops_start"] > 0
    assert [r["model"] for r in result["rows"]] == ["fvae64", "infomax_cifar10", "glow64"]
    for row in result["rows"]:
        assert row["flops_per_step"] > 1e8 and row["median_step_s"] > 0 and row["loss_finite"]
        assert row["min_step_s"] <= row["median_step_s"] and row["peak_rss_gb"] > 0.1
    assert "| fvae64 |" in run.stdout
    assert "original" not in result and "Same run" not in run.stdout


@pytest.mark.parametrize("folder, message", [
    ("missing", "missing is not a folder"),
    ("empty", "infomax_cifar10.py does not exist"),
    ("other_version", "infomax_cifar10.py is not the version this bench knows"),
])
def test_bad_original_src_is_a_one_line_error_before_any_measurement(tmp_path, folder, message):
    if folder != "missing":
        (tmp_path / folder).mkdir()
    if folder == "other_version":
        (tmp_path / folder / "infomax_cifar10.py").write_text("print('another script')\n")
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, BENCH, "--models", "infomax_cifar10", "--original-src",
                          str(tmp_path / folder), "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("error: --original-src") and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and run.stdout == "" and not out.exists()


@needs_original_src
@pytest.mark.parametrize("name", sorted(original.SCRIPTS))
def test_every_fix_matches_the_authors_files(name):
    prepared = original.prepare(ORIGINAL_SRC, name)
    assert prepared.model_variable in ("vae", "model_train", "encoder")
    assert bool(prepared.flow_layers) == name.startswith(("fvae", "glow"))  # their layers file
    assert prepared.source.rstrip().endswith(
        "optimizer=Adam(1e-4))" if name.startswith(("fvae", "glow")) else ".compile(optimizer=Adam(1e-3))")
    compile(prepared.source, prepared.path, "exec")


def test_a_compile_call_over_several_lines_is_cut_after_its_closing_parenthesis(tmp_path):
    """Glow's script compiles its model over two lines, a loss lambda holding parentheses first:
    the cut keeps the whole statement and nothing after it."""
    (tmp_path / "flow_layers.py").write_text("idxs = range(shape[0])\nidxs = range(shape[0])\n")
    (tmp_path / "glow.py").write_text(
        "from flow_layers import *\nfrom scipy import misc\nif True:\n    os.mkdir('samples')\n"
        "def data_generator(batch_size=32):\n    pass\n"
        "encoder.compile(loss=lambda y_true,y_pred: 0.5 * K.sum(y_pred**2, 1) + (1),\n"
        "                optimizer=Adam(1e-4))\n"
        "encoder.fit_generator(data_generator())\n")
    prepared = original.prepare(str(tmp_path), "glow64")
    assert prepared.model_variable == "encoder" and prepared.batch_size == 64
    assert prepared.source.endswith("optimizer=Adam(1e-4))\n") and "fit_generator" not in prepared.source
    assert "os.mkdir" not in prepared.source and "scipy" not in prepared.source
    assert prepared.flow_layers and "list(range(shape[0]))" in prepared.flow_layers[1]


ORIGINAL_VERSIONS = os.environ.get("BENCH_ORIGINAL_VERSIONS")


def published_versions():
    """(bench model, folder holding one published version of its files) for every version of
    the author's files under BENCH_ORIGINAL_VERSIONS/<file>/<commit>/<file> (f-VAEs.py with
    every version of flow_layers.py)."""
    if not ORIGINAL_VERSIONS:
        return []
    found = []
    for name, (script, _) in sorted(original.SCRIPTS.items()):
        for version in sorted(os.listdir(os.path.join(ORIGINAL_VERSIONS, script))):
            layers = ([None] if script not in ("f-VAEs.py", "glow.py")
                      else sorted(os.listdir(os.path.join(ORIGINAL_VERSIONS, original.FLOW_LAYERS))))
            found += [(name, script, version, layer) for layer in layers]
    return found


@pytest.mark.skipif(not ORIGINAL_VERSIONS, reason="set BENCH_ORIGINAL_VERSIONS to a folder "
                    "<file>/<commit>/<file> of every published version of the author's files "
                    "(git show COMMIT:FILE in clones of bojone/flow and bojone/infomax)")
@pytest.mark.parametrize("name, script, version, layers", published_versions())
def test_every_published_version_of_the_authors_files_is_accepted(tmp_path, name, script,
                                                                   version, layers):
    import shutil
    shutil.copy(os.path.join(ORIGINAL_VERSIONS, script, version, script), tmp_path)
    if layers:
        shutil.copy(os.path.join(ORIGINAL_VERSIONS, original.FLOW_LAYERS, layers,
                                 original.FLOW_LAYERS), tmp_path)
    prepared = original.prepare(str(tmp_path), name)
    compile(prepared.source, prepared.path, "exec")  # the fixed, cut script is valid Python 3
    assert "random_shuffle" not in prepared.source and "z_dim / 2**" not in prepared.source


@needs_original_src
@needs_tf_keras
def test_quick_benchmark_times_the_original_with_both_kernel_settings(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, BENCH, "--quick", "--models", "infomax_cifar10",
                          "--original-src", ORIGINAL_SRC, "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["original"]["models"] == ["infomax_cifar10"]
    row = result["rows"][0]
    assert row["original_trainable_params"] == 2_210_818 and row["original_params_match"]
    default, onednn = row["original"]["default"], row["original"]["onednn"]
    assert default["TF_ENABLE_ONEDNN_OPTS"] is None and onednn["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert onednn["onednn_on"]
    for timing in (default, onednn):
        assert timing["batch"] == 64 and timing["median_step_s"] > 0 and timing["loss_finite"]
    assert "vs_original_default_kernels" not in row  # ours is tiny in --quick: no ratio
    assert "| infomax_cifar10 | 8 (original 64) |" in run.stdout and "n/a (--quick)" in run.stdout


@pytest.mark.slow
def test_search_benchmark_reports_every_number(tmp_path):
    """bench/search_bench.py at toy sizes: indexing speed against the forward, peak memory
    of two folder sizes, exact (and, with faiss, approximate) query times; nothing timed is
    asserted, only that each number is there and the exact search equals brute force."""
    out = tmp_path / "search.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "search_bench.py"),
                          "--sizes", "32", "--throughput-images", "64", "--memory-images", "40",
                          "120", "--codes", "3000", "--tmp", str(tmp_path / "files"),
                          "--parts", "throughput", "memory", "search", "--blas-threads", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    (speed,) = result["throughput"]
    assert speed["images"] == 64 and speed["index_images_per_s"] > 0 and speed["ratio"] > 0
    assert [m["images"] for m in result["memory"]] == [40, 120]
    assert all(m["peak_rss_mb"] >= m["peak_rss_mb_before_indexing"] > 0 for m in result["memory"])
    (search,) = result["search"]  # one row per --blas-threads setting
    assert search["blas_threads"] == "1" and search["codes"] == 3000
    for metric in ("cosine", "euclidean"):
        assert search[metric]["equals_brute_force"]
        assert search[metric]["one_query_ms_median"] > 0
    assert "python infomax.py index --out" in run.stdout
