"""Search by image (以图搜图) over a folder, with any encoder of images to codes: index every
image once, keep the index up to date, query it in milliseconds.

    encoder = infomax.search_encoder("runs/dim-cifar10")      # a search.Encoder
    index = Index.build("photos/", encoder)                   # or again: only what changed
    matches = Index.open(index.path, encoder).search(["query.jpg"], k=9)

    encoder.py   what an index takes of an encoder (`Encoder`, its fingerprint), image decoding
    storage.py   the files of an index: index.json, code files, file lists, the lock
    update.py    one indexing: what changed, streamed encoding, resumable, committed atomically
    index.py     `Index` (build, open, search) and its answer, `Matches`
    nearest.py   nearest codes among many: exact in chunks, approximate with faiss
    results.py   matches printed, written as CSV/JSON, drawn next to their query
    commands.py  the `index` and `search` commands and their flags, for a script's encoder

Nothing here knows which model made the codes: infomax.py describes its encoder (`Encoder`)
and its `index` and `search` commands call `Index`.
"""

from search.commands import add_index_flags, add_search_flags, index_command, search_command
from search.encoder import Encoder, PREPROCESSING, fingerprint
from search.index import Index, Matches
from search.results import neighbour_picture, print_matches, report, write_matches

__all__ = ["add_index_flags", "add_search_flags", "index_command", "search_command", "Encoder", "PREPROCESSING", "fingerprint", "Index", "Matches", "neighbour_picture",
           "print_matches", "report", "write_matches"]
