"""Loading WebShop's official files: a small fixture in the official format, and malformed files."""

import json
import os
import shutil

import pytest

from hiper_envs.webshop.loader import PRICE_STEPS, load_data_dir
from hiper_envs.webshop.schema import WebShopDataError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_small")


def test_products_follow_webshops_parsing():
    products, _ = load_data_dir(FIXTURE)
    by_asin = {p.asin: p for p in products}
    # 'nan' and the repeated asin are skipped, order kept.
    assert [p.asin for p in products] == ["B07TESTSH1", "B07TESTSH2", "B07TESTTS1", "B07TESTSP1"]
    shampoo = by_asin["B07TESTSH1"]
    assert shampoo.title.startswith("Herbal Essence")
    assert shampoo.query == "shampoo"  # lower-cased and stripped
    assert shampoo.options == {"size": ("12 fl oz", "24 fl oz"), "scent": ("coconut | lime", "lavender")}
    assert shampoo.attributes == ("sulfate free", "paraben free", "dry hair", "natural ingredients")
    assert (shampoo.price, shampoo.price_tag) == (12.99, "$12.99")
    ranged = by_asin["B07TESTSH2"]
    assert ranged.price_tag == "$8.5 to $16.0" and 8.5 <= ranged.price <= 16.0
    assert ranged.bullet_points == ("Tea tree oil cleanses the scalp",)  # a bare string becomes one bullet
    assert ranged.options == {}
    assert (by_asin["B07TESTTS1"].price, by_asin["B07TESTTS1"].price_tag) == (100.0, "$100.0")  # no price
    assert by_asin["B07TESTSP1"].attributes == ("DUMMY_ATTR",)  # no attribute entry


def test_range_prices_are_seeded():
    a, _ = load_data_dir(FIXTURE, seed=1)
    b, _ = load_data_dir(FIXTURE, seed=1)
    c, _ = load_data_dir(FIXTURE, seed=2)
    assert a[1].price == b[1].price != c[1].price


def test_human_goals():
    products, goals = load_data_dir(FIXTURE)
    prices = {p.asin: p.price for p in products}
    assert sorted(g.goal_id for g in goals) == ["B07TESTSH1-0", "B07TESTSP1-0", "B07TESTTS1-0"]
    shampoo = next(g for g in goals if g.asin == "B07TESTSH1")
    assert shampoo.goal_options == ("coconut | lime", "12 fl oz")
    assert shampoo.attributes == ("sulfate free", "dry hair")
    assert shampoo.instruction_text == (
        "i need a sulfate free shampoo for dry hair in coconut scent, "
        f"and price lower than {shampoo.price_upper:.2f} dollars"
    )
    for goal in goals:
        next_steps = [p for p in PRICE_STEPS if p > prices[goal.asin]][:4]
        assert goal.price_upper in next_steps[1:]  # the larger of two of the next four $10 steps
    assert [g.split for g in goals].count("eval") == 1  # half of 3, rounded down


def test_synthetic_goals_enumerate_option_combinations():
    _, goals = load_data_dir(FIXTURE, human_goals_first=False)
    shampoo = sorted((g for g in goals if g.asin == "B07TESTSH1"), key=lambda g: g.goal_id)
    assert len(shampoo) == 4  # 2 sizes x 2 scents
    assert shampoo[0].goal_options == {"scent": "coconut | lime", "size": "12 fl oz"}
    assert shampoo[0].instruction_text.startswith(
        "i am looking for a sulfate free shampoo for dry hair with scent: coconut | lime, and size: 12 fl oz"
    )
    assert len([g for g in goals if g.asin == "B07TESTTS1"]) == 6
    assert not [g for g in goals if g.asin == "B07TESTSP1"]  # no instruction for it


def copy_fixture(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(FIXTURE, target)
    return target


def rewrite(path, edit):
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r[0].pop("name"), "'name'"),
        (lambda r: r[1].__setitem__("query", 7), "'query'"),
        (lambda r: r[0].__setitem__("pricing", "free"), "'pricing'"),
        (lambda r: r[0]["customization_options"]["Size"][0].pop("value"), "'value'"),
        (lambda r: r[3].__setitem__("small_description", [1, 2]), "'small_description'"),
        (lambda r: r.__setitem__(1, "not a record"), "product #1"),
    ],
)
def test_malformed_product_names_file_record_and_field(tmp_path, edit, field):
    data = copy_fixture(tmp_path)
    rewrite(data / "items_shuffle_1000.json", edit)
    with pytest.raises(WebShopDataError) as error:
        load_data_dir(str(data))
    message = str(error.value)
    assert "items_shuffle_1000.json" in message and field in message


def test_malformed_attributes_and_instructions_name_their_file(tmp_path):
    data = copy_fixture(tmp_path)
    rewrite(
        data / "items_ins_v2_1000.json", lambda r: r["B07TESTSH1"].__setitem__("attributes", "sulfate free")
    )
    with pytest.raises(WebShopDataError, match=r"items_ins_v2_1000.json.*B07TESTSH1.*'attributes'"):
        load_data_dir(str(data))
    data = copy_fixture(tmp_path / "second")
    rewrite(data / "items_human_ins.json", lambda r: r["B07TESTTS1"][0].pop("instruction"))
    with pytest.raises(WebShopDataError, match=r"items_human_ins.json.*B07TESTTS1.*'instruction'"):
        load_data_dir(str(data))


def test_invalid_json_and_missing_files(tmp_path):
    data = copy_fixture(tmp_path)
    (data / "items_shuffle_1000.json").write_text('[{"asin": ')
    with pytest.raises(WebShopDataError, match=r"items_shuffle_1000.json: not valid JSON"):
        load_data_dir(str(data))
    with pytest.raises(WebShopDataError, match="no products file"):
        load_data_dir(str(tmp_path))
    with pytest.raises(WebShopDataError, match="not a directory"):
        load_data_dir(str(tmp_path / "missing"))


def test_goals_file_errors_name_the_goal(tmp_path):
    data = copy_fixture(tmp_path)
    (data / "goals.json").write_text(json.dumps([{"goal_id": "x", "asin": "B0UNKNOWN"}]))
    with pytest.raises(WebShopDataError, match=r"goals.json: goal #0: field 'asin' names unknown product"):
        load_data_dir(str(data))
