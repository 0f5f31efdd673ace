"""Episode-loading throughput and memory of each reader on the same data (not a test).

Writes the embedded ``noto`` source (725 classes x 20 images, stored as 105 px greyscale PNGs like
Omniglot's records) once as Meta-Dataset TFRecords and as a Meta-Album image folder (labels.csv,
scripts as super-categories), converts it to packed HDF5 at 84 and 128 px, then times Meta-Dataset
variable-way variable-shot training episodes from each reader (TFRecord, HDF5 cache, image folder,
embedded in-RAM array) at 84 and 128 px with 0/1/2 DataLoader workers.

Pairing: one fresh process per (size, workers) times all four readers in alternating order
(A B C D, D C B A), so load swings on a shared machine hit every reader alike and the ratios to the
in-RAM reader hold. Peak RSS over a long run (2,000 episodes) gets a fresh process per reader.

    python benchmarks/pipeline.py --quick [--out benchmarks/results] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    GIB,
    Mode,
    Target,
    configure_threads,
    peak_rss_mib,
    png_bytes,
    print_table,
    print_targets,
    rss_mib,
    spawn,
    suite_result,
    write_class_records,
    write_json,
)

READERS = ("tfrecord", "hdf5", "folder", "embedded")
PNG_SIZE = 105  # Omniglot's stored size: the TFRecord and folder readers really decode and resize
#: episodes per reader and round; rounds; (size, workers) grid; episodes of the long RSS runs per reader
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"episodes": 2, "rounds": 1, "sizes": (84,), "workers": (0,), "rss": {"hdf5": 30}, "lzf": False,
              "scripts": ("latin",), "isolate": False},
    "quick": {"episodes": 10, "rounds": 2, "sizes": (84, 128), "workers": (0, 1, 2),
              "rss": {"hdf5": 2000, "tfrecord": 200}, "lzf": False, "scripts": None, "isolate": True},
    "full": {"episodes": 40, "rounds": 2, "sizes": (84, 128), "workers": (0, 1, 2),
             "rss": dict.fromkeys(READERS, 2000), "lzf": True, "scripts": None, "isolate": True},
}
CACHED_FLOOR = 8000.0  # images/s of the HDF5 cache at 84 px, 0 workers
CONSUMER_MARGIN = 3.0  # the cached path must outrun SMAT meta-training this many times
PEAK_RSS_GIB = 0.6
FLAT_GROWTH_PERCENT = 10.0  # RSS growth allowed from the first half of a long run to the second


def _noto(scripts: tuple[str, ...] | None) -> Any:
    from episodes.readers.embedded import NotoGlyphs

    return NotoGlyphs(scripts=list(scripts) if scripts else None)


def _write_formats(work: Path, scripts: tuple[str, ...] | None) -> tuple[Path, Path]:
    """One PNG per image, written both into per-class TFRecords and into a Meta-Album folder."""
    from episodes.episode import Split

    noto = _noto(scripts)
    tf_dir, folder = work / "noto_md", work / "noto_folder"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tf_dir.mkdir(parents=True, exist_ok=True)
    labels, splits = ["FILE_NAME,CATEGORY,SUPER_CATEGORY"], {s.value: [] for s in Split}
    split_of = {c: s.value for s in Split for c in noto.spec.class_ids(s)}
    for c in range(noto.spec.num_classes):
        pngs = [png_bytes(image, PNG_SIZE) for image in noto.read(c, range(noto.spec.images_per_class[c]))[..., 0]]
        write_class_records(tf_dir / f"{c}.tfrecords", pngs, c)
        for i, png in enumerate(pngs):
            (folder / "images" / f"{c:04d}_{i:02d}.png").write_bytes(png)
            labels.append(f"{c:04d}_{i:02d}.png,c{c:04d},{noto.classes[c][0]}")
        splits[split_of[c]].append(f"c{c:04d}")
    (folder / "labels.csv").write_text("\n".join(labels) + "\n")
    (folder / "splits.json").write_text(json.dumps(splits))
    noto.spec.to_json(tf_dir / "dataset_spec.json")  # written last: its presence marks a complete copy
    return tf_dir, folder


def prepare(work: Path, scripts: tuple[str, ...] | None = None, lzf: bool = False) -> dict[str, str]:
    """Write the TFRecord copy, the image folder and the HDF5 caches once (reused when present)."""
    from episodes.convert import convert_source
    from episodes.readers.hdf5 import PackedHDF5
    from episodes.readers.tfrecord import MetaDatasetTFRecords

    tf_dir, folder = work / "noto_md", work / "noto_folder"
    if not (tf_dir / "dataset_spec.json").is_file():
        tf_dir, folder = _write_formats(work, scripts)
    paths = {"tfrecord": str(tf_dir), "folder": str(folder)}
    for size in (84, 128):
        h5 = work / f"noto_md-{size}.h5"
        if not h5.is_file():
            convert_source(MetaDatasetTFRecords(tf_dir, image_size=size), h5, progress=False)
        paths[f"hdf5-{size}"] = str(h5)
    if lzf:
        h5 = work / "noto_md-84-lzf.h5"
        if not h5.is_file():
            convert_source(PackedHDF5(paths["hdf5-84"]), h5, compression="lzf", progress=False)
        paths["hdf5_lzf-84"] = str(h5)
    return paths


def _imported_rss() -> float:
    """RSS once torch, numpy, h5py, PIL and the readers are imported: the process's cost before any episode."""
    import episodes.loader  # noqa: F401  (torch)
    import episodes.readers.folder  # noqa: F401  (PIL)
    import episodes.readers.hdf5  # noqa: F401  (h5py)
    import episodes.readers.tfrecord  # noqa: F401

    return rss_mib()


