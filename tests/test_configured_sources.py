"""Sources defined in the config (data.sources.<name>): a nested folder meta-trained and evaluated with no plugin,
the same settings for ls / episodes freeze / data convert, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from episodes.configured import SourceSettings, SourceSettingsError, build_sources, open_configured
from episodes.readers.hdf5 import PackedHDF5
from episodes.split import Split
from metabench.cli import main
from metabench.config import ConfigError, load_config, load_data_config
from metabench.results import load_run
from metabench.runs import execute

ALPHABETS = {f"alphabet_{a}": [f"character{c:02d}" for c in range(1, 6)] for a in "abcd"}


def write_nested(root: Path, n: int = 6) -> None:
    """root/<alphabet>/<character>/<i>.png: 4 alphabets x 5 characters x n images, each character its own shade."""
    for a, (alphabet, characters) in enumerate(ALPHABETS.items()):
        for c, character in enumerate(characters):
            folder = root / alphabet / character
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.full((12, 12, 3), 40 * a + 8 * c, dtype=np.uint8)
                img[i % 10: i % 10 + 2, :] = 255
                Image.fromarray(img).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def alphabets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot_like")
    write_nested(root)
    return root


@pytest.fixture(scope="module")
def config_file(alphabets: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "splits.json").write_text('{"train": ["alphabet_a", "alphabet_b"], "valid": ["alphabet_c"], '
                                        '"test": ["alphabet_d"]}')
    doc = {"backbone": {"name": "vit_test"},
           "data": {"image_size": 32,
                    "sources": {"glyphs": {"kind": "folder", "root": str(alphabets), "splits": str(folder / "splits.json"),
                                           "domain": "id", "image_size": 32}},
                    "train_sources": ["glyphs"], "eval_sources": ["glyphs", "digits"],
                    "train_sampler": {"way": 3, "shot": 2, "query": 2},
                    "sampler": {"mode": "variable", "min_ways": 3, "max_ways_upper_bound": 5}},
           "train": {"episodes": 2, "log_every": 1}, "eval": {"episodes": 2}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_nested_folder_from_config_is_meta_trained_and_evaluated(config_file: Path, tmp_path: Path) -> None:
    cfg = load_config(config_file, [f"out_dir={tmp_path}"], {"learner": {"name": "pmf"}})
    manifest, rows = load_run(execute(cfg, progress=False).run_dir)
    assert manifest["status"] == "finished"
    assert set(rows["source"]) == {"glyphs", "digits"}
    glyphs = rows[rows["source"] == "glyphs"]
    assert set(glyphs["domain"]) == {"id"} and set(glyphs["split"]) == {"test"}
    # every way of a test episode comes from the one test alphabet (the bilevel sampler used the folders)
    source = build_sources(["glyphs"], None, cfg.data.sources)["glyphs"]
    assert source.spec.superclasses_per_split == {Split.TRAIN: 2, Split.VALID: 1, Split.TEST: 1}
    assert [source.spec.class_name(c) for c in source.spec.class_ids("test")][0] == "alphabet_d/character01"


def test_cli_ls_freeze_and_convert_take_the_same_settings(config_file: Path, tmp_path: Path, capsys) -> None:
    assert main(["ls", "sources", "--config", str(config_file)]) == 0
    listed = capsys.readouterr().out
    assert "glyphs" in listed and "configured: folder" in listed
    assert main(["episodes", "freeze", "--suite", "glyph-test", "--sources", "glyphs", "--split", "test", "--n", "3",
                 "--out", str(tmp_path), "--config", str(config_file), "data.sampler.min_ways=3",
                 "data.sampler.max_ways_upper_bound=5"]) == 0
    assert (tmp_path / "glyph-test.json").is_file()
    capsys.readouterr()
    out = tmp_path / "glyphs.h5"
    assert main(["data", "convert", "glyphs", "--out", str(out), "--config", str(config_file), "--quiet"]) == 0
    packed = PackedHDF5(out)
    direct = build_sources(["glyphs"], None, load_data_config(config_file)[0].sources)["glyphs"]
    assert packed.spec.to_dict()["classes_per_split"] == direct.spec.to_dict()["classes_per_split"]
    np.testing.assert_array_equal(packed.read(3, [0, 1]), direct.read(3, [0, 1]))


def test_configured_source_errors_are_one_sentence(alphabets: Path) -> None:
    with pytest.raises(SourceSettingsError, match='data.sources.x: kind "foldr" is unknown'):
        open_configured("x", SourceSettings(kind="foldr", root=str(alphabets)), None)
    with pytest.raises(SourceSettingsError, match='"layout" does not apply to kind "md_tfrecords"'):
        open_configured("x", SourceSettings(kind="md_tfrecords", root=str(alphabets), layout="nested"), None)
    with pytest.raises(SourceSettingsError, match=r"data.sources.x: no root; set data.sources.x.root=DIR"):
        open_configured("x", SourceSettings(kind="folder"), None)
    with pytest.raises(ValueError, match='splits names class "alphabet_z", which is not in the data'):
        open_configured("x", SourceSettings(root=str(alphabets), splits={"train": ["alphabet_z"]}), None)
    with pytest.raises(ConfigError, match='Unknown config key "data.sources.x.rot".*did you mean "data.sources.x.root"'):
        load_config(overrides=["data.sources.x.rot=/data"])
    with pytest.raises(ConfigError, match="takes data.\\* settings only"):
        load_data_config(None, ["eval.episodes=3"])
    renamed = open_configured("digits_again", SourceSettings(kind="digits", domain="id"), None)
    assert renamed.name == "digits_again" and renamed.domain == "id"
