"""Typed run configuration: dataclass defaults < preset < YAML file < CLI flags < key=value overrides.

Unknown keys and wrong types fail with one sentence that names the key and the nearest valid
one, so a typo never silently runs the default (a failure mode of argparse-sprawl codebases).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from episodes.configured import SourceSettings
from episodes.registry import suggest
from episodes.sampler import SamplerConfig
from metabench.presets import PRESETS, PresetName

__all__ = [
    "BackboneConfig",
    "ConfigError",
    "DEFAULT_LEARNER",
    "DataConfig",
    "EVAL_MODES",
    "EvalConfig",
    "EvalMode",
    "FineTuneSettings",
    "LR_SELECTIONS",
    "LearnerConfig",
    "OPTIMIZERS",
    "PRESETS",
    "RunConfig",
    "TrainConfig",
    "check_choices",
    "choice_error",
    "choices_of",
    "load_config",
    "load_data_config",
    "to_yaml",
]


class ConfigError(ValueError):
    """A configuration problem, stated in one sentence for a person."""


#: The learner a run uses when none is named.
DEFAULT_LEARNER = "pre"


@dataclass
class LearnerConfig:
    """Base of every learner's options; a learner subclasses it as ``Learner.Config``.

    ``name`` is the learner's registry name (``metabench.learners``), filled in when the config is built
    (``load_config``, ``create_learner``), so a learner is named in one place: where it registers.
    """

    name: str = ""  # the learner, from `metabench ls learners` (set from the registry name)
    # Keep BatchNorm running statistics (and their eval-mode use) from pretraining during meta-training,
    # so a few training domains do not shift them away from what test domains need (ViTs have none).
    freeze_batchnorm: bool = True


@dataclass
class BackboneConfig:
    name: str = "vit_small"  # alias from `metabench ls backbones`
    weights: str | None = None  # explicit weights file (safetensors or torch state dict)
    allow_download: bool = True  # try the hub when it is reachable and HF_HUB_OFFLINE is unset


@dataclass
class DataConfig:
    train_sources: list[str] = field(default_factory=lambda: ["noto"])
    eval_sources: list[str] = field(default_factory=lambda: ["noto", "digits", "mnist"])
    root: str | None = None  # data root for file-based sources (one folder per source)
    image_size: int = 84
    num_workers: int = 0
    augment: bool = False  # train-time augmentation of meta-training episodes (resized crop, jitter, flip)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # evaluation episodes
    train_sampler: SamplerConfig = field(default_factory=SamplerConfig)  # meta-training episodes
    # sources defined here, by name: data.sources.NAME.kind=folder data.sources.NAME.root=DIR ... (episodes.configured)
    sources: dict[str, SourceSettings] = field(default_factory=dict)


@dataclass
class TrainConfig:
    episodes: int = 0  # meta-training tasks in total (0: evaluate only)
    tasks_per_update: int = 1  # tasks per meta-update on each process (torchrun: the meta-batch is N times this)
    log_every: int = 10
    probe_every: int = 0  # meta-gradient alignment probe every this many updates (0: off)
    val_every: int = 0  # zero-shot validation (val_id in train_log.jsonl) every this many updates (0: off)
    val_episodes: int = 10  # validation episodes per source (training sources' valid split, and val_ood_sources)
    val_ood_sources: list[str] = field(default_factory=list)  # OOD learning curve (val_ood): valid split, else test
    checkpoint_every: int = 0  # save a resumable checkpoint every this many updates (0: by time only)
    checkpoint_minutes: float = 10.0  # ... and whenever this much time passed since the last one (0: never by time)


# Keys with a fixed set of values are typed Literal[...]: the merge rejects any other value, and _one_line words
# the error (key, value, choices). The tuples below are those choices, for code that loops over them.
#: Evaluation protocols: "zero_shot" (prototypes only), "full" and "lora" (test-time fine-tuning, metabench.finetuning).
EvalMode = Literal["zero_shot", "full", "lora"]
LrSelection = Literal["valid", "support", "fixed"]
Optimizer = Literal["adam", "adamw", "sgd"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LoraQkv = Literal["qkv", "qv", "qk", "kv", "q", "k", "v"]
EVAL_MODES: tuple[str, ...] = get_args(EvalMode)
LR_SELECTIONS: tuple[str, ...] = get_args(LrSelection)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
#: Default LoRA targets: the Linear layers of every ViT block (a bare "proj" would also catch the
#: patch-embedding Conv2d) and, for timm's EfficientNet/MobileNet family, the 1x1 convolutions of every
#: block plus the head conv (depthwise convolutions keep no low-rank structure worth adapting).
LORA_TARGET = (r"(.*\.)?blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
               r"|(.*\.)?blocks\.\d+\.\d+\.conv_(pw|pwl)|(.*\.)?conv_head")


@dataclass
class FineTuneSettings:
    """How test-time fine-tuning trains: the options shared by ``EvalConfig`` (as ``eval.<key>``) and
    ``metabench.finetuning.FineTuneOptions``, declared once here; a new fine-tuning option goes here.

    The learning rate is not among them: a run may leave ``eval.lr`` unset (chosen from ``eval.lr_grid``),
    while fine-tuning itself always needs one.
    """

    batch_size: int = 128  # images per backbone forward when embedding an episode (and pseudo-queries per fine-tuning
        # step: a random subset when the support set is larger)
    optimizer: Optimizer = "adam"  # adam (PMF: Adam, no weight decay) | adamw (SMAT: AdamW, 0.01) | sgd
    weight_decay: float = 0.0
    augment: bool = True  # pseudo-queries are DiffAugment views of the support set (else the clean images)
    augment_prob: float = 0.9  # chance an image gets colour + translation
    flip_prob: float = 0.5
    lora_rank: int = 8  # SMAT's LoRA: r 8, alpha 32, dropout 0.1, lr x 10
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_target: str = LORA_TARGET  # regex fully matching the module names that get adapters
    lora_lr_scale: float = 10.0  # LoRA mode trains adapters at lr * lora_lr_scale (SMAT)
    lora_qkv: LoraQkv = "qkv"  # outputs of a fused qkv layer its adapter updates; "qv": query and value only (SMAT)


@dataclass
class EvalConfig(FineTuneSettings):
    """Evaluation episodes and protocols, and the fine-tuning options (``FineTuneSettings``) of its modes."""

    episodes: int = 40  # per evaluation source
    # per source when the backbone starts from random init (no weights offline): such a run checks the pipeline, not
    # the method, so fewer episodes say as much; 0 keeps eval.episodes
    episodes_random_init: int = 5
    split: Literal["train", "valid", "test"] = "test"
    suite: str | None = None  # a frozen episode list (`metabench episodes ls`); None samples episodes from the seed
    modes: list[EvalMode] | None = None  # zero_shot | full | lora; None: the learner's default_modes
    steps: int = 10  # fine-tuning steps of the full and lora modes (zero_shot rows always have steps 0)
    lr: float | None = None  # fine-tuning learning rate; None: choose it from lr_grid as lr_selection says
    lr_selection: LrSelection = "valid"  # valid (per source on validation episodes, else support) | support | fixed
    lr_grid: list[float] = field(default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3])
    lr_valid_episodes: int = 5  # validation episodes per source that score each lr of lr_grid


@dataclass
class RunConfig:
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name=DEFAULT_LEARNER))
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: PresetName = "auto"  # cpu | gpu | paper; auto picks cpu or gpu from the hardware found
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = "auto"  # auto: bf16/fp16 autocast on GPU; CPU: fp32, bf16 for ViTs if native bf16
    out_dir: str = "runs"
    run_name: str | None = None


def _auto_preset() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys.extend(_flat_keys(v, full + "."))
    return keys


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` type allows, also inside ``X | None`` and ``list[X]``; None for other types."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    return next((c for c in map(choices_of, get_args(tp)) if c is not None), None)


def choice_error(key: str, value: Any, allowed: tuple[Any, ...], origin: str | None = None) -> ConfigError:
    """The one sentence for a value outside a key's choices (with the nearest choice, when one is close)."""
    where = f" in {origin}" if origin else ""
    hint = suggest(str(value), [str(a) for a in allowed]).replace(" Did you mean", "; did you mean")
    return ConfigError(f'Config key "{key}"{where} must be one of {", ".join(map(str, allowed))}, '
                       f'not "{value}"{hint or "."}')


