"""tfds sources: tiny ArrayRecord datasets prepared here (no network, no TensorFlow), read by random access.

tfds' ``mock_data`` is not used: it fakes ``as_data_source`` but leaves builders unprepared
(no dataset_info.json, ``is_prepared()`` False), which is exactly what these sources check.
"""

from __future__ import annotations

import ast
import io
import pickle
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from episodes.episode import Split  # noqa: E402
from episodes.loader import EpisodeSet, make_loader  # noqa: E402
from episodes.readers import SOURCES  # noqa: E402
from episodes.readers.folder import within_class_order  # noqa: E402
from episodes.readers.tfds import TfdsSource, TfdsSourceError, import_tfds  # noqa: E402
from episodes.sampler import SamplerConfig  # noqa: E402

NAMES = ["red", "green", "blue", "grey", "pink", "teal"]
COUNTS = [9, 6, 7, 5, 6, 8]  # test records per class


def pixels(label: int, key: int, size: int = 8) -> np.ndarray:
    """Class in the red channel, record key in green: every record is recognisable."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 25 * label, key, 255 - key
    return img


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="png")
    return out.getvalue()


class TinyColours(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Six classes of flat colours; not registered, so it is found from its files like any prepared dataset."""

    name = "tiny_colours"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=NAMES),
        }))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(COUNTS), "train": self._generate_examples([1] * 6)}

    def _generate_examples(self, counts):
        keys = [(label, i) for label, n in enumerate(counts) for i in range(n)]
        for key, (label, _) in enumerate(keys):
            yield key, {"image": png(pixels(label, key)), "label": label}  # PNG bytes: encoding needs no TF


def prepare(builder) -> None:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    prepare(TinyColours(data_dir=str(root), file_format="array_record"))
    return root


@pytest.fixture(scope="module")
def source(data_dir):
    return TfdsSource("tiny_colours", data_dir=data_dir)


def raw(data_dir, record: int, split: str = "test") -> dict:
    return tfds.data_source("tiny_colours", split=split, data_dir=str(data_dir), download=False)[record]


def test_spec_all_classes_in_test(source, data_dir):
    spec = source.spec
    assert source.name == "tiny_colours" and source.domain == "ood" and source.native_size == (8, 8)
    assert spec.classes_per_split == {Split.TRAIN: 0, Split.VALID: 0, Split.TEST: 6}
    assert spec.images_per_class == dict(enumerate(COUNTS))
    assert [spec.class_name(c) for c in range(6)] == NAMES
    assert spec.path.startswith(str(data_dir))


def test_read_exact_records(source, data_dir):
    for class_id in (0, 4):
        images = source.read(class_id, range(COUNTS[class_id]))
        assert images.dtype == np.uint8 and images.shape == (COUNTS[class_id], 8, 8, 3)
        for i, img in enumerate(images):
            record = raw(data_dir, source.record_index(class_id, i))
            assert int(record["label"]) == class_id and np.array_equal(img, record["image"])
            assert img[0, 0, 0] == 25 * class_id
    assert np.array_equal(source.read(2, [3, 0]), source.read(2, [0, 3])[::-1])


def test_order_is_fixed_shuffle_of_record_order(source, data_dir):
    again = TfdsSource("tiny_colours", data_dir=data_dir)
    for class_id, n in enumerate(COUNTS):
        order = [source.record_index(class_id, i) for i in range(n)]
        assert order == [again.record_index(class_id, i) for i in range(n)]
        assert order == [sorted(order)[k] for k in within_class_order(str(class_id), n)]


def test_resize(data_dir):
    src = TfdsSource("tiny_colours", data_dir=data_dir, image_size=20)
    images = src.read(1, [0, 1])
    assert src.native_size == (20, 20) and images.shape == (2, 20, 20, 3)
    assert (images[..., 0] == 25).all()  # a flat colour stays exact


def test_label_index_is_cached(data_dir, monkeypatch):
    TfdsSource("tiny_colours", data_dir=data_dir)
    monkeypatch.setattr(TfdsSource, "_label", lambda *a: pytest.fail("labels were read again"))
    assert TfdsSource("tiny_colours", data_dir=data_dir).spec.images_per_class == dict(enumerate(COUNTS))


def test_other_split_and_source_name(data_dir):
    src = TfdsSource("tiny_colours", data_dir=data_dir, split="train", class_split="valid", source_name="tc")
    assert src.name == "tc" and src.spec.classes_per_split[Split.VALID] == 6
    assert src.spec.images_per_class == dict.fromkeys(range(6), 1)


