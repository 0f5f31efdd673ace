"""Hostile and broken data through the real command line: missing roots, small classes, damaged files.

Every case ends with exit code 2 (130 for Ctrl-C), one stderr line that names the file, source or key
and says what to do, and no half-written run folder: a folder created before the problem showed up is
removed when it holds nothing but its config and manifest, and kept, marked "failed" or "interrupted",
when it holds results worth resuming. Unit-level messages are tested beside each reader
(test_tfrecord, test_hdf5, test_folder_source); here the whole command is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers_hostile import FAST, TRAIN, _fails, _md, _toy
from helpers_md import MDSource, encode, example_bytes, write_md_source, write_tfrecord
from PIL import Image

# --------------------------------------------------------------------------- data root missing or empty


@pytest.mark.parametrize(
    ("source", "root", "message"),
    [
        ("omniglot", "nowhere", r"Meta-Dataset folder .*nowhere does not exist; set data\.root"),
        ("omniglot", "empty", r"empty/omniglot/dataset_spec\.json does not exist; point the source"),
        ("md_tfrecords", "empty", r"empty/dataset_spec\.json does not exist"),
        ("folder", "empty", r"Folder .*empty has no class sub-folders with images; put the images in"),
        ("folder", "nowhere", r"nowhere does not exist"),
        ("omniglot", None, r'"omniglot" needs data\.root=\.\.\. pointing at the Meta-Dataset records'),
    ],
)
def test_data_root_missing_or_empty(source: str, root: str | None, message: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    where = [f"data.root={tmp_path / root}"] if root else []
    _fails(["run", *FAST, f"data.eval_sources=[{source}]", *where], tmp_path / "runs", capsys, message)


# --------------------------------------------------------------------------- too few images or classes


def test_class_with_fewer_images_than_a_fixed_episode_needs(tmp_path: Path, capsys) -> None:
    src = _toy(tmp_path / "toy")
    _fails(["run", *FAST, *_md(src), "data.sampler.mode=fixed"], tmp_path / "runs", capsys,
           r'Source "toy" split test class \d+ \("class_\d+"\) has \d+ images, fewer than the 20 that 5-shot '
           r"15-query episodes need; lower shot/query or drop this class")


def test_class_with_a_single_image(tmp_path: Path, capsys) -> None:
    root = _image_folder(tmp_path / "imgs", {"c0": 4, "c1": 4, "c2": 4, "c3": 4, "c4": 1})
    _fails(["run", *FAST, "data.eval_sources=[folder]", f"data.root={root}"], tmp_path / "runs", capsys,
           r'class \d+ \("c4"\) has 1 images, fewer than the 2 that every episode needs .*add images or drop')


def test_split_with_fewer_classes_than_ways(tmp_path: Path, capsys) -> None:
    src = write_md_source(tmp_path / "toy", name="toy", classes_per_split=(6, 3, 3))
    _fails(["run", *FAST, *_md(src)], tmp_path / "runs", capsys,
           r'Source "toy" split test has 3 classes, fewer than the 5 ways an episode needs; .*lower min_ways')


def test_too_few_training_images_fail_before_training(tmp_path: Path, capsys) -> None:
    src = _toy(tmp_path / "toy")
    _fails(["run", *FAST, "--learner", "pmf", *_md(src), *TRAIN, "data.train_sampler.shot=20"], tmp_path / "runs",
           capsys, r'Source "toy" split train class \d+ .* fewer than the 22 that 20-shot 2-query')


# --------------------------------------------------------------------------- corrupt or truncated files


def _flip_payloads(src: MDSource, class_id: int) -> None:
    data = bytearray(src.class_file(class_id).read_bytes())
    for offset in src.offsets[class_id]:
        data[offset + 12 + 5] ^= 0xFF  # a byte of the record's data (after the 8-byte length and its CRC)
    src.class_file(class_id).write_bytes(bytes(data))


def _truncate(src: MDSource, class_id: int) -> None:
    path = src.class_file(class_id)
    path.write_bytes(path.read_bytes()[:-30])


def _undecodable(src: MDSource, class_id: int) -> None:
    n = len(src.images[class_id])
    write_tfrecord(src.class_file(class_id), [example_bytes(b"GIF89a but not really", class_id)] * n)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, r"14\.tfrecords is truncated at byte \d+ .*; re-copy or re-convert the file"),
        (_flip_payloads, r"14\.tfrecords: CRC mismatch in the record at byte \d+; the file is corrupt"),
        (_undecodable, r"14\.tfrecords record \d+ holds an image that cannot be decoded \(not a known image "
                       r"format\); re-convert"),
    ],
    ids=["truncated", "crc", "undecodable"],
)
def test_corrupt_or_truncated_tfrecord(damage: Callable[[MDSource, int], None], message: str, tmp_path: Path,
                                       capsys) -> None:
    src = _toy(tmp_path / "toy")
    damage(src, 14)  # a test class: in every episode, so the first evaluation episode meets it
    _fails(["run", *FAST, *_md(src)], tmp_path / "runs", capsys, message)


def _h5_garbage(path: Path, src: MDSource) -> None:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))


def _h5_truncated(path: Path, src: MDSource) -> None:
    from episodes.convert import convert_source
    from episodes.readers.tfrecord import MetaDatasetTFRecords

    convert_source(MetaDatasetTFRecords(src.folder), path, progress=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _h5_foreign(path: Path, src: MDSource) -> None:
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((3, 4), np.uint8)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_h5_garbage, r"omniglot\.h5 is not a readable metabench packed source .*metabench data convert"),
        (_h5_truncated, r"omniglot\.h5 is not a readable metabench packed source .*truncated or corrupt"),
        (_h5_foreign, r"omniglot\.h5 is an HDF5 file but not a metabench packed source"),
    ],
    ids=["garbage", "truncated", "foreign"],
)
def test_corrupt_or_truncated_hdf5(damage: Callable[[Path, MDSource], None], message: str, tmp_path: Path,
                                   capsys) -> None:
    root = tmp_path / "md"
    root.mkdir()
    damage(root / "omniglot.h5", _toy(tmp_path / "toy"))  # the packed file alone: no records to fall back on
    _fails(["run", *FAST, "data.eval_sources=[omniglot]", f"data.root={root}"], tmp_path / "runs", capsys, message)


def _image_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16, 3), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("bad_bytes", "message"),
    [
        (lambda png: b"definitely not an image", r"c4/1\.png cannot be decoded \(not a known image format\); "
                                                 r"replace or delete it"),
        (lambda png: png[: len(png) // 2], r"c4/1\.png cannot be decoded \(.*\); replace or delete it"),
    ],
    ids=["garbage", "truncated"],
)
def test_corrupt_or_truncated_image_file(bad_bytes: Callable[[bytes], bytes], message: str, tmp_path: Path,
                                         capsys) -> None:
    root = _image_folder(tmp_path / "imgs", {"c0": 4, "c1": 4, "c2": 4, "c3": 4, "c4": 2})
    png = encode(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (root / "c4" / "1.png").write_bytes(bad_bytes(png))  # c4 has 2 images: every episode reads both
    _fails(["run", *FAST, "data.eval_sources=[folder]", f"data.root={root}"], tmp_path / "runs", capsys, message)


# --------------------------------------------------------------------------- dataset_spec.json vs the files


def _more_images(spec: dict) -> None:
    spec["images_per_class"]["12"] += 3


def _extra_class(spec: dict) -> None:
    spec["classes_per_split"]["Split.TEST"] += 1
    spec["images_per_class"]["15"] = 6


def _counts_disagree(spec: dict) -> None:
    spec["classes_per_split"]["Split.TEST"] += 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_more_images, r'class 12 \("class_012"\): dataset_spec\.json lists 14 images but .*12\.tfrecords holds 11 '
                       r"records; fix the spec or re-convert"),
        (_extra_class, r"15\.tfrecords \(class 15\) does not exist; the Meta-Dataset conversion is incomplete"),
        (_counts_disagree, r"dataset_spec\.json contradicts itself: .*adds up to 16 classes but images_per_class "
                           r"lists 15 .*Fix the spec"),
        (None, r"dataset_spec\.json: not valid JSON"),
    ],
    ids=["more-images", "extra-class", "split-counts", "not-json"],
)
def test_dataset_spec_disagrees_with_the_files(edit: Callable[[dict], None] | None, message: str, tmp_path: Path,
                                               capsys) -> None:
    src = _toy(tmp_path / "toy")
    spec_file = src.folder / "dataset_spec.json"
    if edit is None:
        spec_file.write_text("{not json")
    else:
        spec = json.loads(spec_file.read_text())
        edit(spec)
        spec_file.write_text(json.dumps(spec))
    _fails(["run", *FAST, *_md(src)], tmp_path / "runs", capsys, message)