def check_choices(obj: Any, prefix: str = "") -> None:
    """Raise ``choice_error`` when a ``Literal``-typed field of dataclass ``obj`` (or of a dataclass in it) holds
    a value outside its choices: for configs built in code, which ``load_config``'s merge never saw."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, allowed = getattr(obj, f.name), choices_of(hints.get(f.name))
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif allowed is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v is not None and v not in allowed]
            if bad:
                raise choice_error(f"{prefix}{f.name}", bad[0], allowed)


def _bad_choice(schema: DictConfig, layer: DictConfig, key: str, origin: str) -> ConfigError | None:
    """The error for a value of ``layer`` outside the choices of the ``Literal``-typed ``key`` (as OmegaConf names
    it: ``eval.modes[1]`` for a list item); None when the key has no choices or the value is no single item."""
    base = re.sub(r"\[\d+\]$", "", key)
    parent, _, leaf = base.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    allowed = choices_of(typing.get_type_hints(cls).get(leaf))
    value = OmegaConf.select(layer, key, default=None, throw_on_missing=False)
    if allowed is None or isinstance(value, (DictConfig, ListConfig)) or value in allowed:
        return None
    return choice_error(base, value, allowed, origin)


def _one_line(err: OmegaConfBaseException, schema: DictConfig, origin: str, layer: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        keys = _flat_keys(schema)
        parts = key.split(".")
        if parts[:2] == ["data", "sources"] and len(parts) > 3:  # a setting of one configured source
            keys = [".".join([*parts[:3], f.name]) for f in dataclasses.fields(SourceSettings)]
        hint = suggest(key, keys).replace("Did you mean", "did you mean")
        return ConfigError(f'Unknown config key "{key}" in {origin};{hint or " see `metabench run --help`."}')
    msg = str(getattr(err, "msg", err)).splitlines()[0].rstrip(".")
    return _bad_choice(schema, layer, key, origin) or ConfigError(
        f'Bad value for config key "{key}" in {origin}: {msg}.')


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f'Override "{item}" is not of the form key=value (e.g. eval.episodes=100).')
    conf = OmegaConf.create()
    for item in overrides:
        try:
            conf.merge_with_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            why = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise ConfigError(f'Override "{item}" is not valid YAML after the "=" ({why}); quote it, and write '
                              "mappings with a space after each colon: {train: [a, b]}.") from None
    return conf


def _read_yaml(path: str | Path) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"Config file {path} does not exist; pass an existing YAML file to --config.")
    try:
        return OmegaConf.load(path)  # type: ignore[return-value]
    except Exception as exc:  # YAML syntax errors come in many types
        raise ConfigError(f"Config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc


def load_data_config(path: str | Path | None = None,
                     overrides: list[str] | None = None) -> tuple[DataConfig, set[str]]:
    """The ``data`` section alone (for commands that only build sources: ``ls sources``, ``episodes freeze``,
    ``data convert``), validated like a run's, and the data keys the file and overrides set. No preset is read."""
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), OmegaConf.create({"data": _read_yaml(path).get("data") or {}})))
    parsed = _parse_overrides(overrides or [])
    stray = [k for k in parsed if k != "data"]
    if stray:
        raise ConfigError(f'Override "{stray[0]}..." does not apply here: this command takes data.* settings only '
                          "(data.root, data.sources.NAME.*, data.sampler.*).")
    layers.append(("the key=value overrides", parsed))
    merged = _merge_layers(OmegaConf.structured({"data": DataConfig()}), layers)
    given = {str(k) for _, layer in layers for k in (layer.get("data") or {})}
    try:
        return OmegaConf.to_object(merged.data), given  # type: ignore[return-value]
    except (OmegaConfBaseException, ValueError) as err:  # e.g. a sampler setting out of range
        raise ConfigError(f"Bad data settings: {str(err).splitlines()[0]}") from None