def test_split_expression_spans_shards(data_dir):
    split = "train+test[2:]"  # two files, the second read from an offset
    src = TfdsSource("tiny_colours", data_dir=data_dir, split=split)
    assert sum(src.spec.images_per_class.values()) == 6 + sum(COUNTS) - 2
    for class_id in range(6):
        for i, img in enumerate(src.read(class_id, range(src.spec.images_per_class[class_id]))):
            assert np.array_equal(img, raw(data_dir, src.record_index(class_id, i), split)["image"])


def test_errors(data_dir, tmp_path):
    prepare_hint = r"not prepared in .*cifar10.*tfds build cifar10 --file_format=array_record"
    with pytest.raises(TfdsSourceError, match=prepare_hint):
        TfdsSource("cifar10", data_dir=tmp_path)
    with pytest.raises(TfdsSourceError, match='"no_such_set" is not known and not prepared'):
        TfdsSource("no_such_set", data_dir=tmp_path)
    with pytest.raises(TfdsSourceError, match='cannot read split "valid".*use one of test, train'):
        TfdsSource("tiny_colours", data_dir=data_dir, split="valid")
    with pytest.raises(TfdsSourceError, match='no feature "digit"'):
        TfdsSource("tiny_colours", data_dir=data_dir, label_key="digit")
    with pytest.raises(TfdsSourceError, match="local folders only"):
        TfdsSource("cifar10", data_dir="gs://tfds-data/datasets")
    with pytest.raises(TfdsSourceError, match="needs dataset=NAME"):
        SOURCES.get("tfds")(root=str(data_dir))


def test_unreadable_shard_is_one_sentence(tmp_path):
    prepare(TinyColours(data_dir=str(tmp_path), file_format="array_record"))
    src = TfdsSource("tiny_colours", data_dir=tmp_path)
    shutil.rmtree(tmp_path / "tiny_colours")
    fresh = pickle.loads(pickle.dumps(src))  # a new reader process, which must open the files again
    with pytest.raises(TfdsSourceError, match="Reading ArrayRecord shards failed .*prepare the dataset again"):
        fresh.read(0, [0])


def test_missing_extra_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'metabench\[tfds\]'"):
        import_tfds()


def test_reader_package_does_not_import_tfds():
    """Listing sources imports every reader module: none may import tensorflow_datasets at module level."""
    import episodes.readers
    import episodes.readers.tfds as module

    for path in (episodes.readers.__file__, module.__file__):
        tree = ast.parse(open(path, encoding="utf-8").read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("tensorflow")], path


def test_named_cifar10_factory(tmp_path):
    """The real CIFAR-10 builder, prepared from a few generated records instead of the download."""
    cifar_cls = type(tfds.builder("cifar10", data_dir=str(tmp_path)))

    class TinyCifar(cifar_cls, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {"test": self._records(30), "train": self._records(10)}

        def _records(self, n):
            for key in range(n):
                yield key, {"id": f"r{key}", "image": png(pixels(key % 10, key, size=32)), "label": key % 10}

    prepare(TinyCifar(data_dir=str(tmp_path), file_format="array_record"))
    src = SOURCES.get("cifar10")(root=str(tmp_path))
    assert src.name == "cifar10" and src.native_size == (32, 32)
    assert src.spec.classes_per_split[Split.TEST] == 10 and src.spec.images_per_class == dict.fromkeys(range(10), 3)
    assert (src.read(7, [0, 1, 2])[..., 0] == 25 * 7).all()
    assert {"tfds", "cifar10", "cifar100", "tfds_mnist"} <= set(SOURCES.names())


def test_episodes_same_with_workers(source, data_dir):
    """Forked DataLoader workers read safely even after array_record decoded in this process."""
    raw(data_dir, 0)  # tfds' own in-process reader: its state would crash readers in forked children
    assert np.array_equal(pickle.loads(pickle.dumps(source)).read(3, [1, 0]), source.read(3, [1, 0]))
    cfg = SamplerConfig(mode="fixed", way=5, shot=2, query=2)
    episodes = EpisodeSet([source], "test", cfg, n_episodes=2, seed=3, image_size=16)
    serial = [ep for ep in make_loader(episodes)]
    parallel = [ep for ep in make_loader(episodes, num_workers=2)]  # workers reopen the ArrayRecord files
    for a, b in zip(serial, parallel):
        assert a.episode_id == b.episode_id and np.array_equal(a.query_x.numpy(), b.query_x.numpy())
        assert a.support_x.shape == (10, 3, 16, 16) and a.way == 5
        for x, y in zip(a.support_x, a.support_y):
            assert int(x[0, 0, 0]) == 25 * a.class_ids[int(y)]
