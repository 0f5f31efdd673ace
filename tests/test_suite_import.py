"""Episode lists defined elsewhere (JSON or CSV) become frozen suites, evaluated like shipped ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_configured_sources import write_nested

from episodes.readers.embedded import SklearnDigits
from episodes.readers.folder import ImageFolderSource
from episodes.split import Split
from episodes.suite_import import import_suite
from episodes.suites import SuiteEpisodeSet, SuiteError, load_suite
from metabench.cli import main
from metabench.config import load_config
from metabench.results import load_run
from metabench.runs import execute


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> ImageFolderSource:
    root = tmp_path_factory.mktemp("glyphs")
    write_nested(root)
    return ImageFolderSource(root, name="glyphs", image_size=None)


def _episode_file(tmp_path: Path) -> Path:
    doc = {"split": "test", "episodes": [
        {"source": "glyphs",
         "support": [{"file": "alphabet_a/character01/0.png", "label": 0}, ["alphabet_b/character03/1.png", 1],
                     {"class": "alphabet_b/character03", "index": 2, "label": 1}],
         "query": [["alphabet_a/character01/4.png", 0], ["alphabet_b/character03", 5, 1]]},
        {"source": "digits",
         "support": [[7, 0, 0], [7, 1, 0], [2, 0, 1], [2, 1, 1], [5, 3, 2], [5, 4, 2]],
         "query": [[7, 9, 0], [2, 9, 1], [5, 9, 2], [5, 10, 2]]},
    ]}
    path = tmp_path / "published.json"
    path.write_text(json.dumps(doc))
    return path


def test_json_episodes_become_a_suite_with_exact_images(glyphs, tmp_path):
    digits = SklearnDigits()
    suite = import_suite(_episode_file(tmp_path), "published", {"glyphs": glyphs, "digits": digits}, tmp_path)
    assert len(suite) == 2 and suite.source_names == ["glyphs", "digits"] and suite.split is Split.TEST
    assert load_suite(tmp_path / "published.json").content_hash == suite.content_hash
    episodes = SuiteEpisodeSet(suite, [glyphs, digits])
    first = episodes[0]
    assert first.support_y.tolist() == [0, 1, 1] and first.query_y.tolist() == [0, 1]
    apple = glyphs.spec.class_ids("test")[0]
    index_of_0 = [glyphs.path_of(apple, i).name for i in range(6)].index("0.png")
    np.testing.assert_array_equal(first.support_x[0].permute(1, 2, 0).numpy(), glyphs.read(apple, [index_of_0])[0])
    second = episodes[1]
    assert second.way == 3 and second.query_y.tolist() == [0, 1, 2, 2]
    np.testing.assert_array_equal(second.query_x[3].permute(1, 2, 0).numpy(), digits.read(5, [10])[0])


def test_csv_import_through_the_cli_then_evaluated_by_a_run(tmp_path, capsys):
    root = tmp_path / "glyphs"
    write_nested(root)
    rows = ["episode,source,set,label,file"]
    for ep, (a, b) in enumerate((("alphabet_c/character01", "alphabet_c/character02"),
                                 ("alphabet_d/character04", "alphabet_a/character05"))):
        rows += [f"{ep},glyphs,support,0,{a}/0.png", f"{ep},glyphs,support,1,{b}/0.png",
                 f"{ep},glyphs,query,0,{a}/1.png", f"{ep},glyphs,query,1,{b}/2.png", f"{ep},glyphs,query,1,{b}/3.png"]
    (tmp_path / "eps.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": {"glyphs": {"kind": "folder", "root": str(root),
                                                                      "image_size": 32}}}}))
    assert main(["episodes", "import", str(tmp_path / "eps.csv"), "--name", "csv-suite", "--out", str(tmp_path),
                 "--config", str(config)]) == 0
    assert "Imported suite csv-suite: 2 episodes" in capsys.readouterr().out
    suite_path = tmp_path / "csv-suite.json"
    cfg = load_config(config, [f"out_dir={tmp_path / 'runs'}", f"eval.suite={suite_path}", "data.eval_sources=[glyphs]",
                               "data.image_size=32"], {"learner": {"name": "pre"}, "backbone": {"name": "vit_test"}})
    _, frame = load_run(execute(cfg, progress=False).run_dir)
    suite = load_suite(suite_path)
    assert sorted(frame["episode_id"]) == sorted(p.episode_id for p in suite.plans)
    assert set(frame["n_query"]) == {3} and set(frame["way"]) == {2}


def test_bad_episode_files_are_one_sentence(glyphs, tmp_path):
    sources = {"glyphs": glyphs}

    def fails(episode: dict, match: str) -> None:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"episodes": [episode]}))
        with pytest.raises(SuiteError, match=match):
            import_suite(path, "bad", sources, tmp_path)

    ok_support = [["alphabet_a/character01/0.png", 0], ["alphabet_a/character02/0.png", 1]]
    fails({"source": "glyphs", "support": [["alphabet_a/character01/99.png", 0]], "query": [["x.png", 0]]},
          r'names image "alphabet_a/character01/99.png", which source "glyphs" does not hold')
    fails({"source": "glyphs", "support": ok_support, "query": [["alphabet_a/character03/1.png", 0]]},
          "label 0 names two classes")
    fails({"source": "glyphs", "support": ok_support, "query": [["alphabet_a/character03/1.png", 3]]},
          r"labels must be 0..2, each on its own class \(found \[0, 1, 3\]\)")
    fails({"source": "glyphs", "support": ok_support, "query": [["alphabet_a/character03/1.png", 2]]},
          "a query label has no support images")
    fails({"source": "elsewhere", "support": ok_support, "query": ok_support}, 'uses source "elsewhere"')
    fails({"source": "glyphs", "support": ok_support}, "has no query images")
    fails({"source": "glyphs", "support": [["alphabet_a/character01", 40, 0]], "query": ok_support[:1]},
          "has 6 images, so index 40 does not exist")


def test_meta_datasets_dumped_episodes_import_and_evaluate(tmp_path, capsys):
    from helpers_md import encode, example_bytes, write_tfrecord

    dump = tmp_path / "dump"
    dump.mkdir()
    truth = {}
    for ep, way in enumerate((3, 2)):
        for role, per_class in (("train", 2), ("test", 3)):
            records = []
            for label in range(way):
                for i in range(per_class):
                    img = np.full((20, 20, 3), 30 * label + 7 * i + 50 * ep, dtype=np.uint8)
                    truth[(ep, role, label, i)] = img
                    records.append(example_bytes(encode(img), label))
            write_tfrecord(dump / f"episode-{ep:04d}-{role}.tfrecords", records[::-1])  # labels not in order
    data = tmp_path / "data"
    assert main(["episodes", "import", str(dump), "--name", "md-dumped", "--format", "md-dump", "--out",
                 str(tmp_path), "--data-out", str(data), "--image-size", "20"]) == 0
    assert "Imported suite md-dumped: 2 episodes" in capsys.readouterr().out
    suite = load_suite(tmp_path / "md-dumped.json")
    from episodes.readers.hdf5 import PackedHDF5

    episodes = SuiteEpisodeSet(suite, [PackedHDF5(data / "md-dumped.h5", name="md-dumped", domain="ood")])
    first = episodes[0]
    assert first.way == 3 and first.support_y.tolist() == [0, 0, 1, 1, 2, 2] and len(first.query_y) == 9
    support = {tuple(first.support_x[k, :, 0, 0].tolist()) for k in range(6)}
    assert support == {tuple(truth[(0, "train", lab, i)][0, 0].tolist()) for lab in range(3) for i in range(2)}
    assert episodes[1].way == 2
    (dump / "episode-0001-test.tfrecords").unlink()
    with pytest.raises(SuiteError, match="episode 1 has no query"):
        from episodes.md_dump import read_dump_files

        read_dump_files(dump)
