"""Packed HDF5 cache: convert, read back identical arrays, atomic writes, workers, clear errors."""

from __future__ import annotations

import os
from collections.abc import Sequence

import h5py
import numpy as np
import pytest
import torch
from helpers_md import class_image, write_md_source, write_omniglot_like

from episodes.convert import convert_named, convert_source
from episodes.loader import EpisodeSet, make_loader
from episodes.readers import SOURCES
from episodes.readers.base import Source
from episodes.readers.embedded import SklearnDigits
from episodes.readers.hdf5 import PackedHDF5, PackedHDF5Error
from episodes.readers.tfrecord import MetaDatasetTFRecords
from episodes.spec import DatasetSpec
from episodes.split import Split


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("md")
    write_md_source(root / "toy")
    write_omniglot_like(root / "omniglot")
    return root


@pytest.fixture(scope="module")
def toy(root):
    return MetaDatasetTFRecords(root / "toy", image_size=32)


@pytest.fixture(scope="module")
def digits():
    return SklearnDigits()


def assert_same_images(a: Source, b: Source) -> None:
    assert a.spec.to_dict() == b.spec.to_dict() and a.native_size == b.native_size
    for c in range(a.spec.num_classes):
        n = a.spec.images_per_class[c]
        np.testing.assert_array_equal(a.read(c, range(n)), b.read(c, range(n)))
        idx = [n - 1, 0, 2, 2, 1]  # unsorted, repeated, with a run
        np.testing.assert_array_equal(a.read(c, idx), b.read(c, idx))


@pytest.mark.parametrize("store", ["uint8", "encoded"])
def test_convert_tfrecords_and_read_back(toy, tmp_path, store):
    packed = PackedHDF5(convert_source(toy, tmp_path / "toy.h5", store=store, progress=False))
    assert (packed.name, packed.domain, packed.store) == ("toy", "ood", store)
    assert_same_images(toy, packed)


@pytest.mark.parametrize("store", ["uint8", "encoded"])
def test_convert_embedded_digits(digits, tmp_path, store):
    packed = PackedHDF5(convert_source(digits, tmp_path / "digits.h5", store=store, progress=False))
    assert_same_images(digits, packed)
    with h5py.File(packed.path) as f:
        if store == "uint8":  # greyscale: one channel on disk, one image per chunk
            assert f["images"].shape == (1797, 84, 84, 1) and f["images"].chunks == (1, 84, 84, 1)
        np.testing.assert_array_equal(f["offsets"][:], np.concatenate([[0], np.cumsum(
            [digits.spec.images_per_class[c] for c in range(10)])]))
        assert f.attrs["source"] == "digits" and DatasetSpec.from_dict(__import__("json").loads(f.attrs["spec"]))


class _Arrays(Source):
    """A tiny in-memory source: class 0 grey, later classes colour (exercises widening)."""

    name, domain = "arrays", "id"

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.images = [[class_image(c, i, (16, 16), grey=(c == 0)) for i in range(5)] for c in range(4)]
        self.spec = DatasetSpec("arrays", {Split.TRAIN: 4}, {c: 5 for c in range(4)})

    @property
    def native_size(self) -> tuple[int, int]:
        return (16, 16)

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        if class_id == self.fail_at:
            raise RuntimeError("simulated failure")
        return np.stack([self.images[class_id][i] for i in self._check_read(class_id, indices)])


def test_grey_then_colour_widens_and_resizes(tmp_path):
    source = _Arrays()
    packed = PackedHDF5(convert_source(source, tmp_path / "a.h5", progress=False, compression="lzf"))
    assert_same_images(source, packed)
    small = PackedHDF5(convert_source(source, tmp_path / "b.h5", image_size=8, progress=False))
    assert small.native_size == (8, 8) and small.read(3, [0]).shape == (1, 8, 8, 3)


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="simulated"):
        convert_source(_Arrays(fail_at=2), tmp_path / "x.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dataloader_workers_give_the_same_episodes(root, tmp_path):
    omni = SOURCES.get("omniglot")(root=str(root), format="tfrecord", image_size=28)
    packed = PackedHDF5(convert_source(omni, tmp_path / "omniglot.h5", progress=False))
    packed.read(0, [0])  # the parent holds an open handle when the workers fork
    es = EpisodeSet([packed], Split.TRAIN, n_episodes=4, seed=7)
    serial, parallel = list(make_loader(es, num_workers=0)), list(make_loader(es, num_workers=2))
    from_records = list(make_loader(EpisodeSet([omni], Split.TRAIN, n_episodes=4, seed=7), num_workers=0))
    for a, b, c in zip(serial, parallel, from_records):
        assert a.episode_id == b.episode_id == c.episode_id
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert torch.equal(a.support_x, c.support_x) and torch.equal(a.query_y, c.query_y)


def test_corrupt_or_foreign_file_gives_one_clear_error(toy, tmp_path):
    path = convert_source(toy, tmp_path / "toy.h5", progress=False)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedHDF5Error, match=rf"{truncated} is not a readable metabench packed source.*convert"):
        PackedHDF5(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(PackedHDF5Error, match=rf"{garbage} is not a readable"):
        PackedHDF5(garbage)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(PackedHDF5Error, match="not a metabench packed source"):
        PackedHDF5(tmp_path / "foreign.h5")
    with pytest.raises(FileNotFoundError, match="metabench data convert"):
        PackedHDF5(tmp_path / "missing.h5")


def test_open_files_stay_constant(toy, tmp_path):
    packed = PackedHDF5(convert_source(toy, tmp_path / "toy.h5", progress=False))
    packed.read(0, [0])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        for c in range(toy.spec.num_classes):
            packed.read(c, [1, 0])
            toy.read(c, [1])
    assert len(os.listdir("/proc/self/fd")) == before


def test_convert_generic_md_folder_at_a_size_matches_a_direct_read(root, tmp_path):
    out = convert_named("md_tfrecords", str(root), out=tmp_path / "toy.h5", image_size=24, progress=False, path="toy")
    assert_same_images(MetaDatasetTFRecords(root / "toy", image_size=24), PackedHDF5(out, name="toy"))


def test_named_sources_prefer_a_matching_cache(root, tmp_path):
    assert isinstance(SOURCES.get("omniglot")(root=str(root)), MetaDatasetTFRecords)
    out = convert_named("omniglot", str(root), image_size=28, progress=False)
    assert out == root / "omniglot.h5"
    cached = SOURCES.get("omniglot")(root=str(root))
    assert isinstance(cached, PackedHDF5) and cached.name == "omniglot" and cached.domain == "id"
    assert isinstance(SOURCES.get("omniglot")(root=str(root), format="tfrecord"), MetaDatasetTFRecords)
    assert isinstance(SOURCES.get("omniglot")(root=str(root), image_size=28), PackedHDF5)
    assert isinstance(SOURCES.get("omniglot")(root=str(root), image_size=64), MetaDatasetTFRecords)  # other size
    by_path = SOURCES.get("h5")(root=str(root), path="omniglot.h5")
    assert by_path.native_size == (28, 28)
    assert SOURCES.get("h5")(root=str(root), name="omniglot").spec == cached.spec
    # A stale cache (classes differ from the records) is ignored.
    digits_h5 = convert_named("digits", None, out=tmp_path, progress=False)
    assert digits_h5 == tmp_path / "digits.h5"
    os.replace(digits_h5, root / "omniglot.h5")
    assert isinstance(SOURCES.get("omniglot")(root=str(root)), MetaDatasetTFRecords)
    (root / "omniglot.h5").unlink()
