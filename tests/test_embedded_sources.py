"""Embedded offline sources: rendered Noto glyphs, scikit-learn digits, MNIST and Fashion-MNIST."""

from __future__ import annotations

import gzip
import logging
import pickle
import shutil
import time

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from episodes.readers import SOURCES, Source, glyphs
from episodes.readers.embedded import NotoGlyphs, SklearnDigits
from episodes.readers.mnist import MNIST, FashionMNIST, IdxTestSet, read_idx
from episodes.registry import RegistryError
from episodes.split import Split

SMALL = dict(scripts=["latin", "telugu", "greek"], instances=6)


@pytest.fixture(scope="module")
def noto_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("noto-cache")


@pytest.fixture(scope="module")
def noto(noto_cache):
    return NotoGlyphs(cache=noto_cache, **SMALL)


@pytest.fixture(scope="module")
def digits():
    return SklearnDigits()


def test_registry_lists_embedded_sources():
    assert {"noto", "digits"} <= set(SOURCES.names())
    assert SOURCES.get("noto") is NotoGlyphs
    with pytest.raises(RegistryError, match='Did you mean "noto"'):
        SOURCES.get("noot")


def test_noto_shapes_and_read_order(noto):
    assert isinstance(noto, Source) and noto.domain == "id" and noto.native_size == (84, 84)
    x = noto.read(3, [5, 0, 2])
    assert x.shape == (3, 84, 84, 3) and x.dtype == np.uint8
    assert np.array_equal(x[::-1], noto.read(3, [2, 0, 5]))
    assert np.array_equal(x[..., 0], x[..., 2])  # black on white, stored as 3 equal channels
    with pytest.raises(IndexError, match="has 6 images"):
        noto.read(0, [6])


def test_noto_spec_splits_by_script(noto):
    spec = noto.spec
    assert spec.superclasses_per_split == {Split.TRAIN: 1, Split.VALID: 1, Split.TEST: 1}
    names = [spec.class_name(c) for c in range(spec.num_classes)]
    assert all(names[c].startswith("latin/") for c in spec.class_ids(Split.TRAIN))
    assert all(names[c].startswith("telugu/") for c in spec.class_ids(Split.VALID))
    assert all(names[c].startswith("greek/") for c in spec.class_ids(Split.TEST))
    assert "latin/LATIN CAPITAL LETTER A" in names and "greek/GREEK SMALL LETTER ALPHA" in names
    assert "greek/GREEK CAPITAL LETTER ALPHA" not in names  # a homoglyph of Latin A: dropped
    assert all(n == 6 for n in spec.images_per_class.values())


def test_noto_images_have_ink_and_classes_differ(noto):
    spec = noto.spec
    means = []
    for c in range(spec.num_classes):
        x = noto.read(c, range(6))[..., 0].astype(np.float32)
        assert (x.reshape(6, -1).min(1) < 100).all(), spec.class_name(c)  # every image has a glyph
        assert (x.reshape(6, -1).mean(1) > 150).all(), spec.class_name(c)  # on a white page
        means.append(x.mean(0))
    means = np.stack(means)
    o, big_o = (spec.class_name(c) for c in (40, 14))
    assert o.endswith("SMALL LETTER O") and big_o.endswith("CAPITAL LETTER O")
    assert (255 - means[40]).sum() < 0.8 * (255 - means[14]).sum()  # size survives: 'o' has less ink
    flat = means.reshape(len(means), -1)
    diff = cdist(flat, flat, "cityblock") / flat.shape[1]  # mean absolute pixel difference
    assert diff[~np.eye(len(means), dtype=bool)].min() > 1.0


def test_noto_is_deterministic_and_cached(noto, noto_cache, tmp_path, monkeypatch):
    again = NotoGlyphs(cache=tmp_path, **SMALL)  # rendered from scratch in another cache
    assert again.classes == noto.classes
    for c in (0, 50, noto.spec.num_classes - 1):
        assert np.array_equal(again.read(c, range(6)), noto.read(c, range(6)))

    def no_render(*args, **kwargs):
        raise AssertionError("rendered although the cache holds the glyphs")

    monkeypatch.setattr(glyphs, "render_all", no_render)
    start = time.perf_counter()
    cached = NotoGlyphs(cache=noto_cache, **SMALL)
    assert time.perf_counter() - start < 0.5
    assert np.array_equal(cached.read(7, [1, 2]), noto.read(7, [1, 2]))
    clone = pickle.loads(pickle.dumps(cached))  # what a spawned worker receives: no pixels
    assert len(pickle.dumps(cached)) < 200_000
    assert np.array_equal(clone.read(7, [1, 2]), noto.read(7, [1, 2]))


