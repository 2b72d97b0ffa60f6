"""Similarity search over a feature store with FAISS: build / add / search / save / load an index
(`index`), answer queries given as images, folders, ids or stored paths (`query`), find near-duplicates (`dedup`).

Example:
    >>> from probe.search import SearchIndex, search_index
    >>> SearchIndex.build("cache/demo.h5").save("cache/demo.faiss")
    >>> search_index("cache/demo.faiss", ["photo.jpg"], k=5)["results"][0]["hits"]
"""

from .dedup import find_duplicates
from .index import IndexConfig, IndexMismatchError, SearchIndex, default_index_path
from .query import search_index

__all__ = ["IndexConfig", "IndexMismatchError", "SearchIndex", "default_index_path", "find_duplicates",
           "search_index"]