def _merge_layers(schema: DictConfig, layers: list[tuple[str, DictConfig]]) -> DictConfig:
    """Merge ``layers`` onto ``schema`` in order; a bad key or value is one sentence naming it and its layer."""
    merged = schema
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _one_line(err, schema, origin, layer) from None
    return merged


def _check_outside_learner(layers: list[tuple[str, DictConfig]]) -> None:
    """Validate every key but ``learner.*`` (whose schema is the learner's own config class) against the schema."""
    _merge_layers(OmegaConf.structured(RunConfig()),
                  [(origin, OmegaConf.masked_copy(layer, [k for k in layer if k != "learner"])
                    if "learner" in layer else layer) for origin, layer in layers])


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a validated ``RunConfig``.

    Args:
        path: optional YAML file with any subset of the keys.
        overrides: ``key=value`` strings (dotted keys), applied last.
        flags: values from named CLI flags, as a nested dict (e.g. ``{"learner": {"name": "pre"}}``).
    """
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(path)))
    if flags:
        layers.append(("the command-line flags", OmegaConf.create(flags)))
    layers.append(("the key=value overrides", _parse_overrides(overrides or [])))

    _check_outside_learner(layers)  # a typo outside learner.* fails before torch or a learner is imported
    raw = OmegaConf.merge(*(cfg for _, cfg in layers)) if layers else OmegaConf.create()
    preset = OmegaConf.select(raw, "preset", default="auto")  # one of PresetName: checked just above
    preset = _auto_preset() if preset == "auto" else preset
    learner_name = OmegaConf.select(raw, "learner.name", default=DEFAULT_LEARNER)

    from metabench.learners import LEARNERS, learner_config_class  # here: keeps config import light

    # A learner may tune its own options per preset (e.g. SMAT's CPU budget); user layers still win.
    learner_preset = LEARNERS.get(learner_name).presets.get(preset, {})
    layers.insert(0, (f'preset "{preset}"', OmegaConf.create({**PRESETS[preset], "learner": dict(learner_preset)})))

    schema = OmegaConf.structured(RunConfig(learner=learner_config_class(learner_name)(name=learner_name)))
    merged = _merge_layers(schema, layers)
    merged.preset = preset
    cfg = OmegaConf.to_object(merged)
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    """Checks OmegaConf's types cannot express (choices are Literal types, checked by the merge)."""
    for key in ("data.image_size", "eval.episodes", "eval.batch_size", "train.tasks_per_update",
                "eval.lr_valid_episodes", "eval.lora_rank"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f'Config key "{key}" must be a positive integer.')
    if cfg.train.episodes < 0 or cfg.eval.steps < 0:
        raise ConfigError('Config keys "train.episodes" and "eval.steps" must not be negative.')
    _check_fine_tuning(cfg.eval)


