"""SLAKE, VQA-RAD and PathVQA loaders on tiny fixtures written in the official layouts."""

import json
import os
import pickle
import shutil

import gymnasium
import pytest

import hiper_envs  # noqa: F401 - registers the ids
from hiper_envs.medvista import loaders
from hiper_envs.medvista.schema import MedVistaDataError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def copy_fixture(name, tmp_path):
    return shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)


def test_slake_english_questions_with_detection_boxes():
    root = os.path.join(FIXTURES, "slake")
    assert loaders.detect_layout(root) == "slake"
    train = loaders.load(root, "train")
    assert [i.qid for i in train] == ["1", "2"]  # the Chinese question is left out
    first = train[0]
    assert (first.answer, first.answer_type, first.candidates, first.dataset) == ("Yes", "closed", ("yes", "no"), "slake")
    assert first.image_path.endswith(os.path.join("imgs", "xmlab1", "source.jpg"))
    liver = first.regions[0]
    assert liver.name == "Liver" and liver.box == pytest.approx((100.0, 187.5, 350.0, 437.5))  # 40x32 image
    assert train[1].answer_type == "open" and train[1].candidates == ()
    assert [i.qid for i in loaders.load(root, "test")] == ["5", "6"]
    assert len(loaders.load(root, "validate")) == 1


def test_vqa_rad_splits_by_phrase_type():
    root = os.path.join(FIXTURES, "vqa_rad")
    assert loaders.detect_layout(root) == "vqa-rad"
    train, test = loaders.load(root, "train"), loaders.load(root, "test")
    assert [i.qid for i in train] == ["1", "2"] and [i.qid for i in test] == ["3", "4"]
    assert train[1].answer == "2" and train[1].answer_type == "open"  # numeric answers read as text
    assert test[1].answer_type == "closed"  # "CLOSED " with its trailing space
    assert loaders.load(root, "validate") == []


def test_pathvqa_released_pickles():
    root = os.path.join(FIXTURES, "pathvqa")
    assert loaders.detect_layout(root) == "pathvqa"
    train = loaders.load(root, "train")
    assert [(i.answer, i.answer_type) for i in train] == [("yes", "closed"), ("neutrophils", "open")]
    assert train[0].image_path.endswith(os.path.join("images", "train", "train_0001.jpg"))
    assert loaders.load(root, "validate")[0].image_id == "val_0001"


@pytest.mark.parametrize("name, split", [("slake", "test"), ("vqa_rad", "test"), ("pathvqa", "train")])
def test_env_plays_official_data(name, split):
    env = gymnasium.make("hiper/MedVista-v0", data_dir=os.path.join(FIXTURES, name), split=split).unwrapped
    _, info = env.reset(options={"index": 0})
    assert info["images"][0].shape == (224, 224, 3)
    _, reward, terminated, _, info = env.step(f"answer[{env.item.answer}]")
    assert terminated and reward == 1.0 and info["won"]


def test_pathvqa_pickles_cannot_run_code(tmp_path):
    root = copy_fixture("pathvqa", tmp_path)
    with open(root / "qas" / "train" / "train_qa.pkl", "wb") as f:
        pickle.dump([{"image": "train_0001", "question": "q", "answer": os.path.join}], f)
    with pytest.raises(MedVistaDataError, match=r"train_qa\.pkl: not a plain-data pickle"):
        loaders.load(str(root), "train")


def _edit_json(path, edit):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    edit(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


@pytest.mark.parametrize("name, file, edit, message", [
    ("slake", "train.json", lambda d: d[0].pop("answer"), r"train\.json: record 0: missing field 'answer'"),
    ("slake", "train.json", lambda d: d[1].update(answer_type="FREE"), r"record 1: field 'answer_type'"),
    ("slake", "test.json", lambda d: d[0].update(img_name="xmlab9/source.jpg"), r"field 'img_name' names a missing image"),
    ("slake", "imgs/xmlab1/detection.json", lambda d: d[0].update(Liver=[1, 2]), r"detection\.json: entry 0 field 'Liver'"),
    ("vqa_rad", "VQA_RAD Dataset Public.json", lambda d: d[2].update(question=7), r"record 2: field 'question' must be str"),
    ("vqa_rad", "VQA_RAD Dataset Public.json", lambda d: d[3].pop("phrase_type"), r"record 3: missing field 'phrase_type'"),
])
def test_wrong_layouts_name_the_file_and_field(tmp_path, name, file, edit, message):
    root = copy_fixture(name, tmp_path)
    _edit_json(root / file, edit)
    split = "train" if file in ("train.json", "imgs/xmlab1/detection.json") else "test"
    with pytest.raises(MedVistaDataError, match=message):
        loaders.load(str(root), split)


def test_missing_files_and_unknown_layouts(tmp_path):
    root = copy_fixture("pathvqa", tmp_path)
    os.remove(root / "images" / "val" / "val_0001.jpg")
    with pytest.raises(MedVistaDataError, match=r"val_qa\.pkl: image file not found: .*val_0001\.jpg"):
        loaders.load(str(root), "validate")
    with pytest.raises(MedVistaDataError, match="no known layout"):
        loaders.load(str(tmp_path), "train")
    with pytest.raises(MedVistaDataError, match="data directory not found"):
        loaders.load(str(tmp_path / "nowhere"), "train")