def test_noto_rerenders_a_damaged_cache(noto, tmp_path, caplog):
    small = dict(scripts=["latin"], instances=2)
    first = NotoGlyphs(cache=tmp_path, **small)
    npy = next(tmp_path.glob("noto-*.npy"))
    npy.write_bytes(b"not an array")
    with caplog.at_level(logging.WARNING):
        second = NotoGlyphs(cache=tmp_path, **small)
    assert "rendering again" in caplog.text
    assert np.array_equal(first.read(0, [0, 1]), second.read(0, [0, 1]))
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_noto_full_default(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="episodes.readers.embedded"):
        full = SOURCES.get("noto")()
    assert "rendered" in caplog.text and list((tmp_path / "embedded").glob("noto-*.npy"))
    spec = full.spec
    assert len(spec.classes_per_superclass) == 9 and 600 <= spec.num_classes <= 800
    assert spec.superclasses_per_split == {Split.TRAIN: 5, Split.VALID: 1, Split.TEST: 3}
    assert all(spec.classes_per_split[s] >= 50 for s in Split)
    assert all(n >= 30 for n in spec.classes_per_superclass.values())
    assert all(n == 20 for n in spec.images_per_class.values())
    x = full.read(spec.num_classes - 1, range(20))
    assert x.shape == (20, 84, 84, 3) and (x.reshape(20, -1).min(1) < 100).all()


def test_digits(digits):
    spec = digits.spec
    assert digits.domain == "ood" and digits.native_size == (84, 84)
    assert spec.class_ids(Split.TEST) == list(range(10)) and spec.class_ids(Split.TRAIN) == []
    assert sum(spec.images_per_class.values()) == 1797
    x = digits.read(3, [0, 1, 2])
    assert x.shape == (3, 84, 84, 3) and x.dtype == np.uint8 and x.max() >= 250
    assert np.array_equal(x, SklearnDigits().read(3, [0, 1, 2]))  # fixed within-class order
    means = np.stack([digits.read(c, range(50))[..., 0].mean(0) for c in range(10)])
    assert np.abs(means[:, None] - means[None]).mean((2, 3))[~np.eye(10, dtype=bool)].min() > 3.0


# -- MNIST and Fashion-MNIST (CNAPs' extra-dataset convention) -----------------------------------
def _installed(cls: type[IdxTestSet]) -> bool:
    try:
        cls.locate()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _installed(MNIST), reason="MNIST's idx files are missing from episodes/data/mnist")
needs_fashion = pytest.mark.skipif(not _installed(FashionMNIST), reason="Debian's dataset-fashion-mnist "
                                   "is not installed")
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def idx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("idx-cache")


@pytest.fixture(scope="module")
def mnist(idx_cache):
    return MNIST(cache=idx_cache)


def check_idx_source(src: IdxTestSet, counts: list[int]) -> None:
    spec = src.spec
    assert src.domain == "ood" and src.native_size == (84, 84)
    assert spec.class_ids(Split.TEST) == list(range(10)) and spec.class_ids(Split.TRAIN) == []
    assert [spec.images_per_class[c] for c in range(10)] == counts
    x = src.read(7, [0, 5, 1])
    assert x.shape == (3, 84, 84, 3) and x.dtype == np.uint8 and np.array_equal(x[..., 0], x[..., 1])
    assert np.array_equal(x[[0, 2]], src.read(7, [0, 1]))
    low = x[..., 0].reshape(3, 28, 3, 28, 3).mean((2, 4))  # 3x upsampled: pooling gives a 28 px image back
    assert (low < 30).mean() > 0.4 and low.max() > 150  # light object on a dark page
    means = np.stack([src.read(c, range(100))[..., 0].astype(np.float32).mean(0) for c in range(10)])
    assert np.abs(means[:, None] - means[None]).mean((2, 3))[~np.eye(10, dtype=bool)].min() > 2.0
    with pytest.raises(IndexError, match=f"has {counts[0]} images"):
        src.read(0, [counts[0]])


