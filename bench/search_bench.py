"""Search by image at scale (issue 17): how fast a folder is indexed against the encoder's own
speed, whether indexing memory grows with the folder, and how long a query against a million
codes takes. Prints the numbers and the commands; no number is asserted.

    python bench/search_bench.py                 # everything (about 12 minutes on 2 busy cores)
    python bench/search_bench.py --quick         # smoke test: small folders, 20,000 codes
    python bench/search_bench.py --json result.json --keep

1. Indexing speed, at 32 px (the CIFAR-10 encoder) and 64 px (Tiny ImageNet's), with
   untrained encoders of the paper's architecture (speed does not depend on the weights),
   in one subprocess per size: the encoder's forward throughput on in-memory batches (the
   very compiled function indexing calls, batch 256), measured before and after, the faster
   taken; then `Index.build` of a generated folder of JPEG/PNG files of that size, timed
   from start to end (listing, decoding, encoding, writing). Target: at least 70 %. Also
   in CPU time per image (the process's user + system time over the images): on a shared
   machine the wall-clock rates swing with the other jobs' load, the CPU time hardly.
2. Peak memory while indexing: `Index.build` of 10,000 and of 100,000 generated 32 px
   images (each in a fresh subprocess; peak resident memory, ru_maxrss), next to the
   process's peak before indexing (TensorFlow and the encoder loaded, one batch encoded).
3. Query time: 1,000,000 synthetic 256-d codes (a mixture of 1,000 Gaussian clusters),
   memory-mapped from a .npy file; the exact search (`search.nearest.exact_top_k`, k = 10) of
   one query (median of 20) and of a batch of 100 (median of 5), cosine and Euclidean, in
   wall-clock and in CPU time, checked against a brute-force numpy search; once with
   OpenBLAS' own thread count and once with OPENBLAS_NUM_THREADS=1 (on a machine shared
   with other jobs, a second BLAS thread often waits for a core and slows one query down).
   Then, if faiss is installed, its inverted-file index of the same codes: build time,
   recall@10 against the exact search, query times (the synthetic clusters are far apart,
   so this recall flatters: see 4).
4. Recall on real codes, with --real-folder: `Index.build(..., approximate=True)` of a real
   folder (e.g. 6,200 JPEGs of Tiny ImageNet's train and val splits; 64 px, untrained
   encoder), which measures the approximate index's
   recall@10 against the exact search on 200 of its own images.

Generated images and codes go to a temporary folder under /tmp (removed unless --keep).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as infomax.py sets it

DATASET_OF_SIZE = {32: "cifar10", 64: "tiny-imagenet"}
PARTS = ("throughput", "memory", "search", "recall")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- fixtures

def write_images(folder, count, size, seed, per_folder=10000):
    """`count` smooth random pictures of size x size (bilinear-upsampled 4x4 noise), three
    JPEG to one PNG, in sub-folders of `per_folder`."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = os.path.join(folder, f"part{i // per_folder:02d}")
        if i % per_folder == 0:
            os.makedirs(sub, exist_ok=True)
        picture = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        picture = picture.resize((size, size), Image.BILINEAR)
        if i % 4 == 3:
            picture.save(os.path.join(sub, f"{i:07d}.png"))
        else:
            picture.save(os.path.join(sub, f"{i:07d}.jpg"), quality=90)
    return folder


def write_untrained_run(folder, img_size):
    """A run folder (config.json, encoder.weights.h5) holding an untrained encoder of the
    paper's architecture at `img_size`, as `infomax.load_encoder` reads it."""
    import dataclasses
    import common
    import infomax
    config = infomax.resolve(infomax.Config(dataset=DATASET_OF_SIZE[img_size]))
    os.makedirs(folder, exist_ok=True)
    common.write_json(os.path.join(folder, "config.json"), dataclasses.asdict(config))
    infomax.build_encoder(config.img_size, config.z_dim).save_weights(
        os.path.join(folder, "encoder.weights.h5"))
    return folder


# --------------------------------------------------------------------------- workers (subprocesses)

def forward_throughput(codes_of, img_size, batch_size=256, seconds=8.0):
    """(images/s, CPU microseconds per image) of the compiled encoder on one in-memory batch
    of uint8 images, called again and again for about `seconds` (after two untimed calls)."""
    import tensorflow as tf
    images = tf.random.uniform((batch_size, img_size, img_size, 3), 0, 256, tf.int32)
    images = tf.cast(images, tf.uint8)
    for _ in range(2):
        codes_of(images).numpy()
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or calls < 3:
        codes_of(images).numpy()
        calls += 1
    return (calls * batch_size / (time.perf_counter() - start),
            1e6 * (time.process_time() - cpu) / (calls * batch_size))


def throughput_worker(run, folder, index, img_size, forward_seconds):
    import infomax
    from search import Index
    codes_of = infomax.code_function(*infomax.load_encoder(run))
    before, cpu_before = forward_throughput(codes_of, img_size, seconds=forward_seconds)
    start, cpu = time.perf_counter(), time.process_time()
    built = Index.build(folder, infomax.search_encoder(run), index, verbose=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after, cpu_after = forward_throughput(codes_of, img_size, seconds=forward_seconds)
    forward_cpu_us = min(cpu_before, cpu_after)
    index_cpu_us = 1e6 * cpu / len(built)
    return {"img_size": img_size, "images": len(built), "index_seconds": seconds,
            "index_images_per_s": len(built) / seconds, "forward_images_per_s_before": before,
            "forward_images_per_s_after": after, "forward_images_per_s": max(before, after),
            "ratio": len(built) / seconds / max(before, after),
            "forward_cpu_us_per_image": forward_cpu_us, "index_cpu_us_per_image": index_cpu_us,
            "cpu_ratio": forward_cpu_us / index_cpu_us}


def memory_worker(run, folder, index):
    import infomax
    from search import Index
    from search.index import BATCH_SIZE
    encoder = infomax.search_encoder(run)
    encoder.codes_of(np.zeros((BATCH_SIZE, encoder.img_size, encoder.img_size, 3), np.uint8))
    loaded = peak_rss_mb()
    start = time.perf_counter()
    built = Index.build(folder, encoder, index, verbose=False)
    return {"images": len(built), "seconds": time.perf_counter() - start,
            "peak_rss_mb_before_indexing": loaded, "peak_rss_mb": peak_rss_mb(),
            "codes_mb": built.codes.nbytes / 2**20}


def real_worker(run, folder, index):
    import infomax
    from search import Index
    start = time.perf_counter()
    built = Index.build(folder, infomax.search_encoder(run), index, approximate=True,
                        verbose=False)
    return {"images": len(built), "seconds": time.perf_counter() - start,
            **{k: built.meta["approximate"][k] for k in ("kind", "recall", "probes", "tried", "k")}}


def synthetic_codes(path, count, dim, seed=0, clusters=1000, chunk=100000):
    """A .npy of `count` codes from a mixture of `clusters` Gaussians (written in chunks,
    unless the file is there already) and a function drawing fresh points of the same
    mixture (the queries)."""
    from search import storage
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)

    def draw(n):
        return (centres[rng.integers(0, clusters, n)]
                + 0.5 * rng.standard_normal((n, dim)).astype(np.float32))

    if os.path.isfile(path) and np.load(path, mmap_mode="r").shape == (count, dim):
        return draw
    offset = storage.create_code_file(path, count, dim)
    with open(path, "r+b") as f:
        for start in range(0, count, chunk):
            storage.write_rows(f, offset, start, draw(min(chunk, count - start)))
    return draw


def timed(call, repeats):
    """(median wall seconds, min wall seconds, median CPU seconds of this process) of calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return float(np.median(wall)), float(np.min(wall)), float(np.median(cpu))


def search_worker(folder, count, dim, approximate):
    """Exact query times (wall and CPU) against `count` synthetic codes, checked against
    brute force; faiss's with `approximate`."""
    from search import nearest
    path = os.path.join(folder, "codes.npy")
    draw = synthetic_codes(path, count, dim)
    codes = np.load(path, mmap_mode="r")
    start = time.perf_counter()
    norms = nearest.row_norms(codes)
    result = {"codes": count, "dim": dim, "k": 10, "norms_seconds": time.perf_counter() - start,
              "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "all")}
    queries = draw(100)
    for metric in nearest.METRICS:
        nearest.exact_top_k(codes, queries[:1], 10, metric, norms)  # pages in the codes
        one = np.array([timed(lambda q=q: nearest.exact_top_k(codes, q[None], 10, metric,
                                                                  norms), 1)
                        for q in draw(20)])
        batch = timed(lambda: nearest.exact_top_k(codes, queries, 10, metric, norms), 5)
        rows, _ = nearest.exact_top_k(codes, queries, 10, metric, norms)
        result[metric] = {"one_query_ms_median": 1000 * float(np.median(one[:, 0])),
                          "one_query_ms_min": 1000 * float(np.min(one[:, 0])),
                          "one_query_cpu_ms_median": 1000 * float(np.median(one[:, 2])),
                          "batch_100_s_median": batch[0], "batch_100_s_min": batch[1],
                          "batch_100_cpu_s_median": batch[2],
                          "equals_brute_force": bool(np.array_equal(np.sort(rows, 1), np.sort(
                              brute_force(codes, queries, 10, metric), 1)))}
    if approximate:
        result["faiss"] = faiss_numbers(codes, queries, norms, draw)
    return result


def brute_force(codes, queries, k, metric):
    """The k nearest by one full matrix of scores (what exact_top_k must equal)."""
    codes = np.asarray(codes)
    if metric == "cosine":
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
            codes / np.linalg.norm(codes, axis=1, keepdims=True)).T
    else:
        scores = 2 * queries @ codes.T - (codes ** 2).sum(1)[None]  # -|q - b|^2 + |q|^2
    return np.argsort(-scores, axis=1)[:, :k]


def faiss_numbers(codes, queries, norms, draw, metric="cosine"):
    from search import nearest
    start = time.perf_counter()
    index = nearest.build_approximate(codes, metric)
    build_seconds = time.perf_counter() - start
    recall = nearest.measure_recall(index, codes, metric, norms=norms)
    exact, _ = nearest.exact_top_k(codes, queries, 10, metric, norms)
    found, _ = nearest.approximate_top_k(index, queries, 10, metric, recall["probes"])
    fresh = draw(20)
    one = [timed(lambda q=q: nearest.approximate_top_k(
        index, q[None], 10, metric, recall["probes"]), 1)[0] for q in fresh]
    batch = timed(lambda: nearest.approximate_top_k(
        index, queries, 10, metric, recall["probes"]), 5)[0]
    return {"kind": f"IVF{index.nlist},Flat", "metric": metric, "build_seconds": build_seconds,
            "probes": recall["probes"], "recall_at_10_rows_as_queries": recall["recall"],
            "recall_tried": recall["tried"],
            "recall_at_10_fresh_queries": nearest.recall_at_k(exact, found),
            "one_query_ms_median": 1000 * float(np.median(one)), "batch_100_s_median": batch}


# --------------------------------------------------------------------------- the report

def worker_json(argv, env=None):
    """Run this script as a worker subprocess; the JSON of its last line."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        fail(f"worker {' '.join(argv[:2])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--throughput-images", type=int, default=None,
                        help="generated images per size for the speed (default 10000; quick 512)")
    parser.add_argument("--memory-images", type=int, nargs=2, default=None,
                        metavar=("SMALL", "LARGE"),
                        help="folder sizes for peak memory (default 10000 100000; quick 500 2000)")
    parser.add_argument("--codes", type=int, default=None,
                        help="synthetic codes to search (default 1000000; quick 20000)")
    parser.add_argument("--dim", type=int, default=256, help="size of a synthetic code")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], choices=[32, 64])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which measurements (default: all)")
    parser.add_argument("--no-faiss", action="store_true", help="skip the approximate index")
    parser.add_argument("--blas-threads", nargs="+", default=["all", "1"],
                        help="time the exact search with these OPENBLAS_NUM_THREADS settings "
                             "(all: OpenBLAS' default)")
    parser.add_argument("--real-folder", default=None,
                        help="a real image folder whose approximate index's recall is measured "
                             "(e.g. the tiny-imagenet-200 folder; none: not measured)")
    parser.add_argument("--real-size", type=int, default=64, choices=[32, 64],
                        help="image size of the encoder indexing --real-folder")
    parser.add_argument("--tmp", default=None, help="where generated files go (default: a new "
                                                    "folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "throughput":
            result = throughput_worker(rest[0], rest[1], rest[2], int(rest[3]), float(rest[4]))
        elif kind == "memory":
            result = memory_worker(*rest)
        elif kind == "real":
            result = real_worker(*rest)
        else:
            result = search_worker(rest[0], int(rest[1]), int(rest[2]), rest[3] == "1")
        print(json.dumps(result))
        return

    throughput_images = args.throughput_images or (512 if args.quick else 10000)
    memory_images = args.memory_images or ((500, 2000) if args.quick else (10000, 100000))
    code_count = args.codes or (20000 if args.quick else 1000000)
    forward_seconds = 2.0 if args.quick else 8.0
    tmp = args.tmp or tempfile.mkdtemp(prefix="search_bench_", dir="/tmp")
    os.makedirs(tmp, exist_ok=True)
    command = "python bench/search_bench.py " + " ".join(sys.argv[1:])
    print(f"command: {command.strip()}\nmachine: {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {load_average()}\n"
          f"files in {tmp}", flush=True)
    result = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"),
              "cpus": os.cpu_count(), "load_average_start": load_average()}
    try:
        if "throughput" in args.parts:
            result["throughput"] = [throughput_row(tmp, size, throughput_images, forward_seconds)
                                    for size in args.sizes]
        small, large = memory_images
        if "memory" in args.parts:
            result["memory"] = memory_rows(tmp, small, large)
        if "search" in args.parts:
            result["search"] = search_rows(tmp, code_count, args.dim,
                                           not args.no_faiss and faiss_installed(),
                                           args.blas_threads)
        if "recall" in args.parts and not args.no_faiss and faiss_installed():
            if os.path.isdir(args.real_folder or ""):
                result["real_recall"] = real_recall_row(tmp, args.real_folder, args.real_size)
            else:
                print(f"--real-folder {args.real_folder!r}: no such folder; no recall on "
                      "real codes")
        result["load_average_end"] = load_average()
        print(f"load average at the end: {result['load_average_end']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if not args.keep and not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def throughput_row(tmp, size, count, forward_seconds):
    """Indexing speed of `count` generated images of `size` px against the encoder's forward."""
    folder = write_images(os.path.join(tmp, f"images{size}"), count, size, seed=size)
    run = make_run(os.path.join(tmp, f"run{size}"), size)
    row = worker_json(["--worker", "throughput", run, folder, os.path.join(tmp, f"index{size}"),
                       str(size), str(forward_seconds)])
    print(f"{size} px: encoder forward {row['forward_images_per_s']:.0f} images/s in memory "
          f"(before {row['forward_images_per_s_before']:.0f}, after "
          f"{row['forward_images_per_s_after']:.0f}); indexing {row['images']} files "
          f"{row['index_images_per_s']:.0f} images/s end to end ({row['index_seconds']:.1f} s)"
          f" = {100 * row['ratio']:.0f} % of the forward; in CPU time per image: forward "
          f"{row['forward_cpu_us_per_image']:.0f} us, indexing {row['index_cpu_us_per_image']:.0f}"
          f" us = {100 * row['cpu_ratio']:.0f} %", flush=True)
    print(f"  the same as a command: python infomax.py index --out {run} --folder {folder}",
          flush=True)
    return row


def memory_rows(tmp, small, large):
    """Peak RSS of indexing `small` and `large` generated 32 px images, each in a fresh
    process (the small folder is the first part of the large one)."""
    folder = write_images(os.path.join(tmp, "many"), large, 32, seed=1, per_folder=small)
    run = os.path.join(tmp, "run32")
    if not os.path.isdir(run):
        make_run(run, 32)
    rows = []
    for target in (os.path.join(folder, "part00"), folder):
        row = worker_json(["--worker", "memory", run, target,
                           os.path.join(tmp, f"memory-index-{os.path.basename(target)}")])
        rows.append(row)
        print(f"indexing {row['images']:,} images of 32 px: peak RSS {row['peak_rss_mb']:.0f} MB "
              f"({row['peak_rss_mb_before_indexing']:.0f} MB before indexing; codes "
              f"{row['codes_mb']:.0f} MB; {row['seconds']:.0f} s)", flush=True)
    return rows


def search_rows(tmp, code_count, dim, with_faiss, blas_threads):
    """Query times against `code_count` synthetic codes, once per BLAS thread setting ("all":
    OpenBLAS' default; the codes are generated once), and faiss's in the first."""
    search_dir = os.path.join(tmp, "codes")
    os.makedirs(search_dir, exist_ok=True)
    rows = []
    for i, threads in enumerate(blas_threads):
        env = dict(os.environ)
        env.pop("OPENBLAS_NUM_THREADS", None)
        if threads != "all":
            env["OPENBLAS_NUM_THREADS"] = threads
        row = worker_json(["--worker", "search", search_dir, str(code_count), str(dim),
                           "1" if with_faiss and i == 0 else "0"], env)
        rows.append(row)
        for metric in ("cosine", "euclidean"):
            numbers = row[metric]
            print(f"exact {metric} search of {code_count:,} x {dim} codes, k=10, BLAS threads "
                  f"{threads}: one query {numbers['one_query_ms_median']:.1f} ms (median of 20; "
                  f"min {numbers['one_query_ms_min']:.1f}; CPU "
                  f"{numbers['one_query_cpu_ms_median']:.1f} ms), 100 queries {numbers['batch_100_s_median']:.2f} s (median of 5; min "
                  f"{numbers['batch_100_s_min']:.2f}; CPU "
                  f"{numbers['batch_100_cpu_s_median']:.2f} s);"
                  f" equals brute force: {numbers['equals_brute_force']}", flush=True)
        if "faiss" in row:
            ivf = row["faiss"]
            print(f"faiss {ivf['kind']} ({ivf['metric']}) of the synthetic codes: built in "
                  f"{ivf['build_seconds']:.0f} s; {ivf['probes']} clusters probed: recall@10 "
                  f"{ivf['recall_at_10_fresh_queries']:.3f} on 100 fresh queries, "
                  f"{ivf['recall_at_10_rows_as_queries']:.3f} on 200 indexed codes as queries; "
                  f"one query {ivf['one_query_ms_median']:.2f} ms, 100 queries "
                  f"{ivf['batch_100_s_median'] * 1000:.0f} ms", flush=True)
    if not with_faiss:
        print("no approximate numbers (--no-faiss, or faiss not installed: pip install faiss-cpu)")
    return rows


def real_recall_row(tmp, folder, size):
    """Index a real image folder with an approximate index (untrained encoder of `size` px):
    the recall that `Index.build` measures against the exact search, on real codes."""
    run = os.path.join(tmp, f"run{size}")
    if not os.path.isdir(run):
        make_run(run, size)
    row = worker_json(["--worker", "real", run, folder, os.path.join(tmp, "real-index")])
    print(f"approximate index of {row['images']:,} real images ({folder}, {size} px, untrained "
          f"encoder): {row['kind']}, recall@10 {row['recall']:.3f} with {row['probes']} "
          f"clusters probed (tried {row['tried']}); indexing {row['seconds']:.0f} s", flush=True)
    print(f"  the same as a command: python infomax.py index --out {run} --folder {folder} "
          "--approximate", flush=True)
    return row


def make_run(run, size):
    """An untrained run folder, written by a subprocess (this process never imports TF)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import search_bench; search_bench.write_untrained_run({run!r}, {size})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return run


def faiss_installed():
    import importlib.util
    return importlib.util.find_spec("faiss") is not None


if __name__ == "__main__":
    main()
