"""Meta-Dataset sources prepared from their public raw downloads, without TensorFlow.

Meta-Dataset's own conversion (``dataset_to_records.py``) needs TensorFlow and writes TFRecords; ``prepare`` reads
the same downloads (archives or unpacked folders) and writes metabench's packed HDF5 cache directly, following
upstream's class splits (``splits/*.json``) and conversion rules (crops, inversion, image order), so the spec equals
upstream's ``dataset_spec.json`` for the same images. One module per family of layouts:

* ``folders``: one folder per class (Omniglot, DTD, CUB-200-2011, Traffic Signs);
* ``annotated``: classes from annotation files (Aircraft, VGG Flower, Fungi);
* ``quickdraw``, ``mscoco``, ``ilsvrc``: their own formats.
"""

from __future__ import annotations

from episodes.prepare.api import PREPARERS, PrepareSummary, prepare, prepared_source
from episodes.prepare.inputs import InputNotFound, InputTree, PrepareError
from episodes.prepare.source import PreparedSource

__all__ = ["PREPARERS", "InputNotFound", "InputTree", "PrepareError", "PrepareSummary", "PreparedSource",
           "prepare", "prepared_source"]
