"""episodes.prepare: Meta-Dataset sources from tiny raw downloads in their published layouts, without TensorFlow.

Checks the stored split lists against upstream's seeded rule, each source's spec (class names and counts per split
follow the upstream lists), exact pixels after upstream's rules (inversion, crops, QuickDraw's 0/255 scaling),
the within-class order, the one-sentence errors, and that nothing is left half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import helpers_prepare as hp
import numpy as np
import pytest
from PIL import Image

from episodes.hierarchy import class_dag
from episodes.prepare import PrepareError, prepare, prepared_source
from episodes.prepare.md_splits import SPLIT_ORDER, md_split, split_lists, stored_splits
from episodes.prepare.mscoco import crop_box
from episodes.prepare.source import md_record_order
from episodes.readers.hdf5 import PackedHDF5
from episodes.readers.tfrecord import open_md_source
from episodes.split import Split

# COCO 2017's 80 categories in the order of instances_train2017.json (the order upstream's split indices refer to).
COCO_ORDER = [name.replace("_", " ") for name in (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()]
SEEDED = ["dtd", "cu_birds", "aircraft", "vgg_flower", "quickdraw", "fungi", "mscoco"]
SIZES = {"omniglot": (25, 5, 20), "dtd": (33, 7, 7), "cu_birds": (140, 30, 30), "aircraft": (70, 15, 15),
         "vgg_flower": (71, 15, 16), "quickdraw": (241, 52, 52), "fungi": (994, 200, 200), "mscoco": (0, 40, 40),
         "traffic_sign": (0, 0, 43)}


def names(source: str) -> list:
    lists = split_lists(source)
    return [n for s in SPLIT_ORDER for n in lists[s]]


def spec_lists(h5: Path) -> dict[Split, list[str]]:
    spec = PackedHDF5(h5).spec
    return {s: [spec.class_name(c) for c in spec.class_ids(s)] for s in SPLIT_ORDER}


def listed(source: str, present: set) -> dict[Split, list]:
    """Upstream's lists restricted to the classes present, in list order."""
    return {s: [n for n in split_lists(source)[s] if n in present] for s in SPLIT_ORDER}


# -- split lists ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SEEDED)
def test_seeded_rule_reproduces_the_stored_upstream_lists(source):
    rule = stored_splits(source)["rule"]
    order = {"sorted class names": sorted(names(source)), "label order": sorted(names(source)),
             "category id": list(range(sum(rule["sizes"]))), "categories in file order": COCO_ORDER}[rule["order"]]
    assert md_split(order, rule["sizes"], rule["seed"]) == split_lists(source)


@pytest.mark.parametrize("source", sorted(SIZES))
def test_stored_lists_have_upstreams_split_sizes(source):
    lists = split_lists(source)
    assert tuple(len(lists[s]) for s in SPLIT_ORDER) == SIZES[source]
    assert len(set(names(source))) == sum(SIZES[source])


def test_omniglot_lists_follow_upstreams_rule_and_counts():
    data = stored_splits("omniglot")
    background = sorted(data["train"] + data["valid"])
    assert data["train"] == [a for a in background if a not in data["valid"]] and data["test"] == sorted(data["test"])
    per = data["characters_per_alphabet"]
    assert [sum(per[a] for a in data[s.value]) for s in SPLIT_ORDER] == [883, 81, 659]  # upstream's spec


def test_md_split_keeps_the_global_generator_state():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    md_split(list(range(10)), (6, 2, 2))
    assert np.random.rand() == expected


def test_record_order_matches_the_tfrecord_reader(tmp_path):
    from helpers_md import write_md_source

    from episodes.readers.tfrecord import MetaDatasetTFRecords

    write_md_source(tmp_path / "traffic_sign", name="traffic_sign", classes_per_split=(0, 0, 3),
                    images_per_class=[5, 9, 1])
    records = MetaDatasetTFRecords(tmp_path, name="traffic_sign", index_dir=tmp_path / "idx")
    for c, n in enumerate([5, 9, 1]):
        assert np.array_equal(records.record_numbers(c), md_record_order("traffic_sign", c, n))


