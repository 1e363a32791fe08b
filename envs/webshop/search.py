"""BM25 product search (bm25s), standing in for WebShop's pyserini/Lucene index.

Each product is indexed as WebShop indexes it: title, description, first bullet point and
the option text ("size: small, large, and color: black, white"), lower-cased. Tokens are
words of one or more characters, English stop words are dropped and words are Porter-stemmed
(Lucene's English analyzer does the same); BM25 uses pyserini's defaults k1=0.9, b=0.4. A
search returns at most 50 products with a positive score, best first, ties by catalog order.
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np
import Stemmer
from bm25s.tokenization import Tokenizer

from hiper_envs.webshop.schema import Product

SEARCH_RETURN_N = 50
K1, B = 0.9, 0.4
_TOKEN_PATTERN = r"(?u)\b\w+\b"


def product_document(product: Product) -> str:
    """The text WebShop indexes for a product."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product.options.items())
    first_bullet = product.bullet_points[0] if product.bullet_points else ""
    return " ".join([product.title, product.description, first_bullet, option_text]).lower()


class SearchIndex:
    """BM25 over a product list; `search` returns product positions in that list."""

    def __init__(self, products: Sequence[Product]):
        self._tokenizer = Tokenizer(
            lower=True, splitter=_TOKEN_PATTERN, stopwords="en", stemmer=Stemmer.Stemmer("porter")
        )
        ids = self._tokenizer.tokenize(
            [product_document(p) for p in products], update_vocab=True, return_as="ids", show_progress=False
        )
        self._retriever = bm25s.BM25(k1=K1, b=B)
        self._retriever.index(ids, show_progress=False)
        self._num_products = len(products)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[int]:
        """Positions of the best `k` products for `query` (score > 0), best first."""
        ids = self._tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)
        if not any(ids[0]):
            return []
        k = min(k, self._num_products)
        docs, scores = self._retriever.retrieve(ids, k=k, show_progress=False, n_threads=0)
        docs, scores = docs[0], scores[0]
        order = np.lexsort((docs, -scores))
        return [int(docs[i]) for i in order if scores[i] > 0]
