"""WebShop's pages and action grammar as a small state machine, rendered like WebShop's text mode.

Pages: ``search`` -> ``results`` (10 products a page, at most 50 results) -> ``item``
(options, Buy Now) -> item sub-pages ``description`` / ``features`` / ``reviews`` -> ``done``.
Actions: ``search[query]`` on the search page, and ``click[x]`` where x is a clickable of the
page (matched case-insensitively): a product id, an option value, ``back to search``,
``next >``, ``< prev``, ``description``, ``features``, ``reviews``, ``buy now``. A page's text
is its visible strings joined by `` [SEP] ``, as WebShop's ``observation_mode="text"``.

Where this differs from WebShop's text environment, on purpose:
- ``search[...]`` is only valid on the search page (WebShop accepted it anywhere although its
  list of available actions does not offer it there);
- ``next >`` is offered only when there is a next page with results;
- the done page shows the score only (WebShop's also prints the goal in hidden HTML);
- when options carry prices (generated catalogs), the item page shows the price of the
  current selection instead of the product's price range.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hiper_envs.webshop.catalog import Catalog
    from hiper_envs.webshop.schema import Product

SEP = " [SEP] "
PRODUCT_WINDOW = 10
SEARCH_ACTION = "search[<your query>]"
BACK_TO_SEARCH = "back to search"
NEXT_PAGE = "next >"
PREV_PAGE = "< prev"
BUY_NOW = "buy now"
SUB_PAGES = ("description", "features", "reviews")
_ACTION = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


def parse_action(action: object) -> tuple[str, str] | None:
    """("search"|"click", argument) or None when `action` is not of the grammar."""
    if not isinstance(action, str):
        return None
    match = _ACTION.match(action)
    if match is None:
        return None
    name, argument = match.group(1).lower(), match.group(2).strip()
    return (name, argument) if argument else None


@dataclasses.dataclass
class Session:
    """Where the shopper is: page, search keywords and results, product and chosen options."""

    page: str = "search"
    keywords: str = ""
    results: list[str] = dataclasses.field(default_factory=list)
    result_page: int = 1
    asin: str | None = None
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    purchased: bool = False

    def page_asins(self) -> list[str]:
        start = (self.result_page - 1) * PRODUCT_WINDOW
        return self.results[start : start + PRODUCT_WINDOW]

    def has_next_page(self) -> bool:
        return self.result_page * PRODUCT_WINDOW < len(self.results)


def _option_owner(product: Product, value: str) -> str | None:
    for name, values in product.options.items():
        if value in values:
            return name
    return None


def clickables(session: Session, catalog: Catalog) -> list[str]:
    """Lower-cased clickable texts of the current page, in page order."""
    if session.page in ("search", "done"):
        return []
    if session.page == "results":
        buttons = [BACK_TO_SEARCH]
        if session.result_page > 1:
            buttons.append(PREV_PAGE)
        if session.has_next_page():
            buttons.append(NEXT_PAGE)
        return buttons + [asin.lower() for asin in session.page_asins()]
    if session.page == "item":
        product = catalog.by_asin[session.asin]
        values = [value for values in product.options.values() for value in values]
        return [BACK_TO_SEARCH, PREV_PAGE, *dict.fromkeys(values), *SUB_PAGES, BUY_NOW]
    return [BACK_TO_SEARCH, PREV_PAGE]


def admissible_actions(session: Session, catalog: Catalog) -> list[str]:
    """The actions the current page offers (the search action as the template ``search[<your query>]``)."""
    if session.page == "search":
        return [SEARCH_ACTION]
    return [f"click[{c}]" for c in clickables(session, catalog)]


def current_price(session: Session, catalog: Catalog) -> float:
    product = catalog.by_asin[session.asin]
    return product.price_with(session.options)


def _item_price_text(session: Session, product: Product) -> str:
    if product.option_price_deltas:
        return f"${product.price_with(session.options):.2f}"
    return product.price_tag


def render(
    session: Session, catalog: Catalog, instruction: str, show_instruction: bool = True, score: float = 0.0
) -> str:
    """The page as WebShop's text mode shows it (visible strings joined by ' [SEP] ')."""
    head = ["Instruction:", instruction] if show_instruction else []
    if session.page == "search":
        return SEP.join(["WebShop", *head, "Search"])
    if session.page == "done":
        return SEP.join(["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", f"{score:.4g}"])
    parts = [*head, "Back to Search"]
    if session.page == "results":
        parts.append(f"Page {session.result_page} (Total results: {len(session.results)})")
        if session.result_page > 1:
            parts.append("< Prev")
        if session.has_next_page():
            parts.append("Next >")
        for asin in session.page_asins():
            product = catalog.by_asin[asin]
            parts += [asin, product.title, product.price_tag]
        return SEP.join(parts)
    product = catalog.by_asin[session.asin]
    parts.append("< Prev")
    if session.page == "item":
        for name, values in product.options.items():
            parts += [name, *values]
        parts += [product.title, f"Price: {_item_price_text(session, product)}", f"Rating: {product.rating}"]
        parts += ["Description", "Features", "Reviews", "Buy Now"]
    elif session.page == "description":
        parts.append(product.description)
    elif session.page == "features":
        parts += list(product.bullet_points)
    elif session.page == "reviews":
        for review in product.reviews:
            parts += [f'"{review.title}"', str(review.score), review.body]
    return SEP.join(parts)


def step(session: Session, catalog: Catalog, action: object) -> bool:
    """Apply `action` to `session` in place; False (and no change) when it is invalid here."""
    parsed = parse_action(action)
    if parsed is None or session.page == "done":
        return False
    name, argument = parsed
    if name == "search":
        if session.page != "search":
            return False
        session.keywords = argument.lower()
        session.results = [p.asin for p in catalog.search(session.keywords)]
        session.result_page, session.asin, session.options = 1, None, {}
        session.page = "results"
        return True
    target = argument.lower()
    if target not in clickables(session, catalog):
        return False
    if target == BACK_TO_SEARCH:
        session.page, session.keywords, session.results = "search", "", []
        session.result_page, session.asin, session.options = 1, None, {}
    elif session.page == "results":
        if target == NEXT_PAGE:
            session.result_page += 1
        elif target == PREV_PAGE:
            session.result_page -= 1
        else:
            session.asin = next(asin for asin in session.page_asins() if asin.lower() == target)
            session.options, session.page = {}, "item"
    elif session.page == "item":
        if target == PREV_PAGE:
            session.page = "results"
        elif target == BUY_NOW:
            session.page, session.purchased = "done", True
        elif target in SUB_PAGES:
            session.page = target
        else:
            product = catalog.by_asin[session.asin]
            session.options[_option_owner(product, target)] = target
    else:  # an item sub-page: only "< prev" is left
        session.page = "item"
    return True
