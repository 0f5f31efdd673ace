from __future__ import annotations

import dataclasses
import typing

import pytest

from metabench.config import ConfigError, EvalConfig, RunConfig, check_choices, choices_of, load_config, to_yaml
from metabench.learners import learner_config_class
from metabench.presets import PRESETS, PresetName


def test_defaults_preset_and_overrides() -> None:
    cfg = load_config(overrides=["eval.episodes=7", "data.sampler.mode=fixed", "data.eval_sources=[digits]"],
                      flags={"learner": {"name": "pre"}, "preset": "cpu"})
    assert cfg.preset == "cpu"
    assert cfg.eval.episodes == 7
    assert cfg.data.sampler.mode == "fixed"
    assert cfg.data.eval_sources == ["digits"]
    assert type(cfg.learner).__name__ == "PreConfig" and cfg.learner.scale == 10.0


def test_yaml_file_is_applied_and_round_trips(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nlearner:\n  name: pre\n  scale: 5.0\n")
    cfg = load_config(path, ["eval.episodes=2"])
    assert cfg.seed == 3 and cfg.learner.scale == 5.0 and cfg.eval.episodes == 2
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    again = load_config(saved)
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.episode=3"], 'Unknown config key "eval.episode" in the key=value overrides; did you mean "eval.episodes"?'),
        (["learner.scael=3"], 'Unknown config key "learner.scael"'),
        (["eval.episodes=many"], 'Bad value for config key "eval.episodes"'),
        (["seed"], 'Override "seed" is not of the form key=value'),
        (["eval.episodes=0"], 'Config key "eval.episodes" must be a positive integer.'),
        (["eval.modes=[zeroshot]"], 'Config key "eval.modes" in the key=value overrides must be one of zero_shot, full, '
                                    'lora, not "zeroshot"; did you mean "zero_shot"?'),
        (["preset=papr"], 'Config key "preset" in the key=value overrides must be one of auto, cpu, gpu, paper, not '
                          '"papr"; did you mean "paper"?'),
    ],
)
def test_bad_config_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_learner_suggests(tmp_path) -> None:
    from episodes.registry import RegistryError

    with pytest.raises(RegistryError, match='Did you mean "pre"'):
        load_config(flags={"learner": {"name": "pree"}})


def test_bad_yaml_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def _choice_keys(obj: object, prefix: str = "") -> list[tuple[str, tuple, bool]]:
    """(key, choices, takes a list) of every Literal-typed key of a config dataclass, nested ones included."""
    hints, found = typing.get_type_hints(type(obj)), []
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            found += _choice_keys(value, f"{prefix}{f.name}.")
        elif choices_of(tp) is not None:
            takes_list = any(typing.get_origin(t) is list for t in (tp, *typing.get_args(tp)))
            found.append((f"{prefix}{f.name}", choices_of(tp), takes_list))
    return found


CHOICE_KEYS = _choice_keys(RunConfig(learner=learner_config_class("smat")(name="smat")))


def test_the_choice_keys_are_found() -> None:
    keys = {k for k, _, _ in CHOICE_KEYS}
    assert {"preset", "precision", "eval.split", "eval.modes", "eval.optimizer", "eval.lr_selection", "eval.lora_qkv",
            "data.sampler.mode", "learner.sparsity_scope", "learner.kd_direction"} <= keys
    assert set(typing.get_args(PresetName)) == {"auto", *PRESETS}


@pytest.mark.parametrize(("key", "allowed", "takes_list"), CHOICE_KEYS, ids=[k for k, _, _ in CHOICE_KEYS])
def test_a_value_outside_a_keys_choices_is_one_sentence(key: str, allowed: tuple, takes_list: bool) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}={'[zzz]' if takes_list else 'zzz'}"], flags={"learner": {"name": "smat"}})
    assert str(err.value) == (f'Config key "{key}" in the key=value overrides must be one of {", ".join(allowed)}, '
                              'not "zzz".')


def test_choices_of_a_config_built_in_code_are_checked_too() -> None:
    check_choices(RunConfig())
    with pytest.raises(ConfigError, match=r'^Config key "eval.modes" must be one of zero_shot, full, lora, not "ful"; '
                                          r'did you mean "full"\?$'):
        check_choices(RunConfig(eval=EvalConfig(modes=["zero_shot", "ful"])))


@pytest.mark.parametrize("name", ["pre", "finetune", "softmerge"])
def test_the_learner_config_is_named_by_the_registry(name: str) -> None:
    assert load_config(flags={"learner": {"name": name}}).learner.name == name
    assert RunConfig().learner.name == "pre"  # the default learner


def test_create_learner_names_a_config_built_without_a_name() -> None:
    from baselines.finetune import FineTuneConfig
    from metabench.backbones import create_backbone
    from metabench.learners import create_learner

    backbone = create_backbone("vit_test")
    assert create_learner("finetune", backbone).describe()["learner"] == "finetune"
    assert create_learner("finetune", backbone, FineTuneConfig(scale=5.0)).cfg.name == "finetune"