@needs_mnist
def test_mnist(mnist, idx_cache, monkeypatch):
    check_idx_source(mnist, MNIST_TEST_COUNTS)
    assert SOURCES.get("mnist") is MNIST and mnist.spec.class_name(3) == "3"
    monkeypatch.setattr(MNIST, "_decode", lambda *a: pytest.fail("decoded although the cache holds the images"))
    start = time.perf_counter()
    cached = MNIST(cache=idx_cache)
    assert time.perf_counter() - start < 0.5
    assert np.array_equal(cached.read(4, range(20)), mnist.read(4, range(20)))
    assert len(pickle.dumps(cached)) < 10_000  # workers reopen the memory map
    assert np.array_equal(pickle.loads(pickle.dumps(cached)).read(9, [3]), mnist.read(9, [3]))


@needs_mnist
def test_mnist_redecodes_a_damaged_cache(mnist, idx_cache, tmp_path, caplog):
    for f in idx_cache.glob("mnist-*"):
        shutil.copy(f, tmp_path / f.name)
    next(tmp_path.glob("mnist-*.npy")).write_bytes(b"not an array")
    with caplog.at_level(logging.WARNING):
        again = MNIST(cache=tmp_path)
    assert "decoding again" in caplog.text and np.array_equal(again.read(2, [0, 1]), mnist.read(2, [0, 1]))
    assert not list(tmp_path.glob(".*.tmp"))


@needs_fashion
def test_fashion_mnist(tmp_path):
    fashion = SOURCES.get("fashion_mnist")(cache=tmp_path)
    assert isinstance(fashion, FashionMNIST) and fashion.spec.class_name(9) == "Ankle boot"
    check_idx_source(fashion, [1000] * 10)


def test_idx_sources_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "default_root", classmethod(lambda cls: None))
    with pytest.raises(FileNotFoundError, match=r"mnist: its data is not installed; they ship with metabench in "
                       r"episodes/data/mnist: reinstall it with `pip install -e \.`"):
        MNIST()
    monkeypatch.setattr(FashionMNIST, "default_root", classmethod(lambda cls: None))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} lacks t10k-images-idx3-ubyte.gz"):
        MNIST(root=str(tmp_path))


def test_read_idx_checks_the_header(tmp_path):
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="bad: not an unsigned-byte idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"holds 2 bytes of data but its header says \(5,\)"):
        read_idx(tmp_path / "short")


def test_each_noto_script_is_a_source_with_held_out_classes():
    """Per-script sources (the SMAT CPU study's domains): a training script splits its classes, others are OOD."""
    from episodes.readers.embedded import SCRIPT_CLASS_SPLIT, NotoScript

    latin, again, greek = SOURCES.get("noto_latin")(), NotoScript(script="latin"), SOURCES.get("noto_greek")()
    full = latin.glyphs
    n_latin = sum(1 for s, _ in full.classes if s == "latin")
    counts = latin.spec.classes_per_split
    assert latin.domain == "id" and sum(counts.values()) == n_latin
    assert counts[Split.TRAIN] == round(SCRIPT_CLASS_SPLIT[0] * n_latin) and counts[Split.TEST] >= 5
    names = {split: {latin.spec.class_names[c] for c in latin.spec.class_ids(split)} for split in Split}
    assert not (names[Split.TRAIN] & names[Split.TEST]) and not (names[Split.VALID] & names[Split.TEST])
    assert all(n.startswith("latin") for n in names[Split.TRAIN])
    assert again.spec.class_names == latin.spec.class_names  # the split is seeded
    test_class = latin.spec.class_ids(Split.TEST)[0]
    assert np.array_equal(latin.read(test_class, [0, 3]), full.read(latin._classes[test_class], [0, 3]))
    assert greek.domain == "ood" and greek.spec.classes_per_split[Split.TEST] == greek.spec.num_classes
    with pytest.raises(ValueError, match="unknown script"):
        NotoScript(script="klingon")
