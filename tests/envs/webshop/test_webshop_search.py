"""BM25 search over the catalog."""

import pytest

from hiper_envs.webshop.catalog import get_catalog
from hiper_envs.webshop.search import SEARCH_RETURN_N, SearchIndex, product_document


@pytest.fixture(scope="module")
def catalog():
    return get_catalog(num_products=1000, seed=0)


def test_a_product_title_finds_that_product_first(catalog):
    for product in catalog.products[:50]:
        results = catalog.search(product.title)
        assert product in results[:3], product.title


def test_results_are_at_most_fifty_relevant_and_ranked(catalog):
    results = catalog.search("waterproof bluetooth speaker")
    assert 0 < len(results) <= SEARCH_RETURN_N
    assert all(p.query == "bluetooth speaker" for p in results[:10])
    assert catalog.search("waterproof bluetooth speaker") == results  # deterministic


def test_stemming_and_stop_words(catalog):
    assert catalog.search("the speakers")[:5] == catalog.search("speaker")[:5]
    assert catalog.search("the of and") == []
    assert catalog.search("zzzqqq") == []
    assert catalog.search("") == []


def test_documents_hold_title_description_first_bullet_and_options(catalog):
    product = next(p for p in catalog.products if len(p.options) == 2)
    document = product_document(product)
    assert document.startswith(product.title.lower())
    assert product.bullet_points[0].lower() in document
    first, second = list(product.options)
    assert f"{first}: {', '.join(product.options[first])}, and {second}:" in document


def test_tiny_index_returns_no_more_than_it_has():
    products = get_catalog(num_products=1000, seed=0).products[:3]
    assert len(SearchIndex(products).search(products[0].title)) <= 3