# -- per source -----------------------------------------------------------------------------------------------
def test_omniglot_alphabets_are_superclasses_and_images_are_inverted(tmp_path):
    raw = hp.omniglot(tmp_path, {
        "images_background": {"Latin/character02": 2, "Latin/character01": 3, "Tagalog/character01": 2,
                              "Greek/character01": 1, "Not_An_Alphabet/character01": 1},
        "images_evaluation": {"Angelic/character01": 2}})
    summary = prepare("omniglot", raw.inputs, tmp_path / "out", progress=False, allow_missing=True)
    assert summary.image_size == 12  # Omniglot's images share one size: kept by default
    spec = PackedHDF5(summary.path).spec
    assert spec_lists(summary.path) == {Split.TRAIN: ["Greek-character01", "Latin-character01", "Latin-character02"],
                                        Split.VALID: ["Tagalog-character01"], Split.TEST: ["Angelic-character01"]}
    assert spec.superclasses_per_split == {Split.TRAIN: 2, Split.VALID: 1, Split.TEST: 1}
    assert spec.classes_per_superclass == {0: 1, 1: 2, 2: 1, 3: 1}
    assert spec.extra["superclass_names"] == {"0": "Greek", "1": "Latin", "2": "Tagalog", "3": "Angelic"}
    with prepared_source("omniglot", raw.inputs, allow_missing=True) as src:
        out = PackedHDF5(summary.path).read(1, range(3))
        for i in range(3):
            assert np.array_equal(out[i], 255 - raw.pixels[src.item(1, i)])


def test_reencode_jpeg_gives_the_pixels_of_upstreams_records(tmp_path):
    from io import BytesIO

    from episodes.readers.tfrecord_format import decode_image

    raw = hp.omniglot(tmp_path, {"images_background": {"Latin/character01": 2}})
    with prepared_source("omniglot", raw.inputs, allow_missing=True, shuffle=False, reencode_jpeg=True) as src:
        buf = BytesIO()
        Image.fromarray(255 - raw.pixels[src.item(0, 1)]).save(buf, format="JPEG")  # upstream's record
        assert np.array_equal(src.read(0, [1])[0], decode_image(buf.getvalue(), 12, "record"))
    photo = tmp_path / "CUB_200_2011" / "images" / "001.Black_footed_Albatross"
    photo.mkdir(parents=True)
    Image.fromarray(hp.noise(3, 40, 50)).save(photo / "a.jpg", quality=90)  # an RGB JPEG: upstream keeps its bytes
    for reencode in (False, True):
        with prepared_source("cu_birds", [tmp_path / "CUB_200_2011"], allow_missing=True, image_size=16,
                             reencode_jpeg=reencode) as src:
            got = src.read(0, [0])[0]
            assert np.array_equal(got, decode_image((photo / "a.jpg").read_bytes(), 16, "record"))


def test_dtd_skips_the_stray_file_and_follows_the_lists(tmp_path):
    classes = {"banded": 2, "waffled": 3, "gauzy": 1, "chequered": 2, "braided": 1}
    raw = hp.dtd(tmp_path, classes)
    h5 = prepare("dtd", raw.inputs, tmp_path / "out", image_size=10, progress=False, allow_missing=True).path
    assert spec_lists(h5) == listed("dtd", set(classes))
    assert spec_lists(h5)[Split.TRAIN] == ["chequered", "braided", "waffled"]  # upstream's order, not sorted
    assert PackedHDF5(h5).spec.images_per_class[2] == 3  # waffled's .directory is no image
    assert os.listdir(tmp_path / "out") == ["dtd.h5"]  # the staged tar is gone


def test_cu_birds_from_the_unpacked_folder(tmp_path):
    classes = {"001.Black_footed_Albatross": 2, "044.Frigatebird": 1, "008.Rhinoceros_Auklet": 3}
    raw = hp.cub(tmp_path, classes, as_folder=True)
    h5 = prepare("cu_birds", raw.inputs, tmp_path / "out", image_size=12, progress=False, allow_missing=True).path
    assert spec_lists(h5) == listed("cu_birds", set(classes))
    with prepared_source("cu_birds", raw.inputs, allow_missing=True, image_size=12) as src:
        squashed = Image.fromarray(raw.pixels[src.item(2, 1)]).resize((12, 12), Image.Resampling.BILINEAR)
        assert np.array_equal(PackedHDF5(h5).read(2, [1])[0], np.asarray(squashed))  # MD's bilinear squash


def test_traffic_sign_shuffles_each_class_with_upstreams_seed(tmp_path):
    raw = hp.gtsrb(tmp_path, {0: 7, 3: 4})
    with prepared_source("traffic_sign", raw.inputs, allow_missing=True, shuffle=False) as src:
        assert [src.spec.class_name(c) for c in range(2)] == ["00.Speed limit (20km/h)", "03.Speed limit (60km/h)"]
        files = sorted(p for p in raw.pixels if p.startswith("GTSRB/Final_Training/Images/00000/"))
        np.random.RandomState(23).shuffle(files)
        assert [src.item(0, i) for i in range(7)] == files  # GT-00000.csv left out, then shuffled
    h5 = prepare("traffic_sign", raw.inputs, tmp_path / "out", image_size=12, progress=False, allow_missing=True)
    with prepared_source("traffic_sign", raw.inputs, allow_missing=True, image_size=12) as src:
        order = md_record_order("traffic_sign", 1, 4)
        assert np.array_equal(PackedHDF5(h5.path).read(1, range(4)), src.read(1, range(4)))
        assert src.item(1, 0) == src.plan.classes[1].items[order[0]]


