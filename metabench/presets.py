"""Named settings (``--preset`` / ``preset=``): layered under the user's file, flags and overrides.

A learner may add its own per preset (``Learner.presets``, e.g. SMAT's CPU budget).
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["PRESETS", "PresetName"]

#: The values of the ``preset`` key: "auto" (cpu or gpu, from the hardware found) and the keys of PRESETS.
PresetName = Literal["auto", "cpu", "gpu", "paper"]

# Named settings. "cpu" keeps the default run within minutes on a 2-core machine; "paper" is the
# SMAT/PMF Meta-Dataset setting (8 training sources, 128 px, 50k tasks, 600 test episodes).
PRESETS: dict[str, dict[str, Any]] = {
    # On a CPU, meta-training uses 5-way 5-shot episodes (a variable episode of up to 1,000 images needs
    # ~10 GB of activations for one backward pass); evaluation keeps Meta-Dataset's variable episodes.
    "cpu": {
        # fixed-way episodes ignore class hierarchies (noto's scripts, Omniglot's alphabets), as Meta-Dataset's do
        "data": {"image_size": 84, "train_sampler": {"mode": "fixed", "way": 5, "shot": 5, "query": 10,
                                                     "use_bilevel_hierarchy": False, "use_dag_hierarchy": False}},
        "train": {"episodes": 40},
        "eval": {"episodes": 15},
    },
    "gpu": {"data": {"image_size": 128, "num_workers": 4}, "train": {"episodes": 10000},
            "eval": {"episodes": 600, "steps": 50}},
    "paper": {
        "data": {
            "image_size": 128,
            "num_workers": 8,
            "augment": True,
            "train_sources": [
                "ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
            ],
            "eval_sources": [
                "ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
                "traffic_sign", "mscoco", "cifar10", "cifar100", "mnist", "sketch", "clipart", "food101", "pets",
                "cars",
            ],
        },
        "train": {"episodes": 50000, "tasks_per_update": 4, "probe_every": 250, "val_every": 500,
                  "val_episodes": 120, "val_ood_sources": ["traffic_sign", "mscoco"]},
        # Test-time fine-tuning as the SMAT code: AdamW (weight decay 0.01), LoRA r 8 / alpha 32 on query and value
        # only, lr x 10, 50 steps (the rate is still chosen without test labels, eval.lr_selection).
        "eval": {"episodes": 600, "steps": 50, "optimizer": "adamw", "weight_decay": 0.01,
                 "lora_target": r"(.*\.)?blocks\.\d+\.attn\.qkv", "lora_qkv": "qv"},
    },
}