def _source(reader: str, size: int, paths: dict[str, str], scripts: tuple[str, ...] | None) -> Any:
    from episodes.readers.folder import ImageFolderSource
    from episodes.readers.hdf5 import PackedHDF5
    from episodes.readers.tfrecord import MetaDatasetTFRecords

    if reader == "tfrecord":
        return MetaDatasetTFRecords(paths["tfrecord"], image_size=size)
    if reader in ("hdf5", "hdf5_lzf"):
        return PackedHDF5(paths[f"{reader}-{size}"])
    if reader == "folder":
        root = Path(paths["folder"])
        return ImageFolderSource(root, name="noto_folder", domain="id", image_size=size,
                                 splits=root / "splits.json", superclasses=True)
    return _noto(scripts)


def _load(source: Any, size: int, workers: int, episodes: int, first: int, rss_every: int = 0) -> dict[str, Any]:
    """Read ``episodes`` training episodes (after one untimed warm-up episode); optional RSS samples."""
    from episodes.loader import EpisodeSet, make_loader

    es = EpisodeSet([source], "train", n_episodes=first + episodes + 1, seed=0, image_size=size)
    subset = range(first, first + episodes + 1)
    images, rss, start = 0, [], time.perf_counter()
    loader = make_loader(_Subset(es, subset), num_workers=workers)
    for i, ep in enumerate(loader):
        if i == 0:  # worker start-up and first-touch costs are not throughput
            start = time.perf_counter()
            continue
        images += ep.support_x.shape[0] + ep.query_x.shape[0]
        if rss_every and i % rss_every == 0:
            rss.append(round(rss_mib(), 1))
    seconds = time.perf_counter() - start
    return {"episodes": episodes, "images": images, "seconds": seconds, "rss_samples_mib": rss}


class _Subset:
    """Episodes ``indices`` of an EpisodeSet, so each round reads fresh episodes (no page-cache replays)."""

    def __init__(self, es: Any, indices: range) -> None:
        self.es, self.indices = es, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.es[self.indices[i]]


