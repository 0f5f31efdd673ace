"""prepare's one-sentence errors (nothing half-written) and its CLI, ``metabench data prepare``."""

from __future__ import annotations

import json
import os

import helpers_prepare as hp
import pytest

from episodes.prepare import InputNotFound, PrepareError, prepare
from episodes.readers.hdf5 import PackedHDF5


# -- errors ---------------------------------------------------------------------------------------------------
def one_sentence(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
    return text


def test_unknown_source_suggests_a_name(tmp_path):
    with pytest.raises(PrepareError) as e:
        prepare("omniglott", [tmp_path], tmp_path / "out")
    assert 'did you mean "omniglot"' in one_sentence(e)


def test_missing_input_and_wrong_folder(tmp_path):
    with pytest.raises(InputNotFound) as e:
        prepare("dtd", [tmp_path / "dtd-r1.0.1.tar.gz"], tmp_path / "out")
    assert isinstance(e.value, FileNotFoundError) and "does not exist" in one_sentence(e)
    (tmp_path / "somewhere" / "else").mkdir(parents=True)
    with pytest.raises(InputNotFound) as e:
        prepare("traffic_sign", [tmp_path / "somewhere"], tmp_path / "out")
    assert "Final_Training/Images/" in one_sentence(e)
    assert not (tmp_path / "out").exists()


def test_missing_member_names_it(tmp_path):
    raw = hp.vgg_flower(tmp_path, [90, 10, 5, 90], drop=[3])
    with pytest.raises(InputNotFound) as e:
        prepare("vgg_flower", raw.inputs, tmp_path / "out", allow_missing=True, progress=False)
    assert '"jpg/image_00004.jpg"' in one_sentence(e) and "imagelabels.mat" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_incomplete_download_is_refused_unless_allowed(tmp_path):
    raw = hp.dtd(tmp_path, {"banded": 1, "gauzy": 1})
    with pytest.raises(PrepareError) as e:
        prepare("dtd", raw.inputs, tmp_path / "out", progress=False)
    assert 'lack 45 of the 47 classes Meta-Dataset lists for dtd (first: "chequered")' in one_sentence(e)
    with pytest.raises(InputNotFound) as e:
        prepare("dtd", hp.cub(tmp_path, {"001.Black_footed_Albatross": 1}).inputs, tmp_path / "out")
    assert "hold no images/ folder of class folders; pass dtd-r1.0.1.tar.gz" in one_sentence(e)
    with pytest.raises(PrepareError) as e:
        prepare("quickdraw", hp.quickdraw(tmp_path, {"not a doodle": 1}).inputs, tmp_path / "out")
    assert 'none of the 345 classes Meta-Dataset lists for quickdraw (such as "hedgehog"); pass the quickdraw download' in one_sentence(e)
    assert not (tmp_path / "out").exists()


def test_an_undecodable_image_stops_and_leaves_nothing(tmp_path):
    files = {"dtd/images/banded/banded_0001.jpg": b"not an image", "dtd/images/gauzy/gauzy_0001.jpg": hp.png(hp.noise(1))}
    tar = hp.write_tar(tmp_path / "dtd-r1.0.1.tar.gz", files)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError) as e:
        prepare("dtd", [tar], tmp_path / "out", allow_missing=True, progress=False)
    assert '"dtd/images/banded/banded_0001.jpg"' in one_sentence(e) and "cannot be decoded" in str(e.value)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_bad_annotations_are_one_sentence(tmp_path):
    raw = hp.fungi(tmp_path, {0: "A b"}, {0: 2})
    bad = hp.write_tar(tmp_path / "train_val_annotations.tgz", {"train.json": b"{not json", "val.json": b"{}"})
    with pytest.raises(PrepareError) as e:
        prepare("fungi", [raw.inputs[0], bad], tmp_path / "out", allow_missing=True)
    assert '"train.json"' in one_sentence(e) and "not valid JSON" in str(e.value)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "instances_train2017.json").write_text(json.dumps({"annotations": []}))
    (tmp_path / "x" / "train2017").mkdir()
    (tmp_path / "x" / "train2017" / "000000000001.jpg").write_bytes(hp.png(hp.noise(0)))
    with pytest.raises(PrepareError) as e:
        prepare("mscoco", [tmp_path / "x"], tmp_path / "out")
    assert "lacks the COCO instance fields" in one_sentence(e)


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError) as e:
        prepare("dtd", [tmp_path], tmp_path / "file")
    assert "is a file" in one_sentence(e)


def test_cli_prepares_a_source_the_named_source_then_reads(tmp_path, capsys):
    from episodes.readers import SOURCES
    from metabench.cli import main

    raw = hp.dtd(tmp_path, {"banded": 2, "waffled": 3, "chequered": 2})
    out = tmp_path / "md"
    assert main(["data", "prepare", "dtd", "--from", *map(str, raw.inputs), "--out", str(out), "--image-size", "10",
                 "--allow-missing", "--quiet"]) == 0
    assert "dtd" in capsys.readouterr().out
    source = SOURCES.get("dtd")(root=str(out))
    assert isinstance(source, PackedHDF5) and source.spec.num_classes == 3
    assert main(["data", "prepare", "dtd", "--out", str(out)]) == 2  # no --from: one line, exit 2
    assert "needs --from PATH" in capsys.readouterr().err