def _check_fine_tuning(ev: EvalConfig) -> None:
    if any(m != "zero_shot" for m in ev.modes or ()) and ev.steps == 0:
        raise ConfigError("eval.modes has a fine-tuning mode but eval.steps=0; set eval.steps to a positive number.")
    if ev.lr is None and ev.lr_selection == "fixed":
        raise ConfigError('eval.lr_selection=fixed needs a learning rate: set eval.lr (e.g. eval.lr=1e-4).')
    if not ev.lr_grid or min(ev.lr_grid) < 0 or (ev.lr is not None and ev.lr < 0):
        raise ConfigError('Config keys "eval.lr" and "eval.lr_grid" need non-negative learning rates '
                          "(and a non-empty grid).")
    for key in ("augment_prob", "flip_prob", "lora_dropout"):
        if not 0 <= getattr(ev, key) <= 1:
            raise ConfigError(f'Config key "eval.{key}" must be a probability between 0 and 1.')
    if ev.weight_decay < 0 or ev.lora_lr_scale <= 0 or ev.lora_alpha <= 0:
        raise ConfigError('Config keys "eval.weight_decay" (>= 0), "eval.lora_lr_scale" and "eval.lora_alpha" (> 0) '
                          "are out of range.")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written next to every run, loadable with ``--config``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def env_flag(name: str) -> bool:
    """True when an environment variable is set to a truthy value (1, true, yes)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
