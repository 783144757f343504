"""Annotation files: every ambiguity or type error names the file and the line, record or id."""

from __future__ import annotations

import json

import pytest
from fixtures_data import make_coco_fixture, make_jsonl_fixture, make_list_fixture, make_voc_fixture

from data_shards.coco import read_coco
from data_shards.convert import read_class_names
from data_shards.jsonl import read_jsonl
from data_shards.listfmt import read_list
from data_shards.voc import read_voc


def _coco(tmp_path, edit):
    fx = make_coco_fixture(tmp_path, n_images=6)
    data = json.loads(fx["annotations"].read_text())
    edit(data)
    fx["annotations"].write_text(json.dumps(data))
    return fx


def _dup(key, **changes):
    return lambda d: d[key].append(dict(d[key][0], **changes))


@pytest.mark.parametrize("edit, message", [
    (_dup("images", file_name="other.jpg"), r"images\[6\]: image id .* twice"),
    (_dup("categories", name="new"), r"categories\[5\]: category id .* twice"),
    (_dup("categories", id=777), r"categories\[5\]: category name .* twice"),
    (_dup("annotations", image_id=5555), r"annotations\[\d+\]: image_id 5555"),
    (_dup("annotations", category_id=66), r"category_id 66"),
    (lambda d: d["images"][2].__setitem__("id", "12"), r"images\[2\]: id must be an integer"),
    (lambda d: d["images"][1].__setitem__("file_name", "../../etc/passwd"),
     r"images\[1\].*leaves the image folder"),
    (lambda d: d.__setitem__("images", {"a": 1}), r"'images' must be a list"),
])
def test_coco_ambiguities_are_errors(tmp_path, edit, message):
    fx = _coco(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        read_coco(fx["annotations"], fx["images"])
    assert str(fx["annotations"]) in str(err.value)


def test_coco_repeated_json_key_and_bad_json(tmp_path):
    fx = make_coco_fixture(tmp_path, n_images=4)
    text = fx["annotations"].read_text()
    fx["annotations"].write_text(text[:-1] + ', "images": []}')
    with pytest.raises(ValueError, match="duplicate key 'images'"):
        read_coco(fx["annotations"], fx["images"])
    fx["annotations"].write_text('{\n"images": [,]}')
    with pytest.raises(ValueError, match=r"instances_train.json: invalid JSON \(line 2, column"):
        read_coco(fx["annotations"], fx["images"])


def test_coco_outside_paths_allowed_by_flag(tmp_path):
    fx = _coco(tmp_path, lambda d: d["images"][1].__setitem__("file_name", "../x.jpg"))
    data = read_coco(fx["annotations"], fx["images"], allow_outside=True)
    assert data.images[1] == fx["images"].parent / "x.jpg"


def _jsonl(tmp_path, line: str):
    fx = make_jsonl_fixture(tmp_path, n_images=3)
    fx["jsonl"].write_text(fx["jsonl"].read_text() + line + "\n")
    return fx


@pytest.mark.parametrize("line, message", [
    ('{"image": "img/x.jpg", "labels": {"alpha": 1}}', "labels must be a list, got dict"),
    ('{"image": "img/x.jpg", "labels": "alpha"}', "labels must be a list, got str"),
    ('{"image": "img/x.jpg", "labels": null}', "labels must be a list, got NoneType"),
    ('{"image": "img/x.jpg", "labels": [7]}', "class index 7 outside"),
    ('{"image": "img/x.jpg", "labels": [true]}', "neither"),
    ('{"image": "img/x.jpg", "labels": [], "labels": [1]}', "duplicate key 'labels'"),
    ('{"image": "img/000.jpg", "labels": [1]}', "already on line 1"),
    ('{"image": "/etc/passwd", "labels": []}', "leaves the image folder"),
    ('["img/x.jpg", [1]]', "expected"),
    ('{"image": "img/x.jpg", "labels": [1]', "invalid JSON"),
])
def test_jsonl_type_errors_name_file_and_line(tmp_path, line, message):
    fx = _jsonl(tmp_path, line)
    with pytest.raises(ValueError, match=rf"data.jsonl:4: .*{message}"):
        read_jsonl(fx["jsonl"], fx["class_file"])


def test_class_names_file_duplicates(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("a\nb\n\na\n")
    with pytest.raises(ValueError, match=r"classes.txt:4: class name 'a' already on line 1"):
        read_class_names(p)


@pytest.mark.parametrize("value, message", [(None, "got NoneType"), ({"0": 1}, "got dict"),
                                            ([0, 99], "class index 99 outside"),
                                            (["0"], "not a class index")])
def test_list_format_labels_must_be_index_lists(tmp_path, value, message):
    fx = make_list_fixture(tmp_path, n_images=4, num_classes=5)
    mapping = json.loads(fx["labels_json"].read_text())
    mapping[fx["names"][2]] = value
    fx["labels_json"].write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=rf"labels.json: image '{fx['names'][2]}': .*{message}"):
        read_list(fx["image_list"], fx["labels_json"], fx["images"], num_classes=5)


def test_list_format_duplicate_image_line(tmp_path):
    fx = make_list_fixture(tmp_path, n_images=4, num_classes=5)
    fx["image_list"].write_text(fx["image_list"].read_text() + fx["names"][0] + "\n")
    with pytest.raises(ValueError, match=r"image_list.txt:5: .* already on line 1"):
        read_list(fx["image_list"], fx["labels_json"], fx["images"], num_classes=5)


def test_voc_malformed_and_hostile_xml(tmp_path):
    fx = make_voc_fixture(tmp_path, n_images=6)
    name = fx["splits"]["test"]["names"][0]
    xml = fx["root"] / "Annotations" / f"{name}.xml"
    xml.write_text("<annotation><object><name>cat</name>\n<difficult>1</oops></annotation>")
    with pytest.raises(ValueError, match=rf"{name}.xml:2: malformed XML"):
        read_voc(fx["root"], "test")
    xml.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "cat">]>'
                   "<annotation><object><name>&e;</name></object></annotation>")
    with pytest.raises(ValueError, match=rf"{name}.xml: refused XML construct"):
        read_voc(fx["root"], "test")
    xml.write_text("<annotation><object><name>cat</name><difficult>yes</difficult></object></annotation>")
    with pytest.raises(ValueError, match=rf"{name}.xml: object 0: difficult must be 0 or 1"):
        read_voc(fx["root"], "test")


def test_voc_duplicate_and_escaping_names(tmp_path):
    fx = make_voc_fixture(tmp_path, n_images=6)
    sets = fx["root"] / "ImageSets" / "Main" / "test.txt"
    names = fx["splits"]["test"]["names"]
    sets.write_text("\n".join(names + [names[0]]) + "\n")
    with pytest.raises(ValueError, match=rf"test.txt:{len(names) + 1}: image '{names[0]}' already on line 1"):
        read_voc(fx["root"], "test")
    sets.write_text("../../secret\n")
    with pytest.raises(ValueError, match="leaves the image folder"):
        read_voc(fx["root"], "test")
