"""Episode-loading throughput and memory of each reader (not a test).

Builds a Meta-Dataset-format copy of the embedded ``noto`` source (725 classes x 20 images,
stored as 105 px greyscale PNGs like Omniglot's records) in a temporary folder, converts it to
packed HDF5 at 84 and 128 px, then times Meta-Dataset variable-way variable-shot training
episodes from each reader (TFRecord, HDF5 cache, embedded array) at 84 and 128 px with 0/1/2
DataLoader workers. Each configuration runs in a fresh process so peak RSS is its own; a
longer run per reader samples RSS every 100 episodes to show whether memory stays flat.

    python benchmarks/pipeline.py --quick [--out benchmarks/results/pipeline.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READERS = ("tfrecord", "hdf5", "embedded")
PNG_SIZE = 105  # Omniglot's stored size: the TFRecord reader really resizes


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prepare(work: Path) -> dict[str, str]:
    """Write the TFRecord copy and the HDF5 caches once (reused when present)."""
    import numpy as np
    from PIL import Image
    from tfrecord.writer import TFRecordWriter

    from episodes.convert import convert_source
    from episodes.readers.embedded import NotoGlyphs
    from episodes.readers.hdf5 import PackedHDF5
    from episodes.readers.tfrecord import MetaDatasetTFRecords

    folder = work / "noto_md"
    if not (folder / "dataset_spec.json").is_file():
        noto = NotoGlyphs()
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(noto.spec.num_classes):
            writer = TFRecordWriter(str(folder / f"{c}.tfrecords"))
            for image in noto.read(c, range(noto.spec.images_per_class[c]))[..., 0]:
                buf = io.BytesIO()
                Image.fromarray(np.asarray(image)).resize((PNG_SIZE, PNG_SIZE), Image.Resampling.BILINEAR).save(
                    buf, format="PNG")
                writer.write({"image": (buf.getvalue(), "byte"), "label": (c, "int")})
            writer.close()
        noto.spec.to_json(folder / "dataset_spec.json")
    paths = {"tfrecord": str(folder)}
    for size in (84, 128):
        h5 = work / f"noto_md-{size}.h5"
        if not h5.is_file():
            convert_source(MetaDatasetTFRecords(folder, image_size=size), h5, progress=False)
        paths[f"hdf5-{size}"] = str(h5)
    lzf = work / "noto_md-84-lzf.h5"
    if not lzf.is_file():
        t0 = time.perf_counter()
        convert_source(PackedHDF5(paths["hdf5-84"]), lzf, compression="lzf", progress=False)
        print(f"lzf conversion from the 84 px cache: {time.perf_counter() - t0:.1f} s", flush=True)
    paths["hdf5_lzf-84"] = str(lzf)
    return paths


def _source(reader: str, size: int, paths: dict[str, str]) -> Any:
    from episodes.readers.embedded import NotoGlyphs
    from episodes.readers.hdf5 import PackedHDF5
    from episodes.readers.tfrecord import MetaDatasetTFRecords

    if reader == "tfrecord":
        return MetaDatasetTFRecords(paths["tfrecord"], image_size=size)
    if reader in ("hdf5", "hdf5_lzf"):
        return PackedHDF5(paths[f"{reader}-{size}"])
    return NotoGlyphs()


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time one (reader, size, workers) configuration in this process."""
    from episodes.loader import EpisodeSet, make_loader

    source = _source(cfg["reader"], cfg["size"], cfg["paths"])
    es = EpisodeSet([source], "train", n_episodes=cfg["episodes"] + 1, seed=0, image_size=cfg["size"])
    images, rss, start = 0, [], time.perf_counter()
    for i, ep in enumerate(make_loader(es, num_workers=cfg["workers"])):
        if i == 0:  # worker start-up and first-touch costs are not throughput
            start = time.perf_counter()
            continue
        images += ep.support_x.shape[0] + ep.query_x.shape[0]
        if i % 100 == 0:
            rss.append(round(_rss_mib(), 1))
    seconds = time.perf_counter() - start
    return {
        **{k: v for k, v in cfg.items() if k != "paths"},
        "seconds": round(seconds, 2),
        "episodes_per_s": round(cfg["episodes"] / seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "images_per_episode": round(images / cfg["episodes"], 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # Largest child; a forked worker counts the pages it shares with the main process.
        "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if cfg["workers"] else None,
        "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on the machine skew timings
        "rss_every_100_mib": rss,
    }


def _spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--run-config", json.dumps(cfg)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'reader':<9} {'px':>4} {'workers':>7} {'episodes/s':>10} {'images/s':>9} {'peak RSS MiB':>12} {'worker':>7} {'load':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['reader']:<9} {r['size']:>4} {r['workers']:>7} {r['episodes_per_s']:>10.2f} "
                     f"{r['images_per_s']:>9.0f} {r['peak_rss_mib']:>12.0f} {r['peak_rss_worker_mib'] or 0:>7.0f} "
                     f"{r.get('load_average_1min', 0):>5.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/pipeline.json")
    p.add_argument("--quick", action="store_true", help="fewer episodes (about 5 minutes on 2 cores)")
    p.add_argument("--workdir", help="keep the generated data here (default: a temporary folder)")
    p.add_argument("--run-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_config:
        print(json.dumps(run_one(json.loads(args.run_config))))
        return
    episodes, rss_episodes = (30, 300) if args.quick else (200, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        paths = prepare(work)
        prep = time.perf_counter() - t0
        rows = []
        for reader in READERS:
            for size in (84, 128):
                for workers in (0, 1, 2):
                    cfg = {"reader": reader, "size": size, "workers": workers, "episodes": episodes, "paths": paths}
                    rows.append(_spawn(cfg))
                    print(_table(rows[-1:]).splitlines()[-1], flush=True)
        lzf = [_spawn({"reader": r, "size": 84, "workers": 0, "episodes": episodes, "paths": paths})
               for r in ("hdf5", "hdf5_lzf")]
        flat = [_spawn({"reader": r, "size": 84, "workers": 0, "episodes": rss_episodes, "paths": paths})
                for r in READERS]
        sizes = {k: sum(f.stat().st_size for f in Path(v).rglob("*")) if Path(v).is_dir() else Path(v).stat().st_size
                 for k, v in paths.items()}
    print("\n" + _table(rows))
    print("\nCompression (84 px, 0 workers): " + ", ".join(
        f"{r['reader']} {sizes[r['reader'] + '-84'] / 2**20:.0f} MiB {r['images_per_s']:.0f} images/s" for r in lzf))
    print(f"\nRSS every 100 episodes over {rss_episodes} episodes (84 px, 0 workers), MiB:")
    for r in flat:
        print(f"  {r['reader']:<9} {r['rss_every_100_mib']}  ({r['images_per_s']:.0f} images/s)")
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "data": {"source": "noto as Meta-Dataset TFRecords (725 classes x 20, 105 px PNG)",
                       "prepare_seconds": round(prep, 1), "bytes": sizes},
              "quick": args.quick, "throughput": rows, "compression": lzf, "rss_over_episodes": flat}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
