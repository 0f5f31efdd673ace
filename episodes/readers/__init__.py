"""Readers: every data source behind one interface, found by name in ``SOURCES``.

Entries are factories ``(root: str | None = None, **options) -> Source``. They are registered
lazily so that listing sources imports no reader (and no font or TFRecord library).
"""

from __future__ import annotations

from collections.abc import Callable

from episodes.readers.base import Source, cache_dir
from episodes.registry import Registry

__all__ = ["SOURCES", "Source", "cache_dir"]

SOURCES: Registry[Callable[..., Source]] = Registry("source", entry_point_group="metabench.sources")

# Embedded sources: built from data that installs with the project, so they work offline.
SOURCES.register("noto", "episodes.readers.embedded:NotoGlyphs")
SOURCES.register("digits", "episodes.readers.embedded:SklearnDigits")
# Each Noto script as a domain of its own (multi-domain meta-training; the SMAT CPU study).
for _name in ("latin", "cyrillic", "arabic", "devanagari", "thai", "telugu", "greek", "khmer", "tamil"):
    SOURCES.register(f"noto_{_name}", f"episodes.readers.embedded:noto_{_name}")

# Meta-Dataset TFRecords (no TensorFlow) and the packed HDF5 cache; a named MD source reads
# <root>/<name>.h5 when it was converted, else the records in <root>/<name>/.
for _name in ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
              "traffic_sign", "mscoco"):
    SOURCES.register(_name, f"episodes.readers.tfrecord:{_name}")
del _name
SOURCES.register("md_tfrecords", "episodes.readers.tfrecord:md_tfrecords")
SOURCES.register("h5", "episodes.readers.hdf5:open_h5")

# Image folders users download themselves (out-of-distribution, every class in TEST by default).
SOURCES.register("folder", "episodes.readers.folder:ImageFolderSource")
for _name in ("sketch", "clipart", "food101", "pets", "cars", "cropdisease", "eurosat", "isic", "chestx"):
    SOURCES.register(_name, f"episodes.readers.folder:{_name}")

# tensorflow-datasets builders prepared locally as ArrayRecord (needs the optional "tfds" extra).
SOURCES.register("tfds", "episodes.readers.tfds:tfds")
for _name in ("cifar10", "cifar100", "tfds_mnist"):
    SOURCES.register(_name, f"episodes.readers.tfds:{_name}")
del _name

# Test-only out-of-distribution sources: MNIST's test set ships with metabench, Fashion-MNIST's with Debian's
# dataset-fashion-mnist.
SOURCES.register("mnist", "episodes.readers.mnist:MNIST")
SOURCES.register("fashion_mnist", "episodes.readers.mnist:FashionMNIST")