def test_quickdraw_keeps_every_drawing_uninverted_and_scales_booleans(tmp_path):
    raw = hp.quickdraw(tmp_path, {"cat": 3, "ant": 2, "angel": 4, "not a class": 1}, boolean=["ant"])
    summary = prepare("quickdraw", raw.inputs, tmp_path / "out", progress=False, allow_missing=True)
    assert summary.image_size == 28 and summary.images == {"train": 3, "valid": 2, "test": 4}
    packed = PackedHDF5(summary.path)
    rec = md_record_order("quickdraw", 1, 2)
    ant = packed.read(1, [0])[0]
    assert np.array_equal(ant[..., 0], raw.extra["ant"][rec[0]].reshape(28, 28).astype(np.uint8) * 255)
    cat = packed.read(0, range(3))
    for i, r in enumerate(md_record_order("quickdraw", 0, 3)):
        assert np.array_equal(cat[i], np.repeat(raw.extra["cat"][r].reshape(28, 28)[..., None], 3, -1))


def test_aircraft_crops_each_image_to_its_box(tmp_path):
    variants = {"A340-300": 3, "737-900": 2, "Spitfire": 2}
    raw = hp.aircraft(tmp_path, variants)
    h5 = prepare("aircraft", raw.inputs, tmp_path / "out", image_size=8, progress=False, allow_missing=True).path
    assert spec_lists(h5) == {Split.TRAIN: ["A340-300"], Split.VALID: ["737-900"], Split.TEST: ["Spitfire"]}
    with prepared_source("aircraft", raw.inputs, allow_missing=True, image_size=8, shuffle=False) as src:
        items = src.plan.classes[0].items
        assert [p for p, _ in items] == sorted(p for p, _ in items)  # sorted by image name
        got = src.read(0, range(3))
        for i, (path, _) in enumerate(items):
            assert np.array_equal(got[i], raw.pixels[path.rpartition("/")[2][:-4]])


def test_vgg_flower_names_labels_from_the_mat_file(tmp_path):
    labels = [90, 10, 5, 90, 10, 90]
    raw = hp.vgg_flower(tmp_path, labels)
    h5 = prepare("vgg_flower", raw.inputs, tmp_path / "out", image_size=10, progress=False, allow_missing=True).path
    assert spec_lists(h5) == {Split.TRAIN: ["090.canna lily"], Split.VALID: ["010.globe thistle"],
                              Split.TEST: ["005.english marigold"]}
    with prepared_source("vgg_flower", raw.inputs, allow_missing=True, shuffle=False) as src:
        assert list(src.plan.classes[0].items) == ["jpg/image_00001.jpg", "jpg/image_00004.jpg", "jpg/image_00006.jpg"]


def test_fungi_joins_train_and_val_annotations(tmp_path):
    cats = {226: "Cortinarius malicorius", 0: "Abortiporus biennis", 8: "Agaricus campestris", 5: "Unlisted one"}
    raw = hp.fungi(tmp_path, cats, {226: 4, 0: 2, 8: 3})
    h5 = prepare("fungi", raw.inputs, tmp_path / "out", image_size=10, progress=False, allow_missing=True).path
    assert spec_lists(h5) == {Split.TRAIN: ["0226.Cortinarius malicorius"], Split.VALID: ["0000.Abortiporus biennis"],
                              Split.TEST: ["0008.Agaricus campestris"]}
    sets = raw.extra["sets"]
    expected = [im["file_name"] for s in ("train", "val") for im in sets[s]["images"] if "00226_" in im["file_name"]]
    with prepared_source("fungi", raw.inputs, allow_missing=True, shuffle=False) as src:
        assert list(src.plan.classes[0].items) == expected  # train images first, then val, in list order


