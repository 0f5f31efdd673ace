from __future__ import annotations

import pytest

from metabench.config import ConfigError, load_config, to_yaml


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
        (["eval.modes=[zeroshot]"], 'Unknown evaluation mode "zeroshot" in eval.modes. Did you mean "zero_shot"?'),
        (["preset=papr"], 'Unknown preset "papr". Did you mean "paper"?'),
    ],
)
def test_bad_config_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_learner_suggests(tmp_path) -> None:
    from metabench.registry import RegistryError

    with pytest.raises(RegistryError, match='Did you mean "pre"'):
        load_config(flags={"learner": {"name": "pree"}})


def test_bad_yaml_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
