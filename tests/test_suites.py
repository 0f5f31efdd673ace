"""Frozen evaluation suites: freeze, load, verify, and read episodes back identical to sampling."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import pickle

import pytest
import torch

from episodes import suites
from episodes.episode import Episode, Split
from episodes.loader import EpisodeSet
from episodes.readers import SOURCES
from episodes.readers.embedded import NotoGlyphs, SklearnDigits
from episodes.readers.mnist import MNIST
from episodes.sampler import SamplerConfig
from episodes.suites import (
    SuiteEpisodeSet,
    SuiteError,
    freeze_named,
    freeze_suite,
    list_suites,
    load_suite,
    spec_fingerprint,
)


@pytest.fixture(scope="module")
def noto(tmp_path_factory):
    return NotoGlyphs(scripts=["greek"], instances=6, cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits():
    return SklearnDigits()


@pytest.fixture(scope="module")
def frozen(noto, digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("suites")
    return freeze_suite("tiny", {"noto": noto, "digits": digits}, "test", None, n=6, seed=11, image_size=32,
                        directory=folder)


def same(a: Episode, b: Episode) -> bool:
    tensors = ("support_x", "support_y", "query_x", "query_y")
    return (a.episode_id, a.class_ids, a.source, a.split) == (b.episode_id, b.class_ids, b.source, b.split) and all(
        torch.equal(getattr(a, t), getattr(b, t)) for t in tensors
    )


def test_round_trip_matches_direct_sampling(frozen, noto, digits):
    direct = EpisodeSet([noto, digits], "test", n_episodes=6, seed=11, image_size=32)
    loaded = load_suite(frozen.path, {"noto": noto, "digits": digits})
    assert loaded.content_hash == frozen.content_hash and len(loaded) == 12
    assert loaded.source_names == ["noto", "digits"] and loaded.split is Split.TEST and loaded.n_per_source == 6
    assert loaded.fingerprints["noto"] == spec_fingerprint(noto.spec)
    es = SuiteEpisodeSet(loaded, [digits, noto])  # any order or container; the suite's order wins
    assert len(es) == 12
    for i in range(12):
        assert es.describe(i).episode_id == direct.describe(i).episode_id
        assert same(es[i], direct[i])
    assert es[0].support_x.shape[-1] == 32  # the suite's image size by default
    assert SuiteEpisodeSet(loaded, [noto, digits], image_size=20)[0].support_x.shape[-1] == 20
    clone = pickle.loads(pickle.dumps(es))  # what a DataLoader worker receives
    assert same(clone[7], direct[7])
    only = SuiteEpisodeSet(loaded, {"digits": digits}, only=["digits"])
    assert len(only) == 6 and all(same(only[i], direct[6 + i]) for i in range(6))


def test_file_layout_and_compression(frozen, noto, tmp_path, monkeypatch):
    doc = json.loads(frozen.path.read_text())
    assert frozen.path.name == "tiny.json" and doc["format"] == suites.FORMAT and doc["seed"] == 11
    assert doc["sampler"] == {**doc["sampler"], "mode": "variable", "max_ways_upper_bound": 50}
    first = doc["episodes"][0]
    assert set(first) == {"source", "split", "episode_id", "class_ids", "shots", "n_query", "support", "query"}
    assert [len(s) for s in first["support"]] == first["shots"]
    assert all(len(q) == first["n_query"] for q in first["query"])
    assert frozen.to_json_dict() == doc
    monkeypatch.setattr(suites, "GZIP_ABOVE", 1000)
    (tmp_path / "x.json").write_text("stale")
    zipped = freeze_suite("x", {"noto": noto}, "test", n=3, seed=0, directory=tmp_path)
    assert zipped.path.name == "x.json.gz" and not (tmp_path / "x.json").exists()
    assert gzip.decompress(zipped.path.read_bytes()).startswith(b"{")
    again = freeze_suite("x", {"noto": noto}, "test", n=3, seed=0, directory=tmp_path)
    assert again.path.read_bytes() == zipped.path.read_bytes()  # byte-identical: safe to keep in git
    assert list_suites(tmp_path) == ["x"]


def test_tampering_fails_the_hash_check(frozen, tmp_path):
    text = frozen.path.read_text()
    doc = json.loads(text)
    idx = doc["episodes"][3]["support"][0]
    edited = text.replace(json.dumps(doc["episodes"][3], separators=(",", ":")),
                          json.dumps({**doc["episodes"][3], "support": [[idx[0] + 1, *idx[1:]],
                                                                        *doc["episodes"][3]["support"][1:]]},
                                     separators=(",", ":")))
    assert edited != text
    bad = tmp_path / "tampered.json"
    bad.write_text(edited)
    with pytest.raises(SuiteError, match="tampered.json: content hash mismatch"):
        load_suite(bad)
    gz = tmp_path / "tampered.json.gz"
    gz.write_bytes(gzip.compress(text.replace('"seed": 11', '"seed": 12').encode()))
    with pytest.raises(SuiteError, match="content hash mismatch"):
        load_suite(gz)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SuiteError, match="junk.json: not a readable suite file"):
        load_suite(tmp_path / "junk.json")


def test_a_changed_source_fails_with_a_clear_error(frozen, noto, digits):
    other_noto = copy.copy(noto)  # as if a homoglyph check dropped a letter: same name, other class list
    names = dict(noto.spec.class_names)
    names[min(names)] = "greek/SOMETHING ELSE"
    other_noto.spec = dataclasses.replace(noto.spec, class_names=names)
    with pytest.raises(SuiteError, match='Suite "tiny" was frozen on a different version of source "noto"'):
        load_suite(frozen.path, {"noto": other_noto, "digits": digits})
    with pytest.raises(SuiteError, match='Suite "tiny" needs source "noto"'):
        SuiteEpisodeSet(frozen, [digits])
    with pytest.raises(SuiteError, match='has no source "mnist"'):
        SuiteEpisodeSet(frozen, [digits], only=["mnist"])
    with pytest.raises(SuiteError, match='passed under the key "numbers"'):
        frozen.check_sources({"numbers": digits})


def test_names_and_recipes(noto, tmp_path):
    with pytest.raises(SuiteError, match='No suite "embeded-test".* Did you mean "embedded-test"'):
        load_suite("embeded-test")
    with pytest.raises(SuiteError, match='Suite "mine" has no recipe'):
        freeze_named("mine")
    with pytest.raises(SuiteError, match="must be a plain file name"):
        freeze_suite("../up", {"noto": noto}, "test", directory=tmp_path)
    small = freeze_named("embedded-valid", n=4, seed=3, sources=[noto], split="test", directory=tmp_path)
    assert small.split is Split.TEST and len(small) == 4 and small.source_names == ["noto"]
    fixed = SamplerConfig(mode="fixed", shot=1, query=2, use_bilevel_hierarchy=False)
    custom = freeze_named("mine", n=2, sources=[noto], split="test", sampler_cfg=fixed, directory=tmp_path)
    assert custom.sampler.mode == "fixed" and all(p.way == 5 for p in custom.plans)
    assert list_suites(tmp_path) == ["embedded-valid", "mine"]


# -- the shipped suites ---------------------------------------------------------------------------
def test_shipped_suites_load_and_match_the_installed_sources():
    assert {"embedded-test", "embedded-valid"} <= set(list_suites())
    noto = SOURCES.get("noto")()  # the full default source, as evaluation builds it
    valid = load_suite("embedded-valid", [noto])
    assert valid.split is Split.VALID and len(valid) == 120 and valid.source_names == ["noto"]
    ep = SuiteEpisodeSet(valid, [noto])[119]
    assert ep.split is Split.VALID and set(ep.class_ids) <= set(noto.spec.class_ids("valid"))
    test = load_suite("embedded-test")
    assert test.source_names == ["noto", "digits", "mnist"] and len(test) == 1800
    sources = [noto, SklearnDigits(), MNIST()]  # MNIST's test set ships with metabench
    test.check_sources(sources, [s.name for s in sources])
    es = SuiteEpisodeSet(test, sources, only=[s.name for s in sources])
    for i in (0, 600, len(es) - 1):
        ep = es[i]
        assert ep.support_x.shape[1:] == (3, 84, 84) and ep.episode_id == test.plans[i].episode_id


def test_smat_cpu_study_suite_is_its_recipe_frozen(tmp_path):
    """The shipped study suite is what its recipe freezes now: same sources, shape and episodes (content hash)."""
    from episodes.suites import RECIPES, STUDY_ID_SOURCES, freeze_named

    shipped = load_suite("smat-cpu-study")
    assert shipped.source_names == list(STUDY_ID_SOURCES) + list(RECIPES["smat-cpu-study"].sources[5:])
    assert len(shipped) == 100 * 12 and (shipped.sampler.way, shipped.sampler.shot) == (5, 1)
    names = [s for s in shipped.source_names if s != "fashion_mnist"]  # Debian's package may be absent
    again = freeze_named("smat-cpu-study-check", sources=names, split="test", n=100,
                         sampler_cfg=RECIPES["smat-cpu-study"].sampler, directory=tmp_path)
    by_source = {p.source: [] for p in shipped.plans}
    for plan in shipped.plans:
        by_source[plan.source].append(plan.episode_id)
    for plan_source in names:
        assert [p.episode_id for p in again.plans if p.source == plan_source] == by_source[plan_source]