def test_mscoco_crops_enlarged_boxes_with_upstreams_rounding(tmp_path):
    assert crop_box([10.0, 20.0, 10.0, 10.0], 100, 100) == (8, 18, 21, 31)  # 8.5 rounds to 8: half to even,
    assert crop_box([11.0, 20.0, 10.0, 10.0], 100, 100) == (10, 18, 23, 31)  # 9.5 to 10, as Python 3's round
    assert crop_box([95.0, 95.0, 10.0, 10.0], 100, 100) == (94, 94, 100, 100)  # clipped to the image
    boxes = [(1, "person", [2.0, 3.0, 5.0, 4.0]), (1, "bicycle", [0.0, 0.0, 3.0, 3.0]),
             (2, "person", [17.0, 0.0, 3.0, 3.0]),  # starts past the right edge: no area, skipped
             (2, "person", [4.0, 4.0, 6.0, 2.0])]
    raw = hp.mscoco(tmp_path, ["person", "bicycle", "zebra"], boxes, {1: (12, 10), 2: (16, 10)})
    with prepared_source("mscoco", raw.inputs, allow_missing=True, shuffle=False, image_size=7) as src:
        assert [src.spec.class_name(c) for c in range(2)] == ["person", "bicycle"]
        assert src.spec.classes_per_split == {Split.TRAIN: 0, Split.VALID: 1, Split.TEST: 1}
        assert src.spec.images_per_class == {0: 2, 1: 1}  # zebra has no box: missing, not an empty class
        x0, y0, x1, y1 = crop_box([2.0, 3.0, 5.0, 4.0], 12, 10)
        assert (x1 - x0, y1 - y0) == (7, 6)
        crop = src.plan.load(src.plan.classes[0].items[0], 7)
        assert np.array_equal(np.asarray(crop), raw.pixels["000000000001.jpg"][y0:y1, x0:x1])


GRAPH = {"TRAIN": {"n00000001": ["n01440764", "n01443537", "n00000004"], "n00000004": ["n01484850", "n01491361"]},
         "VALID": {"n00000002": ["n02000001", "n02000002"]},
         "TEST": {"n00000003": ["n03000001", "n03000002"]}}
SYNSETS = {"n01440764": 3, "n01443537": 2, "n01484850": 2, "n01491361": 2, "n02000001": 2, "n02000002": 2,
           "n03000001": 2, "n03000002": 3}


def test_ilsvrc_reads_tars_of_tars_drops_duplicates_and_keeps_the_dag(tmp_path):
    raw = hp.ilsvrc(tmp_path, SYNSETS, GRAPH, duplicate=["n01440764_2.JPEG"])
    summary = prepare("ilsvrc_2012", raw.inputs, tmp_path / "out", image_size=8, progress=False)
    spec = PackedHDF5(summary.path).spec
    assert spec_lists(summary.path) == {Split.TRAIN: ["n01440764", "n01443537", "n01484850", "n01491361"],
                                        Split.VALID: ["n02000001", "n02000002"], Split.TEST: ["n03000001", "n03000002"]}
    assert spec.images_per_class[0] == 2 and not summary.notes  # n01440764_2.JPEG left out; counts as upstream
    dag = class_dag(spec, Split.TRAIN)
    assert dag is not None and dag.spans["n00000004"] == (2, 3) and dag.spans["n00000001"] == (0, 1, 2, 3)
    assert open_md_source("ilsvrc_2012", str(tmp_path / "out")).spec.extra["split_subgraphs"]


def test_ilsvrc_subset_prunes_the_dag(tmp_path):
    raw = hp.ilsvrc(tmp_path, {k: v for k, v in SYNSETS.items() if k != "n01484850"}, GRAPH)
    with pytest.raises(PrepareError, match='lack 1 of the 8 synsets .* "n01484850"'):
        prepared_source("ilsvrc_2012", raw.inputs)
    with prepared_source("ilsvrc_2012", raw.inputs, allow_missing=True) as src:
        dag = class_dag(src.spec, Split.TRAIN)
        assert dag is not None and dag.spans["n00000004"] == (2,) and src.spec.num_classes == 7


# -- shared contract ------------------------------------------------------------------------------------------
def full_download(source: str, tmp: Path) -> hp.Raw:
    """Every upstream class of ``source`` with one small image (two for some), in its real layout."""
    if source == "dtd":
        return hp.dtd(tmp, dict.fromkeys(names("dtd"), 1))
    if source == "cu_birds":
        return hp.cub(tmp, dict.fromkeys(names("cu_birds"), 1))
    if source == "traffic_sign":
        return hp.gtsrb(tmp, {c: 1 + c % 2 for c in range(43)})
    if source == "quickdraw":
        return hp.quickdraw(tmp, dict.fromkeys(names("quickdraw"), 1))
    if source == "aircraft":
        return hp.aircraft(tmp, dict.fromkeys(names("aircraft"), 1))
    if source == "vgg_flower":
        return hp.vgg_flower(tmp, [int(n[:3]) for n in names("vgg_flower")])
    if source == "mscoco":
        return hp.mscoco(tmp, COCO_ORDER, [(1, c, [1.0, 1.0, 4.0, 4.0]) for c in COCO_ORDER], {1: (12, 10)})
    raise AssertionError(source)


