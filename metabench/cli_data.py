"""The CLI's data commands: ``episodes`` (freeze, import, ls) and ``data`` (prepare, convert), and the options
every command that only builds sources shares (``--config`` and ``data.*`` overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path

from metabench.config import ConfigError

__all__ = ["cmd_data", "cmd_episodes", "data_parser", "episodes_parser", "plugin_arg", "source_config_args"]


def plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import a .py file or module first, so the learners it registers can be used (repeatable)")


def cmd_episodes(args: argparse.Namespace) -> str:
    """``metabench episodes``; returns what it reports (the CLI prints it)."""
    from episodes.episode import Split
    from episodes.suites import freeze_named, list_suites

    if args.action == "ls":
        return "\n".join(list_suites(args.out))
    if args.action == "import":
        return _import_episodes(args)
    if args.suite is None:
        raise ConfigError("episodes freeze needs --suite NAME (a shipped recipe such as embedded-test, or a new name "
                          "with --sources and --split).")
    from episodes.configured import build_sources
    from episodes.suites import RECIPES
    from metabench.config import load_data_config

    data, given = load_data_config(args.config, args.overrides)
    names = args.sources or (RECIPES[args.suite].sources if args.suite in RECIPES else None)
    sources = list(build_sources(names, data.root, data.sources).values()) if names else None
    suite = freeze_named(args.suite, n=args.n, seed=args.seed, sources=sources,
                         split=Split(args.split) if args.split else None, image_size=args.image_size,
                         directory=args.out, sampler_cfg=data.sampler if "sampler" in given else None)
    return f"Froze suite {suite.name}: {len(suite)} episodes -> {suite.path}"


def _prepare(args: argparse.Namespace) -> str:
    from episodes.prepare import prepare
    from metabench.config import load_data_config

    if not args.inputs:
        raise ConfigError(f"data prepare {args.source} needs --from PATH... (the downloaded archives or folders).")
    data, _ = load_data_config(args.config, args.overrides)
    out = args.out or args.root or data.root
    if out is None:
        raise ConfigError("data prepare needs --out DIR (or data.root=DIR): the folder that receives <source>.h5.")
    summary = prepare(args.source, args.inputs, out, image_size=args.image_size, store=args.store,
                      progress=not args.quiet, allow_missing=args.allow_missing, overwrite=args.overwrite,
                      reencode_jpeg=args.reencode_jpeg)
    return summary.describe()


def _import_episodes(args: argparse.Namespace) -> str:
    from episodes.configured import build_sources
    from episodes.suite_import import import_suite, read_episode_file, referenced_sources
    from metabench.config import load_data_config

    if args.file is None or args.name is None:
        raise ConfigError("episodes import needs the episode file and --name NAME (the suite to write).")
    data, _ = load_data_config(args.config, args.overrides)
    if args.format == "md-dump":
        from episodes.suite_import import import_md_dump

        if args.data_out is None and data.root is None:
            raise ConfigError("episodes import --format md-dump needs --data-out DIR (or data.root=DIR): the folder "
                              "that receives the dumped images as <name>.h5.")
        h5, suite = import_md_dump(args.file, args.name, args.data_out or data.root,
                                   image_size=args.image_size or 84, directory=args.out)
        return (f"Imported suite {suite.name}: {len(suite)} episodes -> {suite.path}; images -> {h5} (evaluate with "
                f"data.sources.{suite.name}.kind=h5 data.sources.{suite.name}.path={h5})")
    _, episodes = read_episode_file(args.file)
    sources = build_sources(referenced_sources(episodes), data.root, data.sources)
    suite = import_suite(args.file, args.name, sources, directory=args.out)
    return f"Imported suite {suite.name}: {len(suite)} episodes -> {suite.path}"


def cmd_data(args: argparse.Namespace) -> str:
    """``metabench data``; returns what it reports (the CLI prints it)."""
    from episodes.convert import convert_configured, convert_named
    from metabench.config import load_data_config

    if args.action == "prepare":
        return _prepare(args)
    data, _ = load_data_config(args.config, [*args.overrides, *([f"data.root={args.root}"] if args.root else [])])
    if args.source in data.sources:
        path = convert_configured(args.source, data.sources[args.source], data.root, args.out,
                                  image_size=args.image_size, store=args.store, progress=not args.quiet)
    else:
        path = convert_named(args.source, data.root, args.out, image_size=args.image_size, store=args.store,
                             progress=not args.quiet)
    return f"Wrote {path}"


def source_config_args(p: argparse.ArgumentParser) -> None:
    """--config and key=value overrides for commands that only build sources (data.root, data.sources, ...)."""
    p.add_argument("--config", type=Path, help="YAML file whose data.root and data.sources define the sources")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data settings, e.g. data.root=DIR data.sources.mine.kind=folder data.sources.mine.root=DIR")


def episodes_parser(sub: argparse._SubParsersAction) -> None:
    ep = sub.add_parser("episodes", help="freeze or list evaluation suites (fixed episode lists)",
                        description="Freeze a list of evaluation episodes (source, classes, images, shots) with a "
                        "content hash, so every learner is compared on the same episodes (eval.suite=NAME).")
    ep.add_argument("action", choices=["freeze", "import", "ls"],
                    help="freeze a suite, import an episode list as one (JSON or CSV: see episodes/suite_import.py), "
                    "or list the known suites")
    ep.add_argument("file", nargs="?", type=Path, help="import: the episode file")
    ep.add_argument("--name", help="import: the name of the suite to write")
    ep.add_argument("--format", choices=["list", "md-dump"], default="list",
                    help="import: an episode list (JSON or CSV, default) or a folder of Meta-Dataset's dumped "
                    "episodes (episode-NNNN-train/test.tfrecords)")
    ep.add_argument("--data-out", help="import --format md-dump: folder for the dumped images (<name>.h5)")
    ep.add_argument("--suite", help="suite name: a recipe (embedded-test, embedded-valid) or a new name")
    ep.add_argument("--n", type=int, help="episodes per source (default: the recipe's, else 600)")
    ep.add_argument("--seed", type=int, default=0, help="seed of the episode stream (default 0)")
    ep.add_argument("--sources", nargs="+", help="source names, for a suite that is not a recipe")
    ep.add_argument("--split", choices=["train", "valid", "test"], help="class split, for a suite that is not a recipe")
    ep.add_argument("--image-size", type=int, help="image size recorded with the suite (default: native)")
    ep.add_argument("--out", help="folder for the suite file (default: the package's episodes/suite_files/)")
    source_config_args(ep)
    plugin_arg(ep)
    ep.set_defaults(func=cmd_episodes)


def data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare Meta-Dataset from its downloads, or convert a source to HDF5",
                          description="prepare: a Meta-Dataset source's raw downloads (archives or folders) to "
                          "<out>/<name>.h5 with Meta-Dataset's class splits and conversion rules, no TensorFlow. "
                          "convert: decode any source once into one HDF5 file (uint8 images or encoded bytes, "
                          "per-class offsets, the spec). Meta-Dataset sources then read <root>/<name>.h5.")
    data.add_argument("action", choices=["prepare", "convert"], help="what to do")
    data.add_argument("source", help="source name (see `metabench ls sources`)")
    data.add_argument("--root", help="data root holding the source (for file-based sources)")
    data.add_argument("--out", help="output file or folder (default: <root>/<source>.h5)")
    data.add_argument("--image-size", type=int, help="resize images to this square size (default: native)")
    data.add_argument("--store", choices=["uint8", "encoded"], default="uint8",
                      help="decoded uint8 arrays (fastest) or the encoded bytes (smallest)")
    data.add_argument("--quiet", action="store_true", help="no progress bar")
    data.add_argument("--from", dest="inputs", nargs="+", type=Path, metavar="PATH",
                      help="prepare: the downloaded archives (.zip, .tar, .tar.gz), unpacked folders or files")
    data.add_argument("--allow-missing", action="store_true",
                      help="prepare: write the classes present when the inputs lack some (default: an error)")
    data.add_argument("--overwrite", action="store_true", help="prepare: replace an existing file made otherwise")
    data.add_argument("--reencode-jpeg", action="store_true",
                      help="prepare: re-encode images as upstream's TFRecords do, so pixels match a TFRecord cache")
    source_config_args(data)
    plugin_arg(data)
    data.set_defaults(func=cmd_data)
