"""Frozen evaluation suites: every episode written down once, hashed, and read back instead of sampled.

Sampling is deterministic, but only as long as the sampler, the specs and numpy's generators stay
the same; a frozen suite pins the exact episodes (class ids in label order and the (class, image
index) pairs of support and query), so results from different versions, machines or peers stay
comparable per episode, as Meta-Dataset's dumped episodes do. A content hash guards the file, and
a fingerprint of each source's spec detects a source that changed under the suite (for noto the
class list depends on font rendering, so this is a real risk).

File layout (``episodes/suite_files/<name>.json``, or ``.json.gz`` when over ~1 MB): a header (format,
name, split, seed, episodes per source, image size, sampler settings, per-source fingerprints),
``episodes`` (one JSON object per line), and ``content_hash``: the sha256 of the canonical JSON
of everything else.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from episodes.atomic import atomic_write
from episodes.loader import EpisodePlan, EpisodeSet
from episodes.readers.base import Source
from episodes.registry import suggest
from episodes.sampler import SamplerConfig
from episodes.spec import DatasetSpec, parse_split
from episodes.split import Split
from episodes.suite_format import SuiteError, plan_from_json, plan_to_json

__all__ = [
    "RECIPES",
    "STUDY_ID_SOURCES",
    "STUDY_OOD_SOURCES",
    "SUITES_DIR",
    "Suite",
    "SuiteEpisodeSet",
    "SuiteError",
    "SuiteRecipe",
    "freeze_named",
    "freeze_suite",
    "list_suites",
    "load_suite",
    "spec_fingerprint",
]

log = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).with_name("suite_files")
FORMAT = "metabench-suite/1"
GZIP_ABOVE = 1_000_000  # bytes of JSON; a 600-episode x 3-source suite is ~10 MB as text, ~2 MB gzipped


@dataclass(frozen=True)
class SuiteRecipe:
    """What a named suite holds, so ``metabench episodes freeze --suite NAME`` needs no other flags."""

    sources: tuple[str, ...]
    split: Split
    n: int  # episodes per source
    purpose: str
    sampler: SamplerConfig | None = None  # episode shape (None: Meta-Dataset's variable way and shot)


#: The SMAT CPU study's domains: each training script of noto is a source (its test classes are held out),
#: the other scripts and three digit / clothing sets are out of domain.
STUDY_ID_SOURCES: tuple[str, ...] = ("noto_latin", "noto_cyrillic", "noto_arabic", "noto_devanagari", "noto_thai")
STUDY_OOD_SOURCES: tuple[str, ...] = ("noto_telugu", "noto_greek", "noto_khmer", "noto_tamil", "digits", "mnist",
                                      "fashion_mnist")

RECIPES: dict[str, SuiteRecipe] = {
    "embedded-test": SuiteRecipe(("noto", "digits", "mnist"), Split.TEST, 600,
                                 "offline evaluation: noto test scripts (in-domain) and two digit sets (OOD)"),
    "embedded-valid": SuiteRecipe(("noto",), Split.VALID, 120,
                                  "learning-rate and model selection on noto's validation script (never test classes)"),
    "smat-cpu-study": SuiteRecipe(
        STUDY_ID_SOURCES + STUDY_OOD_SOURCES, Split.TEST, 100,
        "the SMAT CPU study (docs/smat-cpu-study): held-out classes of five noto scripts (ID); four unseen "
        "scripts, digits, MNIST and Fashion-MNIST (OOD); 5-way 1-shot, 15 queries per class",
        SamplerConfig(mode="fixed", way=5, shot=1, query=15)),
}


def spec_fingerprint(spec: DatasetSpec) -> str:
    """sha256 of the spec's canonical JSON, without ``path`` and ``file_pattern``.

    Those say where and how the files are stored, not which images exist: the same source
    converted on another machine or packed to HDF5 keeps its fingerprint.
    """
    return _canonical_hash({k: v for k, v in spec.to_dict().items() if k not in ("path", "file_pattern")})


def _canonical_hash(doc: Mapping[str, Any]) -> str:
    """sha256 of ``doc``'s canonical JSON, leaving out its own ``content_hash``."""
    body = {k: v for k, v in doc.items() if k != "content_hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Suite:
    """A frozen list of episodes, per source in the order they were frozen (``n_per_source`` each)."""

    name: str
    split: Split
    sampler: SamplerConfig
    seed: int
    n_per_source: int
    image_size: int | None
    fingerprints: dict[str, str]  # source name -> spec_fingerprint at freezing, in source order
    plans: tuple[EpisodePlan, ...]
    content_hash: str
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def source_names(self) -> list[str]:
        return list(self.fingerprints)

    def check_sources(
        self, sources: Mapping[str, Source] | Sequence[Source], only: Sequence[str] | None = None
    ) -> None:
        """Raise SuiteError unless every source the suite uses (or ``only`` those) is given, with the same spec."""
        given = _by_name(sources)
        for name in only if only is not None else self.source_names:
            if name not in self.fingerprints:
                raise SuiteError(f'Suite "{self.name}" has no source "{name}"; it has {", ".join(self.fingerprints)}.')
            if name not in given:
                raise SuiteError(f'Suite "{self.name}" needs source "{name}"; pass it with the others.')
            now = spec_fingerprint(given[name].spec)
            if now != self.fingerprints[name]:
                raise SuiteError(
                    f'Suite "{self.name}" was frozen on a different version of source "{name}" (spec fingerprint '
                    f"{self.fingerprints[name][:12]}, now {now[:12]}); freeze the suite again or use the source "
                    "version it was frozen on."
                )

    def to_json_dict(self) -> dict[str, Any]:
        """The file's content (with ``content_hash``)."""
        doc = _header(self.name, self.split, self.sampler, self.seed, self.n_per_source, self.image_size,
                      self.fingerprints)
        doc["episodes"] = [plan_to_json(p) for p in self.plans]
        doc["content_hash"] = self.content_hash
        return doc


def _header(name: str, split: Split, sampler: SamplerConfig, seed: int, n: int, image_size: int | None,
            fingerprints: Mapping[str, str]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": name,
        "split": split.value,
        "seed": seed,
        "n_per_source": n,
        "image_size": image_size,
        "sampler": dataclasses.asdict(sampler),
        "sources": [{"name": s, "spec_fingerprint": f} for s, f in fingerprints.items()],
    }


def _by_name(sources: Mapping[str, Source] | Sequence[Source]) -> dict[str, Source]:
    if isinstance(sources, Mapping):
        for key, src in sources.items():
            if key != src.name:
                raise SuiteError(f'Source "{src.name}" is passed under the key "{key}"; key sources by their name.')
        return dict(sources)
    return {s.name: s for s in sources}


# -- writing ------------------------------------------------------------------------------------
def _encode(doc: Mapping[str, Any]) -> bytes:
    """Header indented, one episode per line: readable, diffable, and still one JSON document."""
    head = {k: v for k, v in doc.items() if k not in ("episodes", "content_hash")}
    lines = ",\n".join(json.dumps(e, separators=(",", ":")) for e in doc["episodes"])
    text = (json.dumps(head, indent=1)[:-2] + ',\n "episodes": [\n' + lines + "\n ],\n"
            + f' "content_hash": "{doc["content_hash"]}"\n}}\n')
    return text.encode("utf-8")


def _write(target_dir: Path, name: str, data: bytes) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    plain, zipped = target_dir / f"{name}.json", target_dir / f"{name}.json.gz"
    path, other = (zipped, plain) if len(data) > GZIP_ABOVE else (plain, zipped)
    payload = gzip.compress(data, compresslevel=9, mtime=0) if path is zipped else data
    atomic_write(path, payload)
    other.unlink(missing_ok=True)  # never leave two versions of one suite
    log.info("suite %s: %d bytes of JSON written to %s (%d bytes)", name, len(data), path, len(payload))
    return path


def freeze_suite(
    name: str,
    sources: Mapping[str, Source],
    split: Split | str,
    sampler_cfg: SamplerConfig | None = None,
    n: int = 600,
    seed: int = 0,
    image_size: int | None = None,
    *,
    directory: str | os.PathLike[str] | None = None,
) -> Suite:
    """Sample ``n`` episodes per source exactly as ``EpisodeSet`` does, write them to ``<directory>/<name>.json[.gz]``.

    ``directory`` defaults to the package's ``episodes/suites``. Returns the suite as loaded back.
    """
    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise SuiteError(f'Suite name "{name}" must be a plain file name (letters, digits, "-" or "_").')
    by_name = _by_name(sources)
    es = EpisodeSet(list(by_name.values()), split, sampler_cfg, n_episodes=n, seed=seed, image_size=image_size)
    plans = tuple(es.describe(i) for i in range(len(es)))
    fingerprints = {s.name: spec_fingerprint(s.spec) for s in es.sources}
    doc = _header(name, es.split, es.config, seed, n, image_size, fingerprints)
    doc["episodes"] = [plan_to_json(p) for p in plans]
    doc["content_hash"] = _canonical_hash(doc)
    path = _write(Path(directory) if directory is not None else SUITES_DIR, name, _encode(doc))
    return load_suite(path)


# -- reading ------------------------------------------------------------------------------------
def list_suites(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the suites in ``directory`` (default: the shipped ones)."""
    folder = Path(directory) if directory is not None else SUITES_DIR
    names = {p.name.removesuffix(".gz").removesuffix(".json") for p in folder.glob("*.json*")}
    return sorted(n for n in names if not n.startswith("."))


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    found = [p for p in (SUITES_DIR / f"{name}.json", SUITES_DIR / f"{name}.json.gz") if p.is_file()]
    if len(found) == 2:
        raise SuiteError(f"Suite {name} exists as both {found[0]} and {found[1]}; delete the stale one.")
    if not found:
        known = list_suites()
        raise SuiteError(
            f'No suite "{name}" (neither a file nor one of {", ".join(known) or "no shipped suites"}).'
            f"{suggest(name, known)} Freeze it with `metabench episodes freeze --suite {name}`."
        )
    return found[0]


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SuiteError(f"{path}: not a readable suite file ({e}); freeze it again or restore it from git.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SuiteError(f"{path}: not a {FORMAT} file; freeze it again with this version of metabench.")
    return doc


def load_suite(
    name_or_path: str | os.PathLike[str], sources: Mapping[str, Source] | Sequence[Source] | None = None
) -> Suite:
    """Read a suite by name (shipped in ``episodes/suites``) or path, check its hash and, given sources, their specs."""
    path = _resolve(name_or_path)
    doc = _read_doc(path)
    actual = _canonical_hash(doc)
    if doc.get("content_hash") != actual:
        raise SuiteError(
            f"{path}: content hash mismatch (the file says {str(doc.get('content_hash'))[:12]}, its contents hash "
            f"to {actual[:12]}); it was edited or damaged, so restore it from git or freeze it again."
        )
    try:
        sampler = SamplerConfig(**doc["sampler"])
        plans = tuple(plan_from_json(i, e, str(path)) for i, e in enumerate(doc["episodes"]))
        suite = Suite(
            name=str(doc["name"]),
            split=parse_split(doc["split"]),
            sampler=sampler,
            seed=int(doc["seed"]),
            n_per_source=int(doc["n_per_source"]),
            image_size=None if doc["image_size"] is None else int(doc["image_size"]),
            fingerprints={str(s["name"]): str(s["spec_fingerprint"]) for s in doc["sources"]},
            plans=plans,
            content_hash=actual,
            path=path,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, SuiteError):
            raise
        raise SuiteError(f"{path}: a field is missing or malformed ({e!r}); freeze the suite again.") from None
    if sources is not None:
        suite.check_sources(sources)
    return suite


class SuiteEpisodeSet(EpisodeSet):
    """The episodes of a frozen suite as a map-style dataset: an ``EpisodeSet`` that reads plans instead of sampling.

    Args:
        suite: a loaded suite.
        sources: the sources it was frozen on (checked by spec fingerprint).
        image_size: output side length; default the suite's (None there: native size).
        only: evaluate these sources of the suite only (default all, in the suite's order).
        max_per_source: keep the first this many episodes of each source (a quicker, nested subset).
    """

    def __init__(
        self,
        suite: Suite,
        sources: Mapping[str, Source] | Sequence[Source],
        image_size: int | None = None,
        only: Sequence[str] | None = None,
        max_per_source: int | None = None,
    ) -> None:
        names = list(only) if only is not None else suite.source_names
        suite.check_sources(sources, names)
        given = _by_name(sources)
        self.suite = suite
        keep = set(names)
        taken: Counter[str] = Counter()
        self.plans = []
        for plan in suite.plans:
            taken[plan.source] += 1
            if plan.source in keep and (max_per_source is None or taken[plan.source] <= max_per_source):
                self.plans.append(plan)
        super().__init__([given[n] for n in names], suite.split, suite.sampler, n_episodes=suite.n_per_source,
                         seed=suite.seed, image_size=image_size if image_size is not None else suite.image_size)

    def __len__(self) -> int:
        return len(self.plans)

    def describe(self, index: int) -> EpisodePlan:
        """The frozen plan ``index`` (``plan.index`` keeps its position in the whole suite)."""
        if not 0 <= index < len(self.plans):
            raise IndexError(f"Episode {index} is out of range for suite {self.suite.name} ({len(self.plans)}).")
        return self.plans[index]


# -- the CLI's entry ----------------------------------------------------------------------------
def freeze_named(
    name: str,
    *,
    n: int | None = None,
    seed: int = 0,
    sources: Sequence[str | Source] | None = None,
    split: Split | str | None = None,
    sampler_cfg: SamplerConfig | None = None,
    image_size: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Suite:
    """``metabench episodes freeze --suite NAME [--n N] [--seed S]``: freeze a named recipe, or a custom suite.

    A name from ``RECIPES`` supplies sources, split and n; any of them can be overridden.
    Another name needs ``sources`` and ``split``. Names are built with the source registry's defaults.
    """
    from episodes.readers import SOURCES

    recipe = RECIPES.get(name)
    if recipe is None and (sources is None or split is None):
        raise SuiteError(f'Suite "{name}" has no recipe ({", ".join(RECIPES)}){suggest(name, list(RECIPES))}; '
                         "give its sources and split to freeze a new one.")
    chosen = sources if sources is not None else recipe.sources  # type: ignore[union-attr]
    built = [SOURCES.get(s)() if isinstance(s, str) else s for s in chosen]
    return freeze_suite(
        name,
        {s.name: s for s in built},
        split if split is not None else recipe.split,  # type: ignore[union-attr]
        sampler_cfg if sampler_cfg is not None or recipe is None else recipe.sampler,
        n if n is not None else recipe.n,  # type: ignore[union-attr]
        seed,
        image_size,
        directory=directory,
    )