@pytest.mark.parametrize("source", ["dtd", "cu_birds", "traffic_sign", "quickdraw", "aircraft", "vgg_flower",
                                    "mscoco"])
def test_a_full_download_gives_upstreams_class_names_per_split(source, tmp_path):
    raw = full_download(source, tmp_path)
    summary = prepare(source, raw.inputs, tmp_path / "data", image_size=4, progress=False)
    assert spec_lists(summary.path) == split_lists(source) and not summary.missing
    named = open_md_source(source, str(tmp_path / "data"))  # the named source picks up <root>/<name>.h5
    assert isinstance(named, PackedHDF5) and named.spec.num_classes == sum(SIZES[source])
    assert os.listdir(tmp_path / "data") == [f"{source}.h5"]


def test_omniglot_full_alphabet_set(tmp_path):
    data = stored_splits("omniglot")
    per = data["characters_per_alphabet"]
    sets = {"images_background": {f"{a}/character{c + 1:02d}": 1 for a in data["train"] + data["valid"]
                                  for c in range(per[a])},
            "images_evaluation": {f"{a}/character{c + 1:02d}": 1 for a in data["test"] for c in range(per[a])}}
    raw = hp.omniglot(tmp_path, sets, side=4)
    with prepared_source("omniglot", raw.inputs) as src:
        spec = src.spec
        assert [spec.classes_per_split[s] for s in SPLIT_ORDER] == [883, 81, 659]  # upstream's spec
        supers = [spec.extra["superclass_names"][str(i)] for i in range(50)]
        assert supers == data["train"] + data["valid"] + data["test"]
        assert [spec.classes_per_superclass[i] for i in range(50)] == [per[a] for a in supers]
        assert spec.class_name(0) == "Anglo-Saxon_Futhorc-character01" and src.image_size == 4


def test_fungi_full_category_set(tmp_path):
    cats = {c: f"Species {c}" for c in range(1394)}
    raw = hp.fungi(tmp_path, cats, dict.fromkeys(range(1394), 1))
    with prepared_source("fungi", raw.inputs, image_size=4) as src:
        expected = {s: [f"{c:04d}.Species {c}" for c in split_lists("fungi")[s]] for s in SPLIT_ORDER}
        assert {s: [src.spec.class_name(c) for c in src.spec.class_ids(s)] for s in SPLIT_ORDER} == expected


def test_finished_output_is_kept_and_other_settings_are_refused(tmp_path):
    raw = hp.gtsrb(tmp_path, {0: 2, 1: 2})
    first = prepare("traffic_sign", raw.inputs, tmp_path / "out", image_size=6, progress=False, allow_missing=True)
    stamp = first.path.stat().st_mtime_ns
    for p in raw.inputs:
        p.unlink()  # a kept file needs no inputs at all
    again = prepare("traffic_sign", raw.inputs, tmp_path / "out", image_size=6, progress=False)
    assert again.skipped and again.path.stat().st_mtime_ns == stamp and again.images == first.images
    assert "already prepared" in again.describe() and Path(again) == first.path
    with pytest.raises(PrepareError, match=r"already holds traffic_sign at 6 px \(uint8, lossless\), not what "):
        prepare("traffic_sign", raw.inputs, tmp_path / "out", image_size=8, progress=False)
    with pytest.raises(PrepareError, match=r"delete it or pass overwrite=True\.$"):
        prepare("traffic_sign", raw.inputs, tmp_path / "out", reencode_jpeg=True, progress=False)


def test_summary_describes_classes_and_images_per_split(tmp_path):
    raw = hp.gtsrb(tmp_path, {0: 2, 5: 3})
    summary = prepare("traffic_sign", raw.inputs[0], tmp_path / "o", image_size=4, store="encoded", progress=False,
                      allow_missing=True)
    text = summary.describe()
    assert "traffic_sign -> " in text and "(4 px, encoded)" in text
    assert PackedHDF5(summary.path).read(1, [2]).shape == (1, 4, 4, 3)
    assert [line.split() for line in text.splitlines()[2:6]] == [
        ["train", "0", "0"], ["valid", "0", "0"], ["test", "2", "5"], ["total", "2", "5"]]
    assert "41 classes Meta-Dataset lists were not in the inputs" in text
    assert json.loads(json.dumps(summary.to_dict()))["images"] == {"train": 0, "valid": 0, "test": 5}
