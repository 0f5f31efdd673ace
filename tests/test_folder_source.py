"""Image-folder sources: both layouts, exact pixels, determinism, the index cache, errors, episodes."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from episodes.loader import EpisodeSet
from episodes.readers import SOURCES
from episodes.readers.folder import (
    NAMED_FOLDERS,
    FolderSourceError,
    ImageFolderSource,
    decode_image,
    within_class_order,
)
from episodes.sampler import SamplerConfig
from episodes.split import Split

COLOURS = {"apple": (200, 30, 30), "banana": (230, 220, 40), "cherry": (120, 0, 60),
           "date": (90, 60, 20), "elder": (20, 20, 120), "fig": (120, 40, 160)}
COUNTS = {"apple": 6, "banana": 5, "cherry": 7, "date": 4, "elder": 5, "fig": 6}


def make_image(colour: tuple[int, int, int], i: int, size: tuple[int, int] = (12, 12)) -> np.ndarray:
    """A flat colour with a small square whose position and brightness identify image ``i``."""
    h, w = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[...] = colour
    y, x = (i * 3) % (h - 2), (i * 5) % (w - 2)
    img[y : y + 2, x : x + 2] = (i * 17) % 256
    return img


def write_class_folders(root: Path, classes: dict[str, int], jpeg: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """root/<class>/img_<i>.png (or .jpg); returns path -> pixels for the PNGs."""
    pixels = {}
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = make_image(COLOURS[name], i)
            ext = "jpg" if name in jpeg else "png"
            path = root / name / f"img_{i:02d}.{ext}"
            Image.fromarray(img).save(path, quality=95) if ext == "jpg" else Image.fromarray(img).save(path)
            if ext == "png":
                pixels[str(path)] = img
    return pixels


def write_meta_album(root: Path, rows: list[tuple[str, str, str]]) -> None:
    """Meta-Album layout: labels.csv (FILE_NAME, CATEGORY, SUPER_CATEGORY) and images/."""
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["FILE_NAME", "CATEGORY", "SUPER_CATEGORY"])
        for i, (file_name, category, superclass) in enumerate(rows):
            Image.fromarray(make_image(COLOURS[category], i)).save(root / "images" / file_name)
            writer.writerow([file_name, category, superclass])


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "fruit"
    pixels = write_class_folders(root, {k: COUNTS[k] for k in ("apple", "banana", "cherry")}, jpeg={"cherry"})
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root, pixels


META_ROWS = [(f"{c}_{i}.png", c, "red" if c in ("apple", "cherry", "fig") else "other")
             for c in ("apple", "banana", "cherry", "date", "elder", "fig") for i in range(COUNTS[c])]


# -- layouts and spec ----------------------------------------------------------------------------
def test_class_folders_spec(folder):
    root, _ = folder
    src = ImageFolderSource(root, image_size=None)
    spec = src.spec
    assert src.name == "folder" and src.domain == "ood" and src.layout == "folders"
    assert spec.classes_per_split == {Split.TRAIN: 0, Split.VALID: 0, Split.TEST: 3}
    assert [spec.class_name(c) for c in range(3)] == ["apple", "banana", "cherry"]
    assert spec.images_per_class == {0: 6, 1: 5, 2: 7}  # notes.txt and .hidden are skipped
    assert src.native_size == (12, 12)


def test_png_pixels_exact_at_native_size(folder):
    root, pixels = folder
    src = ImageFolderSource(root, image_size=None)
    for class_id in (0, 1):
        images = src.read(class_id, range(src.spec.images_per_class[class_id]))
        assert images.dtype == np.uint8 and images.shape == (len(images), 12, 12, 3)
        for i, img in enumerate(images):
            assert np.array_equal(img, pixels[str(src.path_of(class_id, i))])
    jpeg = src.read(2, [0])[0].astype(int)  # lossy, but the class colour survives
    assert np.abs(jpeg[0, -1] - np.array(COLOURS["cherry"])).max() <= 12


def test_order_is_sorted_then_fixed_shuffle(folder, tmp_path):
    root, _ = folder
    a, b = ImageFolderSource(root), ImageFolderSource(root, image_size=32)
    names = [a.path_of(2, i).name for i in range(7)]
    assert names == [b.path_of(2, i).name for i in range(7)]
    expected = [sorted(p.name for p in (root / "cherry").iterdir())[k] for k in within_class_order("cherry", 7)]
    assert names == expected and names != sorted(names)
    # A class's order does not depend on the other classes.
    other = tmp_path / "other"
    write_class_folders(other, {"cherry": 7, "date": 4}, jpeg={"cherry"})
    assert [ImageFolderSource(other).path_of(0, i).name for i in range(7)] == names
    assert np.array_equal(a.read(0, [3, 1]), a.read(0, [1, 3])[::-1])


def test_resize_squash_and_crop(tmp_path):
    root = tmp_path / "wide"
    (root / "stripes").mkdir(parents=True)
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).save(root / "stripes" / "a.png")
    squash = ImageFolderSource(root, image_size=24).read(0, [0])[0]
    crop = ImageFolderSource(root, image_size=24, resize="crop").read(0, [0])[0]
    assert squash.shape == crop.shape == (24, 24, 3)
    assert tuple(squash[12, 1]) == (255, 0, 0) and tuple(squash[12, -2]) == (0, 0, 255)  # all three stripes kept
    assert tuple(crop[12, 1]) == (0, 255, 0) and tuple(crop[12, -2]) == (0, 255, 0)  # only the centre stripe


def test_decode_greyscale_palette_and_16bit(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    palette = Image.new("P", (8, 8))
    palette.putpalette([v for level in range(256) for v in (level, level, level)])
    palette.putdata(grey.flatten().tolist())
    palette.save(tmp_path / "p.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "w.png")  # 16-bit: scaled, not clipped
    for name in ("g.png", "p.png", "w.png"):
        rgb = decode_image(tmp_path / name, None)
        assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 1], grey), name


def test_meta_album_layout_and_superclasses(tmp_path):
    root = tmp_path / "ma"
    write_meta_album(root, META_ROWS)
    src = ImageFolderSource(root, image_size=None)
    assert src.layout == "meta_album" and src.spec.num_classes == 6
    assert src.spec.images_per_class == {c: COUNTS[n] for c, n in enumerate(sorted(COUNTS))}
    assert np.array_equal(src.read(0, [0])[0], make_image(COLOURS["apple"], int(src.path_of(0, 0).stem.split("_")[1])))
    sup = ImageFolderSource(root, superclasses=True)
    assert sup.spec.superclasses_per_split == {Split.TRAIN: 0, Split.VALID: 0, Split.TEST: 2}
    assert sup.spec.classes_per_superclass == {0: 3, 1: 3}
    assert [sup.spec.class_name(c) for c in sup.spec.classes_of_superclass(0)] == ["banana", "date", "elder"]
    assert sup.spec.extra["superclass_names"] == {"0": "other", "1": "red"}


def test_splits_option(tmp_path):
    root = tmp_path / "ma"
    write_meta_album(root, META_ROWS)
    splits = {"train": ["apple", "cherry", "fig"], "valid": ["banana"], "TEST": ["date", "elder"]}
    src = ImageFolderSource(root, splits=splits)
    assert src.spec.classes_per_split == {Split.TRAIN: 3, Split.VALID: 1, Split.TEST: 2}
    assert [src.spec.class_name(c) for c in src.spec.class_ids("test")] == ["date", "elder"]
    (tmp_path / "splits.json").write_text('{"train": ["apple", "banana", "cherry", "date", "elder", "fig"]}')
    assert ImageFolderSource(root, splits=tmp_path / "splits.json").spec.classes_per_split[Split.TRAIN] == 6
    assert ImageFolderSource(root, split="valid").spec.classes_per_split[Split.VALID] == 6
    by_super = {"train": ["apple", "cherry", "fig"], "test": ["banana", "date", "elder"]}
    sup = ImageFolderSource(root, splits=by_super, superclasses=True)  # each super-category in one split
    assert sup.spec.superclasses_per_split == {Split.TRAIN: 1, Split.VALID: 0, Split.TEST: 1}
    assert sup.spec.class_ids("train") == [0, 1, 2] and sup.spec.class_name(0) == "apple"


# -- the index cache -----------------------------------------------------------------------------
def test_index_cache_skips_the_listing_until_a_folder_changes(folder, monkeypatch):
    root, _ = folder
    first = ImageFolderSource(root)

    def no_listing(*args, **kwargs):
        raise AssertionError("the folder was listed again")

    with monkeypatch.context() as m:
        for target, attr in ((os, "scandir"), (os, "listdir"), (os, "walk"), (Path, "iterdir"), (Path, "rglob")):
            m.setattr(target, attr, no_listing)
        again = ImageFolderSource(root)
    assert again.spec == first.spec
    assert [again.path_of(1, i) for i in range(5)] == [first.path_of(1, i) for i in range(5)]
    Image.fromarray(make_image(COLOURS["banana"], 9)).save(root / "banana" / "img_09.png")
    stat = os.stat(root / "banana")
    os.utime(root / "banana", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-clock filesystems
    assert ImageFolderSource(root).spec.images_per_class[1] == 6


def test_wrapper_folders_are_descended(tmp_path):
    root = tmp_path / "food101"  # as Food-101 unpacks: food-101/images/<class>/ beside food-101/meta/
    write_class_folders(root / "food-101" / "images", {"apple": 3, "banana": 3})
    (root / "food-101" / "meta").mkdir()
    (root / "food-101" / "meta" / "classes.txt").write_text("apple\nbanana\n")
    src = ImageFolderSource(root)
    assert src.spec.num_classes == 2 and src.path_of(0, 0).parent == root / "food-101" / "images" / "apple"
    assert ImageFolderSource(root).spec == src.spec  # and from the cache too
    (root / "food-101" / "other").mkdir()
    (root / "food-101" / "other" / "sub").mkdir()  # two candidate folders: ambiguous, so no guess
    with pytest.raises(FolderSourceError, match="has no class sub-folders with images"):
        ImageFolderSource(root, layout="folders", image_size=64)


# -- exclusion lists ------------------------------------------------------------------------------
DUPLICATES = """# as Meta-Dataset's ImageNet_CUBirds_duplicates.txt: path, then the duplicated file in a comment
apple/img_01.png   # other_source/x_0001.jpg
img_03.png         # a bare file name matches in every class
./banana/img_00.png
"""


def test_exclude_leaves_files_out_of_spec_and_index(folder, tmp_path):
    root, _ = folder
    (tmp_path / "dups.txt").write_text(DUPLICATES)
    src = ImageFolderSource(root, exclude=tmp_path / "dups.txt")
    assert src.excluded == 4 and src.spec.images_per_class == {0: 4, 1: 3, 2: 7}
    left = {(c, src.path_of(c, i).name) for c in range(3) for i in range(src.spec.images_per_class[c])}
    assert not left & {(0, "img_01.png"), (0, "img_03.png"), (1, "img_00.png"), (1, "img_03.png")}
    assert len(left) == 14
    inline = ImageFolderSource(root, exclude=["apple/img_01.png", "img_03.png  # comment", "banana/img_00.png"])
    assert inline.spec == src.spec and inline.excluded == 4
    assert ImageFolderSource(root).spec.images_per_class == {0: 6, 1: 5, 2: 7}  # without a list: everything
    (root / "dups.txt").write_text("apple/img_00.png\n")  # a relative list path is also looked up under root
    assert ImageFolderSource(root, exclude="dups.txt").spec.images_per_class == {0: 5, 1: 5, 2: 7}


def test_exclude_paths_relative_to_root_or_class_parent(tmp_path):
    root = tmp_path / "food101"  # the class folders are two levels down: food-101/images/<class>/
    write_class_folders(root / "food-101" / "images", {"apple": 3, "banana": 3})
    src = ImageFolderSource(root, exclude=["food-101/images/apple/img_00.png", "banana/img_02.png"])
    assert src.excluded == 2 and src.spec.images_per_class == {0: 2, 1: 2}


def test_exclude_meta_album_tolerates_deleted_duplicates(tmp_path):
    root = tmp_path / "ma"
    write_meta_album(root, META_ROWS)
    (root / "images" / "apple_2.png").unlink()  # a duplicate already removed from disk, still in labels.csv
    src = ImageFolderSource(root, exclude=["apple_2.png", "images/fig_0.png"])
    assert src.excluded == 2 and src.spec.images_per_class[0] == COUNTS["apple"] - 1
    assert src.spec.images_per_class[5] == COUNTS["fig"] - 1
    with pytest.raises(FolderSourceError, match='excludes every image of category "date"'):
        ImageFolderSource(root, exclude=[f"date_{i}.png" for i in range(COUNTS["date"])] + ["apple_2.png"])


def test_exclude_changes_invalidate_the_index_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    dups = tmp_path / "dups.txt"
    assert ImageFolderSource(root).spec.images_per_class == {0: 6, 1: 5, 2: 7}
    dups.write_text("img_00.png\n")
    assert ImageFolderSource(root, exclude=dups).spec.images_per_class == {0: 5, 1: 4, 2: 7}
    dups.write_text("img_00.png\nimg_01.png\n")  # a new entry: a different list, so a rescan
    assert ImageFolderSource(root, exclude=dups).spec.images_per_class == {0: 4, 1: 3, 2: 7}

    def no_listing(*args, **kwargs):
        raise AssertionError("the folder was listed again")

    dups.write_text("# same entries, new comment\nimg_01.png  # b\nimg_00.png\n")
    with monkeypatch.context() as m:  # only the entries count, and each list keeps its own cached index
        m.setattr(os, "scandir", no_listing)
        assert ImageFolderSource(root, exclude=dups).spec.images_per_class == {0: 4, 1: 3, 2: 7}
        assert ImageFolderSource(root, exclude=["img_00.png"]).spec.images_per_class == {0: 5, 1: 4, 2: 7}
        assert ImageFolderSource(root).spec.images_per_class == {0: 6, 1: 5, 2: 7}


def test_exclude_unmatched_entries_warn_once(folder, caplog):
    root, _ = folder
    entries = ["img_02.png", "ghost.png", "kiwi/img_00.png  # no such class"]  # cherry's are .jpg
    with caplog.at_level(logging.INFO, logger="episodes.readers"):
        src = ImageFolderSource(root, exclude=entries)
        ImageFolderSource(root, exclude=entries)  # from the cache: nothing logged again
    assert src.excluded == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    counts = [r for r in caplog.records if "excluded 2 file(s)" in r.getMessage()]
    assert len(warnings) == 1 and len(counts) == 1
    assert "2 of 3 exclusion entries" in warnings[0].getMessage()
    assert "ghost.png" in warnings[0].getMessage() and "kiwi/img_00.png" in warnings[0].getMessage()


def test_exclude_errors(folder, tmp_path):
    root, _ = folder
    with pytest.raises(FolderSourceError, match=r"Exclusion list .*missing.txt cannot be read"):
        ImageFolderSource(root, exclude=tmp_path / "missing.txt")
    with pytest.raises(FolderSourceError, match=r"excludes every image of class folder .*banana"):
        ImageFolderSource(root, exclude=[f"banana/img_{i:02d}.png" for i in range(5)])


def test_index_names_stay_importable_from_folder():
    from episodes.readers import folder, folder_index

    for name in ("FolderSourceError", "IMAGE_EXTENSIONS", "INDEX_VERSION", "index_path", "write_index"):
        assert getattr(folder, name) is getattr(folder_index, name)


# -- errors --------------------------------------------------------------------------------------
def test_error_root_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderSourceError, match="empty has no class sub-folders with images"):
        ImageFolderSource(tmp_path / "empty")
    with pytest.raises(FolderSourceError, match="data.root"):
        SOURCES.get("folder")(root=None)


def test_error_class_folder_without_images(folder):
    root, _ = folder
    (root / "durian").mkdir()
    (root / "durian" / "readme.md").write_text("no pictures")
    with pytest.raises(FolderSourceError, match=r"Class folder .*durian has no images"):
        ImageFolderSource(root)


def test_error_labels_csv(tmp_path):
    root = tmp_path / "ma"
    write_meta_album(root, META_ROWS[:4])
    (root / "labels.csv").write_text("FILE_NAME,LABEL\napple_0.png,apple\n")
    with pytest.raises(FolderSourceError, match="labels.csv has no CATEGORY column"):
        ImageFolderSource(root)
    (root / "labels.csv").write_text("FILE_NAME,CATEGORY\napple_0.png,apple\nghost.png,apple\n")
    with pytest.raises(FolderSourceError, match=r"names 1 file\(s\) missing .* \(first: ghost.png\)"):
        ImageFolderSource(root)


def test_error_splits(tmp_path):
    root = tmp_path / "ma"
    write_meta_album(root, META_ROWS)
    with pytest.raises(FolderSourceError, match='class "banana" is in no split'):
        ImageFolderSource(root, splits={"train": ["apple", "cherry", "date", "elder", "fig"]})
    with pytest.raises(FolderSourceError, match='names class "kiwi"'):
        ImageFolderSource(root, splits={"test": [*COUNTS, "kiwi"]})
    with pytest.raises(FolderSourceError, match='super-category "red" spans two splits'):
        ImageFolderSource(root, superclasses=True, splits={"train": ["apple"], "test": list(COUNTS)[1:]})


def test_error_corrupt_image_names_the_file(folder):
    root, _ = folder
    (root / "banana" / "img_02.png").write_bytes(b"\x89PNG not really")
    src = ImageFolderSource(root)
    index = next(i for i in range(5) if src.path_of(1, i).name == "img_02.png")
    with pytest.raises(FolderSourceError, match=r"Image .*banana/img_02.png cannot be decoded"):
        src.read(1, [index])


def test_error_mixed_sizes_without_image_size(folder):
    root, _ = folder
    Image.fromarray(make_image(COLOURS["apple"], 1, size=(16, 12))).save(root / "apple" / "img_00.png")
    src = ImageFolderSource(root, image_size=None)
    with pytest.raises(FolderSourceError, match="pass image_size=N"):
        src.read(0, range(6))
    assert ImageFolderSource(root, image_size=12).read(0, range(6)).shape == (6, 12, 12, 3)


# -- registry and named sources ------------------------------------------------------------------
def test_named_sources(tmp_path):
    assert {"folder", *NAMED_FOLDERS} <= set(SOURCES.names())
    write_class_folders(tmp_path / "eurosat", {"apple": 3, "banana": 4})
    src = SOURCES.get("eurosat")(root=tmp_path)
    assert src.name == "eurosat" and src.domain == "ood" and src.spec.num_classes == 2
    with pytest.raises(FileNotFoundError, match=re.escape(f"expects its images in {tmp_path / 'sketch'}")):
        SOURCES.get("sketch")(root=tmp_path)
    with pytest.raises(FolderSourceError, match=r"set data.root=DIR .* DIR/food101/"):
        SOURCES.get("food101")()
    assert SOURCES.get("chestx").__doc__.startswith("ChestX-ray14")


# -- episodes ------------------------------------------------------------------------------------
def test_episode_set_from_folder(tmp_path):
    root = tmp_path / "six"
    write_class_folders(root, COUNTS)
    src = pickle.loads(pickle.dumps(ImageFolderSource(root, image_size=None)))  # as DataLoader workers get it
    cfg = SamplerConfig(mode="fixed", way=5, shot=2, query=2)
    episodes = EpisodeSet([src], "test", cfg, n_episodes=3, seed=7, image_size=20)
    again = EpisodeSet([ImageFolderSource(root, image_size=None)], "test", cfg, n_episodes=3, seed=7, image_size=20)
    names = sorted(COUNTS)
    for k in range(len(episodes)):
        ep = episodes[k]
        assert ep.support_x.shape == (10, 3, 20, 20) and ep.query_x.shape == (10, 3, 20, 20)
        assert ep.way == 5 and ep.shots == [2] * 5 and sorted(set(ep.query_y.tolist())) == list(range(5))
        assert ep.episode_id == again[k].episode_id and ep.split is Split.TEST
        for x, y in zip(ep.support_x, ep.support_y):  # the corner pixel shows the class colour
            assert tuple(x[:, -1, 0].tolist()) == COLOURS[names[ep.class_ids[int(y)]]]
    variable = EpisodeSet([src], "test", SamplerConfig(), n_episodes=2, seed=1)
    assert variable[1].way >= 5 and variable[1].support_x.shape[-2:] == (12, 12)
