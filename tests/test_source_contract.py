"""The contract every source keeps, checked on every registered source that runs offline and on generated data of
each reader kind: spec and pixels agree, reads are deterministic and order-preserving, bad requests are one
sentence, the spec survives a JSON round trip, and a pickled copy (a loader worker) reads the same pixels."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers_md import write_md_source, write_omniglot_like

from episodes.convert import convert_source
from episodes.readers import SOURCES
from episodes.readers.base import Source
from episodes.readers.folder import ImageFolderSource
from episodes.readers.hdf5 import PackedHDF5
from episodes.readers.mnist import FashionMNIST
from episodes.readers.tfrecord import MetaDatasetTFRecords
from episodes.spec import DatasetSpec

OFFLINE = ["noto", "digits", "mnist", *(n for n in SOURCES.names() if n.startswith("noto_"))]


def _fashion_installed() -> bool:
    try:
        FashionMNIST.locate()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Callable[[], Source]]:
    """One source of each reader kind, on data generated here."""
    root = tmp_path_factory.mktemp("contract")
    write_md_source(root / "toy")
    write_omniglot_like(root / "omniglot")
    from test_configured_sources import write_nested

    write_nested(root / "nested")
    records = MetaDatasetTFRecords(root / "toy", image_size=24)
    h5 = convert_source(records, root / "toy.h5", progress=False)
    return {
        "md_tfrecords": lambda: records,
        "omniglot (records)": lambda: SOURCES.get("omniglot")(root=str(root), image_size=28),
        "h5": lambda: PackedHDF5(h5),
        "folder (nested)": lambda: ImageFolderSource(root / "nested", image_size=16),
    }


def check_contract(source: Source) -> None:
    spec = source.spec
    assert spec.num_classes > 0 and source.domain in ("id", "ood") and source.name
    assert DatasetSpec.from_json(json.loads(spec.to_json())).to_dict() == spec.to_dict()
    height, width = source.native_size
    for class_id in sorted({0, spec.num_classes // 2, spec.num_classes - 1}):
        n = spec.images_per_class[class_id]
        idx = [n - 1, 0, min(1, n - 1), min(1, n - 1)]  # unsorted, repeated
        images = source.read(class_id, idx)
        assert images.dtype == np.uint8 and images.shape == (len(idx), height, width, 3)
        np.testing.assert_array_equal(images, source.read(class_id, idx))  # deterministic
        np.testing.assert_array_equal(images[1], source.read(class_id, [0])[0])  # order kept
        assert source.read(class_id, []).shape[0] == 0
        with pytest.raises(IndexError, match="out of range"):
            source.read(class_id, [n])
    with pytest.raises(IndexError, match="has no class"):
        source.read(spec.num_classes, [0])
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy.read(0, [0]), source.read(0, [0]))


@pytest.mark.parametrize("name", OFFLINE)
def test_registered_offline_sources_keep_the_contract(name: str) -> None:
    check_contract(SOURCES.get(name)())


@pytest.mark.skipif(not _fashion_installed(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_keeps_the_contract() -> None:
    check_contract(SOURCES.get("fashion_mnist")())


@pytest.mark.parametrize("kind", ["md_tfrecords", "omniglot (records)", "h5", "folder (nested)"])
def test_every_reader_kind_keeps_the_contract(kind: str, generated: dict[str, Callable[[], Source]]) -> None:
    check_contract(generated[kind]())


def test_the_offline_list_covers_the_registry_sources_that_need_no_data(tmp_path: Path) -> None:
    """A new embedded source joins the contract test: everything that opens without a root is in OFFLINE."""
    opens = []
    for name in SOURCES.names():
        try:
            SOURCES.get(name)(root=None)
        except (FileNotFoundError, ValueError, ImportError, TypeError):
            continue
        opens.append(name)
    assert set(opens) - {"fashion_mnist"} <= set(OFFLINE)
