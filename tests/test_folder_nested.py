"""Image-folder sources in the nested layout (root/<superclass>/<class>/*, as Omniglot is released)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_folder_source import COLOURS, make_image, write_class_folders

from episodes.episode import Split
from episodes.loader import EpisodeSet
from episodes.readers.folder import FolderSourceError, ImageFolderSource, within_class_order
from episodes.sampler import SamplerConfig

# -- the nested layout (root/<superclass>/<class>/*) ---------------------------------------------
NESTED = {"red": {"apple": 6, "cherry": 7}, "yellow": {"banana": 5, "date": 4}, "blue": {"elder": 5, "fig": 6}}


def write_nested(root: Path) -> None:
    for sup, classes in NESTED.items():
        write_class_folders(root / sup, classes)


def test_nested_layout_is_detected_and_gives_superclasses(tmp_path):
    root = tmp_path / "alphabets"
    write_nested(root)
    src = ImageFolderSource(root, image_size=None)
    assert src.layout == "nested" and src.spec.num_classes == 6
    assert src.spec.superclasses_per_split == {Split.TRAIN: 0, Split.VALID: 0, Split.TEST: 3}
    names = [src.spec.class_name(c) for c in src.spec.class_ids("test")]
    assert names == ["blue/elder", "blue/fig", "red/apple", "red/cherry", "yellow/banana", "yellow/date"]
    members = [[src.spec.class_name(c) for c in src.spec.classes_of_superclass(s)] for s in range(3)]
    assert members == [["blue/elder", "blue/fig"], ["red/apple", "red/cherry"], ["yellow/banana", "yellow/date"]]
    apple = names.index("red/apple")
    order = within_class_order("red/apple", 6)
    expected = np.stack([make_image(COLOURS["apple"], int(i)) for i in order])
    np.testing.assert_array_equal(src.read(apple, range(6)), expected)
    assert not ImageFolderSource(root, superclasses=False).spec.has_superclasses
    assert ImageFolderSource(root, layout="nested").spec.to_dict() == ImageFolderSource(root).spec.to_dict()


def test_nested_splits_by_superclass_drive_the_bilevel_sampler(tmp_path):
    root = tmp_path / "alphabets"
    write_nested(root)
    src = ImageFolderSource(root, splits={"train": ["red", "yellow"], "test": ["blue"]}, domain="id")
    assert src.spec.classes_per_split == {Split.TRAIN: 4, Split.VALID: 0, Split.TEST: 2}
    assert src.spec.superclasses_per_split == {Split.TRAIN: 2, Split.VALID: 0, Split.TEST: 1}
    cfg = SamplerConfig(min_ways=2, max_ways_upper_bound=2, max_num_query=1)
    es = EpisodeSet([src], "train", cfg, n_episodes=20, seed=0)
    supers = {frozenset(src.spec.classes_of_superclass(s)) for s in src.spec.superclass_ids("train")}
    assert all(frozenset(es.describe(i).class_ids) in supers for i in range(20))  # ways from one alphabet
    mixed = ImageFolderSource(root, splits={"train": ["red", "yellow/banana", "yellow/date"], "test": ["blue"]})
    assert mixed.spec.classes_per_split[Split.TRAIN] == 4
    with pytest.raises(FolderSourceError, match='splits names class "green", which is not in the data'):
        ImageFolderSource(root, splits={"train": ["green"]})
    with pytest.raises(FolderSourceError, match='class "yellow/banana" is in no split'):
        ImageFolderSource(root, splits={"train": ["red"], "test": ["blue"]})


def test_nested_layout_errors_name_the_folder(tmp_path):
    root = tmp_path / "alphabets"
    write_nested(root)
    Image.fromarray(make_image(COLOURS["fig"], 0)).save(root / "blue" / "stray.png")
    with pytest.raises(FolderSourceError, match=r"blue holds images beside its class folders"):
        ImageFolderSource(root, layout="nested")
    (root / "blue" / "stray.png").unlink()
    (root / "blue" / "empty").mkdir()
    with pytest.raises(FolderSourceError, match=r"Class folder .*empty has no images"):
        ImageFolderSource(root, layout="nested")
