"""Meta-Dataset TFRecord reader: exact read-back, fixed order, index cache, and clear errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from helpers_md import encode, example_bytes, frame, write_md_source, write_omniglot_like, write_tfrecord

from episodes.loader import EpisodeSet
from episodes.readers import SOURCES, tfrecord_format
from episodes.readers import tfrecord as tfr
from episodes.readers.tfrecord import MetaDatasetTFRecords, TFRecordError
from episodes.spec import SpecError
from episodes.split import Split


@pytest.fixture()
def toy(tmp_path):
    return write_md_source(tmp_path / "toy")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("md")
    write_omniglot_like(root / "omniglot")
    write_md_source(root / "traffic_sign", name="traffic_sign", classes_per_split=(0, 0, 8), fmt="JPEG", size=None)
    return root


def _open(md, **kw):
    return MetaDatasetTFRecords(md.folder, image_size=32, **kw)


def test_reads_back_exact_images_in_a_fixed_shuffled_order(toy):
    reader = _open(toy)
    moved = 0
    for c, stored in enumerate(toy.images):
        order = reader.record_numbers(c)
        assert sorted(order) == list(range(len(stored)))
        moved += int((order != np.arange(len(stored))).any())
        got = reader.read(c, range(len(stored)))
        assert got.dtype == np.uint8 and got.shape == (len(stored), 32, 32, 3)
        for i, rec in enumerate(order):
            np.testing.assert_array_equal(got[i], stored[rec])
    assert moved >= len(toy.images) - 1  # shuffled (MD issue #54), not file order
    again = _open(toy)  # a second instance: the same order
    assert all((again.record_numbers(c) == reader.record_numbers(c)).all() for c in range(len(toy.images)))
    picked = reader.read(4, [3, 0, 3, 5])  # any order, repeats
    full = reader.read(4, range(len(toy.images[4])))
    np.testing.assert_array_equal(picked, full[[3, 0, 3, 5]])
    np.testing.assert_array_equal(_open(toy, shuffle=False).read(2, [0, 1])[1], toy.images[2][1])


def test_arbitrary_sizes_and_jpeg_are_resized_to_a_square(data_root):
    reader = MetaDatasetTFRecords(data_root / "traffic_sign", image_size=24)
    images = reader.read(0, range(reader.spec.images_per_class[0]))
    assert images.shape[1:] == (24, 24, 3) and reader.native_size == (24, 24)
    corner = images[:, 0, -1].astype(int)  # background colour of class 0 survives resizing and JPEG
    assert np.abs(corner - [230, 25, 75]).max() < 30


def test_index_is_cached_and_invalidated_per_file(toy, monkeypatch):
    first = _open(toy)
    assert first.scanned == list(range(12))
    monkeypatch.setattr(tfrecord_format, "scan_records", lambda *a: pytest.fail("rescanned an unchanged file"))
    assert _open(toy).scanned == []
    monkeypatch.undo()
    st = toy.class_file(5).stat()
    os.utime(toy.class_file(5), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _open(toy).scanned == [5]
    assert _open(toy).scanned == []


def test_index_falls_back_to_the_cache_dir_when_the_folder_is_not_writable(toy, tmp_path):
    (toy.folder / ".metabench-tfrecord-index.npz").mkdir()  # unwritable as a file, even for root
    fallback = tmp_path / "index-cache"
    assert _open(toy, index_dir=fallback).scanned == list(range(12))
    assert len(list(fallback.glob("*.npz"))) == 1
    assert _open(toy, index_dir=fallback).scanned == []


def test_crc_mismatch_names_file_and_offset(toy):
    c, rec = 3, 2
    path, offset = toy.class_file(c), toy.offsets[c][rec]
    data = bytearray(path.read_bytes())
    data[offset + 12 + 20] ^= 0xFF  # inside the Example payload
    path.write_bytes(bytes(data))
    reader = _open(toy)
    index = int(np.flatnonzero(reader.record_numbers(c) == rec)[0])
    with pytest.raises(TFRecordError, match=rf"{path}.*CRC mismatch.*byte {offset}\b"):
        reader.read(c, [index])
    reader.read(c, [(index + 1) % len(toy.images[c])])  # other records still read


def test_corrupt_length_crc_is_found_when_indexing(toy):
    path, offset = toy.class_file(1), toy.offsets[1][3]
    data = bytearray(path.read_bytes())
    data[offset + 9] ^= 0x01  # the length's CRC
    path.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match=rf"{path}.*byte {offset}\b"):
        _open(toy)


def test_truncated_file_names_file_and_offset(toy):
    path = toy.class_file(7)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(TFRecordError, match=rf"{path} is truncated at byte {toy.offsets[7][-1]}\b"):
        _open(toy)


def test_spec_disagreeing_with_records_names_class_file_and_counts(toy):
    spec = toy.spec
    spec["images_per_class"]["2"] += 1
    (toy.folder / "dataset_spec.json").write_text(__import__("json").dumps(spec))
    n = len(toy.images[2])
    with pytest.raises(SpecError, match=rf"class 2 .*lists {n + 1} images but .*2\.tfrecords holds {n} records"):
        _open(toy)


def test_undecodable_image_names_file_and_record(toy):
    payloads = [example_bytes(encode(img), 0) for img in toy.images[0]]
    payloads[4] = example_bytes(b"not an image at all", 0)
    write_tfrecord(toy.class_file(0), payloads)
    reader = _open(toy)
    index = int(np.flatnonzero(reader.record_numbers(0) == 4)[0])
    with pytest.raises(TFRecordError, match=rf"{toy.class_file(0)} record 4 .*cannot be decoded"):
        reader.read(0, [index])


def test_missing_root_spec_and_class_file(tmp_path, toy):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'} does not exist; set data.root"):
        MetaDatasetTFRecords(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"omniglot/dataset_spec.json does not exist"):
        MetaDatasetTFRecords(tmp_path, name="omniglot")
    toy.class_file(9).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{toy.class_file(9)} \(class 9\) does not exist"):
        _open(toy)
    with pytest.raises(ValueError, match=r'"omniglot" needs data.root=\.\.\. pointing at the Meta-Dataset records'):
        SOURCES.get("omniglot")()


def test_registered_md_sources(data_root):
    omni = SOURCES.get("omniglot")(root=str(data_root), image_size=28)
    assert omni.name == "omniglot" and omni.domain == "id" and omni.spec.has_superclasses
    traffic = SOURCES.get("traffic_sign")(root=str(data_root))
    assert traffic.domain == "ood" and traffic.native_size == (tfr.DEFAULT_IMAGE_SIZE,) * 2
    generic = SOURCES.get("md_tfrecords")(root=str(data_root), path="omniglot", name="omni2", domain="ood")
    assert generic.name == "omni2" and generic.domain == "ood"
    assert "mnist" not in tfr.MD_SOURCES
    for name in tfr.MD_SOURCES:
        assert name in SOURCES


def test_episodes_from_tfrecords(data_root):
    omni = SOURCES.get("omniglot")(root=str(data_root), image_size=28)
    episodes = EpisodeSet([omni], Split.TEST, n_episodes=3, seed=1, image_size=40)
    for i in range(3):
        ep, plan = episodes[i], episodes.describe(i)
        assert ep.support_x.shape[1:] == (3, 40, 40) and ep.support_x.dtype == torch.uint8
        alphabets = {next(s for s in omni.spec.superclass_ids("test") if c in omni.spec.classes_of_superclass(s))
                     for c in plan.class_ids}
        assert len(alphabets) == 1  # bilevel sampling: one alphabet per episode
    assert episodes[2].episode_id == EpisodeSet([omni], "test", n_episodes=3, seed=1)[2].episode_id


def test_open_files_stay_constant(data_root):
    omni = SOURCES.get("omniglot")(root=str(data_root), format="tfrecord", image_size=28)
    before = len(os.listdir("/proc/self/fd"))
    for c in range(omni.spec.num_classes):
        omni.read(c, [0, 1])
    assert len(os.listdir("/proc/self/fd")) == before


def test_bytes_framing_matches_the_public_spec(tmp_path):
    record = frame(b"hello")  # independent writer vs the reader's CRC
    assert len(record) == 8 + 4 + 5 + 4
    assert int.from_bytes(record[8:12], "little") == tfr.masked_crc32c(record[:8])
    assert int.from_bytes(record[-4:], "little") == tfr.masked_crc32c(b"hello")
    (tmp_path / "x.tfrecords").write_bytes(record * 3)
    assert tfr.scan_records(tmp_path / "x.tfrecords").tolist() == [0, 21, 42]
    shutil.rmtree(tmp_path)


def test_format_names_stay_importable_from_tfrecord():
    for name in ("TFRecordError", "decode_image", "masked_crc32c", "scan_records"):
        assert getattr(tfr, name) is getattr(tfrecord_format, name)