def run_throughput(cfg: dict[str, Any]) -> dict[str, Any]:
    """One (size, workers) configuration: every reader, in alternating order, in this process."""
    from benchmarks._common import abba

    baseline = _imported_rss()
    sources = {r: _source(r, cfg["size"], cfg["paths"], cfg.get("scripts")) for r in cfg["readers"]}
    totals = {r: {"episodes": 0, "images": 0, "seconds": 0.0} for r in cfg["readers"]}
    for round_no, order in enumerate(abba(cfg["readers"], cfg["rounds"])):
        for reader in order:
            got = _load(sources[reader], cfg["size"], cfg["workers"], cfg["episodes"], round_no * (cfg["episodes"] + 1))
            for key in ("episodes", "images", "seconds"):
                totals[reader][key] += got[key]
    rows = []
    for reader, t in totals.items():
        rows.append({"reader": reader, "size": cfg["size"], "workers": cfg["workers"], "episodes": t["episodes"],
                     "seconds": round(t["seconds"], 3), "episodes_per_s": round(t["episodes"] / t["seconds"], 2),
                     "images_per_s": round(t["images"] / t["seconds"], 1),
                     "images_per_episode": round(t["images"] / t["episodes"], 1)})
    return {"rows": rows, "baseline_rss_mib": round(baseline, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}


def run_rss(cfg: dict[str, Any]) -> dict[str, Any]:
    """A long run of one reader (84 px, 0 workers), sampling RSS every 1/20 of the run; growth compares
    the highest sample of the second half with that of the first."""
    baseline = _imported_rss()
    source = _source(cfg["reader"], 84, cfg["paths"], cfg.get("scripts"))
    got = _load(source, 84, 0, cfg["episodes"], 0, rss_every=max(1, cfg["episodes"] // 20))
    samples = got["rss_samples_mib"] or [round(rss_mib(), 1)]
    half = max(1, len(samples) // 2)  # freed pages go back to the OS, so compare the halves' highs
    early, late = max(samples[:half]), max(samples[half:] or samples)
    peak = peak_rss_mib()
    return {"reader": cfg["reader"], "episodes": cfg["episodes"],
            "images_per_s": round(got["images"] / got["seconds"], 1),
            "baseline_rss_mib": round(baseline, 1), "peak_rss_mib": round(peak, 1),
            "pipeline_rss_mib": round(peak - baseline, 1), "rss_samples_mib": samples,
            "growth_percent": round(100 * (late - early) / early, 2)}


def _call(kind: str, cfg: dict[str, Any], isolate: bool) -> dict[str, Any]:
    cfg = {**cfg, "kind": kind}
    if isolate:
        return spawn("pipeline", cfg)
    return run_throughput(cfg) if kind == "throughput" else run_rss(cfg)


def _smat_consumption(context: dict[str, Any], out_dir: Path | None) -> tuple[float | None, str]:
    """Images/s SMAT meta-training consumes: the fastest SMAT setting of the largest backbone timed by the
    training suite of this run (else of the last run written to ``out_dir``)."""
    training = context.get("training")
    where = "this run"
    if training is None and out_dir is not None and (out_dir / "training.json").is_file():
        training, where = json.loads((out_dir / "training.json").read_text()), "the last training.json"
    if training is None:
        return None, "run the training suite to measure SMAT's consumption"
    timing = training["measurements"]["timing"]
    alias = "vit_small" if "vit_small" in timing else next(iter(timing))
    best = max((s for name, s in timing[alias]["settings"].items() if name.startswith("smat")),
               key=lambda s: s["images_per_s"])
    rate = best["images_per_s"]
    return rate, f"SMAT {best['setting']} on {alias} consumes {rate:.3g} img/s ({where})"


def _targets(rows: list[dict[str, Any]], rss: list[dict[str, Any]],
             consumption: tuple[float | None, str]) -> list[Target]:
    def speed(reader: str, size: int, workers: int) -> float | None:
        key = (reader, size, workers)
        return next((r["images_per_s"] for r in rows if (r["reader"], r["size"], r["workers"]) == key), None)

    cached = speed("hdf5", 84, 0)
    in_ram = speed("embedded", 84, 0)
    hdf5 = [r["images_per_s"] for r in rows if r["reader"] == "hdf5"]
    per_sec, note = consumption
    targets = [
        Target("HDF5 cache, 84 px, 0 workers", cached, CACHED_FLOOR, "min", "img/s",
               f"{cached / in_ram:.2f}x the in-RAM reader, same process" if cached and in_ram else ""),
        Target("HDF5 cache (slowest config) / SMAT consumption", min(hdf5) / per_sec if per_sec and hdf5 else None,
               CONSUMER_MARGIN, "min", "x", note),
    ]
    for r in rss:
        targets.append(Target(f"{r['reader']}: RSS growth over {r['episodes']} episodes", r["growth_percent"],
                              FLAT_GROWTH_PERCENT, "max", "%",
                              f"samples {min(r['rss_samples_mib']):.0f}..{max(r['rss_samples_mib']):.0f} MiB"))
        targets.append(Target(f"{r['reader']}: peak RSS", r["peak_rss_mib"] / GIB, PEAK_RSS_GIB, "max", "GiB",
                              f"{r['baseline_rss_mib']:.0f} MiB before the first episode (imports)"))
    return targets


def run(mode: Mode = "quick", out_dir: Path | None = None, workdir: Path | None = None,
        context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline suite: throughput grid, long RSS runs, targets (see the module docstring).

    The generated data (about 400 MB) stays in ``workdir``, by default ``$METABENCH_CACHE/benchmark-data``,
    so later runs skip the minute it takes to write.
    """
    from episodes.readers.base import cache_dir

    budget, started = BUDGETS[mode], time.perf_counter()
    work = Path(workdir or cache_dir() / "benchmark-data" / ("smoke" if budget["scripts"] else "noto"))
    t0 = time.perf_counter()
    paths = prepare(work, budget["scripts"], budget["lzf"])
    prep = round(time.perf_counter() - t0, 1)
    base = {"paths": paths, "scripts": budget["scripts"], "episodes": budget["episodes"],
            "rounds": budget["rounds"]}
    rows, configs = [], []
    for size in budget["sizes"]:
        for workers in budget["workers"]:
            got = _call("throughput", {**base, "readers": list(READERS), "size": size, "workers": workers},
                        budget["isolate"])
            rows += got["rows"]
            configs.append({"size": size, "workers": workers, "peak_rss_mib": got["peak_rss_mib"],
                            "baseline_rss_mib": got["baseline_rss_mib"]})
    compression = (_call("throughput", {**base, "readers": ["hdf5", "hdf5_lzf"], "size": 84, "workers": 0},
                         budget["isolate"])["rows"] if budget["lzf"] else [])
    rss = [_call("rss", {**base, "reader": r, "episodes": n}, budget["isolate"]) for r, n in budget["rss"].items()]
    sizes = {k: sum(f.stat().st_size for f in Path(v).rglob("*") if f.is_file()) if Path(v).is_dir()
             else Path(v).stat().st_size for k, v in paths.items()}
    measurements = {"data": {"source": "noto as TFRecords / image folder (725 classes x 20, 105 px PNG)",
                             "prepare_seconds": prep, "bytes": sizes},
                    "throughput": rows, "process_rss": configs, "compression": compression, "rss_over_episodes": rss}
    return suite_result("pipeline", mode, started, measurements,
                        _targets(rows, rss, _smat_consumption(context or {}, out_dir)))


def report(result: dict[str, Any]) -> None:
    """Print the suite's tables."""
    m = result["measurements"]
    print_table("pipeline: Meta-Dataset variable episodes, images/s (readers interleaved per row group)",
                ["reader", "px", "workers", "episodes/s", "images/s", "images/episode"],
                [[r["reader"], r["size"], r["workers"], r["episodes_per_s"], r["images_per_s"], r["images_per_episode"]]
                 for r in m["throughput"] + m["compression"]])
    print_table("pipeline: RSS over a long run (84 px, 0 workers)",
                ["reader", "episodes", "images/s", "before MiB", "peak MiB", "growth %", "samples MiB"],
                [[r["reader"], r["episodes"], r["images_per_s"], r["baseline_rss_mib"], r["peak_rss_mib"],
                  r["growth_percent"], " ".join(f"{s:.0f}" for s in r["rss_samples_mib"])]
                 for r in m["rss_over_episodes"]])
    print_targets("pipeline", result["targets"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for pipeline.json")
    p.add_argument("--quick", action="store_true", help="fewer episodes and long runs for the cached path only")
    p.add_argument("--workdir", help="keep the generated data here (default: $METABENCH_CACHE/benchmark-data)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on a busy machine, else torch's)")
    p.add_argument("--run-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_config:
        cfg = json.loads(args.run_config)
        print(json.dumps(run_throughput(cfg) if cfg["kind"] == "throughput" else run_rss(cfg)))
        return
    configure_threads(args.threads)
    out = Path(args.out)
    result = run("quick" if args.quick else "full", out, Path(args.workdir) if args.workdir else None)
    report(result)
    print(f"wrote {write_json(out / 'pipeline.json', result)}")


if __name__ == "__main__":
    main()
