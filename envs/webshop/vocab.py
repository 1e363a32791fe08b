"""Vocabulary of the procedural catalog: five WebShop categories, their product types and words.

Attribute pools overlap within a category and across categories ("long lasting", "machine
wash", "easy assembly", "gluten free", ...) so that a search for the words of an instruction
returns many products that share some of its attributes; options (size, color, flavor, ...)
and price limits then tell them apart. Option values within a group are chosen so that no
two of them match each other under WebShop's option reward (checked by a test), and sizes
carry price steps (a larger size costs more) while colors and flavors do not.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Attribute:
    """`phrase` goes into a product's Attributes and a goal's attributes; `text` into sentences."""

    phrase: str
    text: str
    before_noun: bool


def attribute(text: str) -> Attribute:
    """ "sulfate free" reads before the noun; "for dry hair" / "with usb charging" after it."""
    for lead in ("for ", "with "):
        if text.startswith(lead):
            return Attribute(phrase=text[len(lead) :], text=text, before_noun=False)
    return Attribute(phrase=text, text=text, before_noun=True)


@dataclasses.dataclass(frozen=True)
class OptionGroup:
    name: str
    values: tuple[str, ...]
    price_steps: tuple[float, ...] = ()  # added price per value (same order); empty: no effect


@dataclasses.dataclass(frozen=True)
class ProductType:
    query: str
    noun: str
    plural: bool
    path: str
    attributes: tuple[Attribute, ...]
    options: tuple[OptionGroup, ...]
    price_range: tuple[float, float]
    features: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    types: tuple[ProductType, ...]
    review_words: tuple[str, ...]


def _attrs(*texts: str) -> tuple[Attribute, ...]:
    return tuple(attribute(t) for t in texts)


CLOTHING_SIZES = OptionGroup("size", ("small", "medium", "large", "xl", "xxl"), (0, 0, 0, 2, 4))
SHOE_SIZES = OptionGroup("size", ("6", "7", "8", "9", "10", "11", "12"))
APPAREL_COLORS = OptionGroup(
    "color",
    ("black", "white", "navy", "gray", "red", "olive", "pink", "beige", "brown", "green", "blue", "purple"),
)
DEVICE_COLORS = OptionGroup("color", ("black", "white", "blue", "red", "gray", "green", "pink"))
HOME_COLORS = OptionGroup("color", ("white", "black", "gray", "beige", "navy", "teal", "brown", "green"))

_HAIR = _attrs(
    "sulfate free",
    "paraben free",
    "cruelty free",
    "natural ingredients",
    "for dry hair",
    "for hair growth",
    "with argan oil",
    "with tea tree",
    "long lasting",
    "fragrance free",
    "for damaged hair",
    "vegan",
)
_SKIN = _attrs(
    "for sensitive skin",
    "for dry skin",
    "fragrance free",
    "with hyaluronic acid",
    "with vitamin c",
    "cruelty free",
    "paraben free",
    "non greasy",
    "natural ingredients",
    "dermatologist tested",
    "vegan",
)
_BEAUTY = Category(
    "beauty",
    (
        ProductType(
            "shampoo",
            "shampoo",
            False,
            "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos",
            _HAIR,
            (
                OptionGroup("size", ("8 fl oz", "16 fl oz", "32 fl oz"), (0, 5, 11)),
                OptionGroup("scent", ("lavender", "coconut", "eucalyptus", "unscented", "citrus")),
            ),
            (6, 35),
            ("salon quality formula", "gentle daily cleanser", "rich lather"),
        ),
        ProductType(
            "conditioner",
            "conditioner",
            False,
            "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Conditioners",
            _HAIR,
            (
                OptionGroup("size", ("8 fl oz", "16 fl oz", "32 fl oz"), (0, 5, 11)),
                OptionGroup("scent", ("lavender", "coconut", "eucalyptus", "unscented", "citrus")),
            ),
            (6, 35),
            ("detangles and softens", "leave in or rinse out", "smooth shiny hair"),
        ),
        ProductType(
            "face moisturizer",
            "face moisturizer",
            False,
            "Beauty & Personal Care › Skin Care › Face › Creams & Moisturizers",
            _SKIN,
            (OptionGroup("size", ("1.7 oz", "3.4 oz", "6.8 oz"), (0, 8, 15)),),
            (9, 60),
            ("absorbs quickly", "day and night use", "light texture"),
        ),
        ProductType(
            "lipstick",
            "lipstick",
            False,
            "Beauty & Personal Care › Makeup › Lips › Lipstick",
            _attrs(
                "long lasting",
                "cruelty free",
                "matte finish",
                "waterproof",
                "vegan",
                "paraben free",
                "moisturizing",
                "high pigment",
                "natural ingredients",
            ),
            (OptionGroup("color", ("red", "nude", "pink", "berry", "coral", "plum")),),
            (5, 30),
            ("smooth application", "rich color", "comfortable wear"),
        ),
    ),
    ("smells great", "works well", "my hair feels soft", "would buy again", "gentle on my skin"),
)
_FOOD_COMMON = ("gluten free", "non gmo", "kosher certified", "vegan", "low sugar", "dairy free", "organic")
_FOOD = Category(
    "grocery",
    (
        ProductType(
            "protein bars",
            "protein bars",
            True,
            "Grocery & Gourmet Food › Snack Foods › Bars › Protein Bars",
            _attrs(*_FOOD_COMMON, "high protein", "keto friendly", "individually wrapped", "low carb"),
            (
                OptionGroup(
                    "flavor", ("chocolate", "peanut butter", "vanilla almond", "cookie dough", "strawberry")
                ),
                OptionGroup("size", ("6 count", "12 count", "30 count"), (0, 9, 25)),
            ),
            (10, 40),
            ("great on the go snack", "made with real ingredients", "satisfying texture"),
        ),
        ProductType(
            "ground coffee",
            "ground coffee",
            False,
            "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Coffee › Ground Coffee",
            _attrs(*_FOOD_COMMON, "medium roast", "dark roast", "fair trade", "low acid", "resealable bag"),
            (
                OptionGroup("flavor", ("hazelnut", "french vanilla", "caramel", "original", "mocha")),
                OptionGroup("size", ("12 ounce", "2 pound", "1 kilogram"), (0, 12, 30)),
            ),
            (8, 35),
            ("rich smooth taste", "freshly roasted", "great for drip machines"),
        ),
        ProductType(
            "herbal tea",
            "herbal tea",
            False,
            "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Tea › Herbal",
            _attrs(*_FOOD_COMMON, "caffeine free", "individually wrapped", "fair trade", "resealable bag"),
            (
                OptionGroup("flavor", ("chamomile", "ginger", "hibiscus", "jasmine", "rooibos")),
                OptionGroup("size", ("20 bags", "100 bags"), (0, 10)),
            ),
            (4, 25),
            ("calming blend", "naturally sweet", "enjoy hot or iced"),
        ),
        ProductType(
            "mixed nuts",
            "mixed nuts",
            True,
            "Grocery & Gourmet Food › Snack Foods › Nuts & Seeds › Mixed Nuts",
            _attrs(*_FOOD_COMMON, "high protein", "low sodium", "resealable bag", "keto friendly"),
            (
                OptionGroup("flavor", ("sea salt", "unsalted", "honey roasted", "smoked")),
                OptionGroup("size", ("8 ounce", "16 ounce", "3 pound"), (0, 6, 20)),
            ),
            (7, 40),
            ("crunchy and fresh", "perfect for snacking", "premium selection"),
        ),
    ),
    ("tastes great", "fresh and delicious", "good value", "my kids love it", "will order again"),
)
_APPAREL = (
    "machine wash",
    "long lasting",
    "for men",
    "for women",
    "slim fit",
    "moisture wicking",
    "easy care",
)
_FASHION = Category(
    "fashion",
    (
        ProductType(
            "t-shirt",
            "t-shirt",
            False,
            "Clothing, Shoes & Jewelry › Men › Clothing › Shirts › T-Shirts",
            _attrs(*_APPAREL, "short sleeve", "cotton", "classic fit", "crew neck", "relaxed fit"),
            (APPAREL_COLORS, CLOTHING_SIZES),
            (8, 35),
            ("soft fabric", "tag free collar", "everyday wear"),
        ),
        ProductType(
            "running shoes",
            "running shoes",
            True,
            "Clothing, Shoes & Jewelry › Shoes › Athletic › Running",
            _attrs(
                *_APPAREL,
                "non slip",
                "lightweight",
                "breathable mesh",
                "rubber sole",
                "memory foam",
                "arch support",
            ),
            (APPAREL_COLORS, SHOE_SIZES),
            (30, 120),
            ("cushioned ride", "secure lace up fit", "road and gym"),
        ),
        ProductType(
            "jacket",
            "jacket",
            False,
            "Clothing, Shoes & Jewelry › Clothing › Coats, Jackets & Vests",
            _attrs(
                *_APPAREL,
                "water resistant",
                "zip closure",
                "fleece lined",
                "windproof",
                "long sleeve",
                "hooded",
            ),
            (APPAREL_COLORS, CLOTHING_SIZES),
            (30, 150),
            ("warm and light", "two hand pockets", "packable"),
        ),
        ProductType(
            "yoga leggings",
            "yoga leggings",
            True,
            "Clothing, Shoes & Jewelry › Women › Clothing › Active › Leggings",
            _attrs(
                *_APPAREL, "high waist", "tummy control", "four way stretch", "squat proof", "with pockets"
            ),
            (APPAREL_COLORS, CLOTHING_SIZES),
            (12, 45),
            ("buttery soft", "flat seams", "gym and yoga"),
        ),
    ),
    ("fits perfectly", "very comfortable", "true to size", "great quality", "love the color"),
)
_HOME = ("easy assembly", "easy to clean", "living room", "space saving", "long lasting", "high quality")
_FURNITURE = Category(
    "furniture",
    (
        ProductType(
            "coffee table",
            "coffee table",
            False,
            "Home & Kitchen › Furniture › Living Room Furniture › Tables › Coffee Tables",
            _attrs(*_HOME, "solid wood", "with storage", "mid century", "metal frame", "lift top"),
            (OptionGroup("color", ("walnut", "white", "black", "oak", "gray")),),
            (60, 400),
            ("sturdy build", "clean modern lines", "fits small spaces"),
        ),
        ProductType(
            "office chair",
            "office chair",
            False,
            "Home & Kitchen › Furniture › Home Office Furniture › Home Office Chairs",
            _attrs(
                *_HOME,
                "lumbar support",
                "height adjustable",
                "mesh back",
                "swivel",
                "padded armrests",
                "ergonomic design",
            ),
            (OptionGroup("color", ("black", "white", "gray", "blue", "pink")),),
            (60, 350),
            ("smooth rolling casters", "supports long work days", "breathable seat"),
        ),
        ProductType(
            "bed sheets",
            "bed sheets",
            True,
            "Home & Kitchen › Bedding › Sheets & Pillowcases › Sheet Sets",
            _attrs(
                *_HOME,
                "deep pocket",
                "machine wash",
                "wrinkle free",
                "breathable",
                "fade resistant",
                "cotton",
            ),
            (HOME_COLORS, OptionGroup("size", ("twin", "full", "queen", "king"), (0, 5, 10, 15))),
            (20, 90),
            ("hotel quality", "cool and crisp", "fits mattresses up to 16 inches"),
        ),
        ProductType(
            "throw pillow covers",
            "throw pillow covers",
            True,
            "Home & Kitchen › Home Décor › Pillows & Throws › Throw Pillow Covers",
            _attrs(*_HOME, "machine wash", "hidden zipper", "super soft", "velvet", "for sofa"),
            (HOME_COLORS, OptionGroup("size", ("16x16 inch", "18x18 inch", "20x20 inch"), (0, 2, 4))),
            (8, 30),
            ("set of 2", "double sided", "inserts not included"),
        ),
    ),
    ("easy to put together", "looks great", "sturdy", "good value", "exactly as pictured"),
)
_DEVICE = ("long lasting", "fast charging", "easy to use", "high quality", "water resistant", "lightweight")
_ELECTRONICS = Category(
    "electronics",
    (
        ProductType(
            "bluetooth speaker",
            "bluetooth speaker",
            False,
            "Electronics › Portable Audio & Video › Portable Speakers & Docks › Bluetooth Speakers",
            _attrs(*_DEVICE, "waterproof", "hands free", "stereo sound", "usb charging", "deep bass"),
            (DEVICE_COLORS,),
            (20, 150),
            ("20 hour playtime", "pairs in seconds", "built in microphone"),
        ),
        ProductType(
            "wireless earbuds",
            "wireless earbuds",
            True,
            "Electronics › Headphones, Earbuds & Accessories › Headphones & Earbuds › Earbud Headphones",
            _attrs(
                *_DEVICE, "noise cancelling", "hands free", "with charging case", "touch control", "deep bass"
            ),
            (DEVICE_COLORS,),
            (15, 150),
            ("secure comfortable fit", "clear calls", "auto pairing"),
        ),
        ProductType(
            "phone case",
            "phone case",
            False,
            "Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases",
            _attrs(
                *_DEVICE,
                "shockproof",
                "wireless charging",
                "slim fit",
                "easy install",
                "heavy duty",
                "with screen protector",
            ),
            (DEVICE_COLORS, OptionGroup("model", ("iphone 14", "galaxy s23", "pixel 8"))),
            (6, 30),
            ("precise cutouts", "raised edges protect the camera", "grippy sides"),
        ),
        ProductType(
            "usb c cable",
            "usb c cable",
            False,
            "Electronics › Computers & Accessories › Cables › USB Cables",
            _attrs(*_DEVICE, "braided nylon", "high speed", "data transfer", "tangle free", "durable"),
            (DEVICE_COLORS, OptionGroup("size", ("3 ft", "6 ft", "10 ft"), (0, 2, 5))),
            (6, 25),
            ("works with most devices", "reinforced connectors", "bend tested"),
        ),
    ),
    ("works great", "good sound", "easy to set up", "solid build", "worth the price"),
)

CATEGORIES: tuple[Category, ...] = (_BEAUTY, _FOOD, _FASHION, _FURNITURE, _ELECTRONICS)

BRAND_PREFIXES = (
    "Al",
    "Bel",
    "Cor",
    "Dal",
    "El",
    "Fen",
    "Gal",
    "Hal",
    "Ist",
    "Jun",
    "Kel",
    "Lum",
    "Mar",
    "Nov",
    "Or",
    "Pel",
    "Quin",
    "Ros",
    "Sol",
    "Tor",
    "Ul",
    "Ver",
    "Wil",
    "Xan",
    "Yor",
    "Zen",
)
BRAND_SUFFIXES = ("ara", "ova", "ix", "ento", "ia", "on", "ux", "ette", "ani", "oro", "ika", "ess")
INSTRUCTION_LEADS = ("i need", "i want", "i am looking for", "find me", "i would like")
REVIEW_TITLES = ("Great", "Good buy", "Happy with it", "Nice", "As described", "Okay")
