"""The command-line side of search by image: the flags of `index` and `search`, and the two
commands, for any script whose trained runs give a `search.Encoder` (`encoder_of(run
folder)`); infomax.py's `index` and `search` are these with its encoder."""

from common import UsageError
from search.index import BATCH_SIZE, COMMIT_EVERY, Index
from search.results import report


def add_metric_flag(parser):
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine",
                        help="similarity of the codes")


def add_index_flag(parser):
    parser.add_argument("--index", default=None, metavar="PATH",
                        help="the index folder (default: indexes/<folder name>-<hash> in the run)")


def add_index_flags(parser, default_out):
    parser.add_argument("--out", default=default_out, help="the run whose encoder indexes")
    parser.add_argument("--folder", required=True,
                        help="the folder of images to index (recursively)")
    add_index_flag(parser)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per encoder call (default: search.index.BATCH_SIZE, "
                             f"{BATCH_SIZE})")
    parser.add_argument("--commit-every", type=int, default=None, metavar="N",
                        help="images between saved progress records, what a killed indexing "
                             f"encodes again (default: search.index.COMMIT_EVERY, {COMMIT_EVERY})")
    parser.add_argument("--approximate", action="store_true",
                        help="also build an approximate index (faiss, for millions of "
                             "images) for --metric and measure its recall")
    add_metric_flag(parser)


def add_search_flags(parser, default_out):
    parser.add_argument("--out", default=None,
                        help="the run whose encoder encodes the queries, and where the "
                             "pictures and results go (default: the index's run; "
                             f"{default_out} with --folder)")
    parser.add_argument("--folder", default=None,
                        help="the folder of images to search: its index (in the run, or "
                             "at --index) is made or brought up to date first")
    add_index_flag(parser)
    parser.add_argument("--query", nargs="+", required=True,
                        help="one or more query image files, or folders of them")
    parser.add_argument("--top", "-k", type=int, default=9, help="neighbours per query")
    add_metric_flag(parser)
    parser.add_argument("--approximate", action="store_true",
                        help="search the index's approximate (faiss) index, not exactly")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="where the results go, .csv or .json: query, rank, file, "
                             "score (default: search_results.csv in --out)")
    parser.add_argument("--max-pictures", type=int, default=16, metavar="N",
                        help="neighbour pictures for the first N queries only")
    parser.add_argument("--pictures", default=None, metavar="DIR",
                        help="where the neighbour pictures go (default: --out)")


def index_command(args, encoder_of):
    """Index every image under --folder with the encoder of the run --out, or bring that
    index up to date."""
    sizes = {k: v for k, v in (("batch_size", args.batch_size),
                               ("commit_every", args.commit_every)) if v is not None}
    return Index.build(args.folder, encoder_of(args.out), args.index,
                       approximate=args.approximate, metric=args.metric, **sizes)


def search_command(args, encoder_of, default_out):
    """The nearest indexed images of each --query image: printed, drawn next to the query
    (search_<query>_<metric>.png) and written as CSV/JSON (--results). Against --index, or
    the index of --folder (in the run, or at --index), brought up to date first."""
    if args.folder is not None:
        out = args.out or default_out
        found = Index.build(args.folder, encoder_of(out), args.index)
    elif args.index is not None:
        found = Index.open(args.index)
        out = args.out or found.encoder_folder
        found.use_encoder(encoder_of(out))
    else:
        raise UsageError("search needs --index (an index) or --folder (a folder to index)")
    names, images = found.query_images(args.query)
    matches = found.search_codes(names, found.query_codes(images), args.top, args.metric,
                                 args.approximate)
    report(found, matches, images, out, args.max_pictures, args.results, args.pictures)
    return matches
