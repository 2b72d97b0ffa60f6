"""Similarity search over a feature store with FAISS, one concept per module:

- ``config``: IndexConfig, what to build;        - ``rows``: store rows read a block at a time, normalised;
- ``factory``: FAISS factory strings, search-parameter ladders, threads;
- ``tuning``: exact ground truth and recall tuning; - ``sharding``: sub-indexes over row ranges searched as one;
- ``faiss_index``: build_faiss (train, add, tune);  - ``index``: SearchIndex (the state: build/add/search/save/load);
- ``build``: index_store, what `probe index` runs;  - ``query``: search_index / search_text, what `probe search` runs;
- ``dedup``: find_duplicates, what `probe dedup` runs.

Example:
    >>> from probe.search import SearchIndex, search_index, search_text
    >>> SearchIndex.build("cache/demo.h5").save("cache/demo.faiss")
    >>> search_index("cache/demo.faiss", ["photo.jpg"], k=5)["results"][0]["hits"]
    >>> search_text("cache/clip.faiss", ["a photo of a bee"], k=5)   # an index of a clip/ store
    >>> SearchIndex.from_arrays(x).search(q, k=5)                # (N, D) array, (n, D) queries: no store
"""

from ..errors import IndexMismatchError
from .build import default_index_path, index_store
from .config import IndexConfig
from .dedup import find_duplicates
from .faiss_index import build_faiss
from .index import SearchIndex, sidecar
from .query import search_index, search_text
from .rows import Rows, prepare
from .tuning import knn_ground_truth, recall_at

__all__ = ["IndexConfig", "IndexMismatchError", "Rows", "SearchIndex", "build_faiss", "default_index_path",
           "find_duplicates", "index_store", "knn_ground_truth", "prepare", "recall_at", "search_index", "search_text",
           "sidecar"]
