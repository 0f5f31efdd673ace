"""Command line: ``python -m metabench {run,eval,ls}`` (thin: all work happens in library modules)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from episodes.registry import load_plugins
from metabench.cli_data import data_parser, episodes_parser, plugin_arg, source_config_args
from metabench.config import ConfigError

__all__ = ["main"]

log = logging.getLogger("metabench")

OVERRIDES_HELP = (
    "config overrides as dotted key=value pairs, applied last (`metabench config --list` shows every key), e.g. "
    "eval.episodes=100 data.image_size=128 "
    "learner.scale=10 data.sampler.mode=fixed data.sampler.way=5 data.sampler.use_bilevel_hierarchy=false; unknown "
    "keys are an error"
)


def _common_run_args(p: argparse.ArgumentParser) -> None:
    plugin_arg(p)
    p.add_argument("--learner", help="learner name (see `metabench ls learners`); default: pre")
    p.add_argument("--backbone", help="backbone alias (see `metabench ls backbones`); default: vit_small")
    p.add_argument("--weights", help="backbone weights file (safetensors or torch state dict); default: "
                   "package weights, the local hub cache, the hub when reachable, else random init")
    p.add_argument("--config", type=Path, help="YAML file with any subset of the config keys")
    p.add_argument("--preset", help="named settings: cpu (minutes on a laptop CPU), gpu, paper (SMAT/PMF "
                   "Meta-Dataset setting); default: auto (cpu or gpu from the hardware found)")
    p.add_argument("--seed", type=int, help="seed for episodes and initialisation; default 0")
    p.add_argument("--out", help="folder that receives the run folder; default: runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _flags(args: argparse.Namespace) -> dict:
    """Named flags as a nested config dict (only those given, so YAML values are not overwritten)."""
    flags: dict = {}
    for flag, key in (("learner", "learner.name"), ("backbone", "backbone.name"), ("weights", "backbone.weights"),
                      ("preset", "preset"), ("seed", "seed"), ("out", "out_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            section, _, name = key.rpartition(".")
            (flags.setdefault(section, {}) if section else flags)[name] = value
    return flags


def _print_results(run_dir: Path) -> None:
    from rich.console import Console

    from metabench.results import load_run
    from metabench.summary import summary_table

    manifest, frame = load_run(run_dir)
    console = Console()
    console.print(summary_table(frame, manifest))
    console.print(f"Results: {run_dir}")


def cmd_run(args: argparse.Namespace) -> int:
    from metabench.config import load_config

    if args.resume is not None:
        if args.overrides or any(v is not None for v in _flags(args).values()) or args.config:
            raise ConfigError("run --resume continues a run with its saved config; drop the other flags and "
                              "key=value overrides.")
        from metabench.runs import resume_run

        outcome = resume_run(args.resume, progress=not args.quiet)
    else:
        cfg = load_config(args.config, args.overrides, _flags(args))  # a config error stops before torch loads
        from metabench.runs import execute

        outcome = execute(cfg, progress=not args.quiet)
    if not _finish_ranks():
        return 0
    _print_results(outcome.run_dir)
    _write_own_report(outcome.run_dir)
    return 0


def _finish_ranks() -> bool:
    """Under torchrun, wait for every rank and leave the group; True on the rank that reports (rank 0)."""
    from metabench.distributed import is_main, shutdown

    main = is_main()
    shutdown()
    return main


def _write_own_report(run_dir: Path) -> None:
    """``run`` ends with the report of its own run, next to its results."""
    from analysis.report import write_report

    print(f"Report: {write_report([run_dir], run_dir / 'report')}")


def cmd_eval(args: argparse.Namespace) -> int:
    from metabench.config import load_config

    if args.run is not None:
        if args.learner or args.backbone or args.config:
            raise ConfigError("eval --run takes its learner, backbone and config from the run folder; "
                              "change settings with key=value overrides instead.")
        from metabench.runs import eval_saved_run

        outcome = eval_saved_run(args.run, args.overrides, modes=args.mode, steps=args.steps, progress=not args.quiet)
    else:
        cfg = load_config(args.config, [*args.overrides, "train.episodes=0"], _flags(args))
        from metabench.runs import execute

        outcome = execute(cfg, progress=not args.quiet, modes=args.mode, steps=args.steps)
    if not _finish_ranks():
        return 0
    _print_results(outcome.run_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from metabench.sweep import parse_axes, run_sweep

    outcome = run_sweep(parse_axes(args.over), config=args.config, overrides=args.overrides, flags=_flags(args),
                        name=args.name, progress=not args.quiet)
    from analysis.report import write_report

    report = write_report(outcome.run_dirs, outcome.report_dir, sweep_key=outcome.sweep_key,
                          sweep_group=outcome.sweep_group)
    print(f"Sweep: {outcome.sweep_dir} ({len(outcome.run_dirs)} runs)")
    print(f"Report: {report}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from metabench.catalog import catalog

    rows = catalog(args.what)
    if args.what == "sources" and (args.config or args.overrides):
        from episodes.configured import describe
        from metabench.config import load_data_config

        data, _ = load_data_config(args.config, args.overrides)
        rows = [{"name": n, "description": describe(n, s)} for n, s in data.sources.items()] + rows
    table = Table(title=args.what)
    for col in rows[0] if rows else ["name"]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from metabench.config import DEFAULT_LEARNER, load_config
    from metabench.config_help import config_keys

    flags: dict = {"learner": {"name": args.learner or DEFAULT_LEARNER}}
    if args.preset:
        flags["preset"] = args.preset
    cfg = load_config(flags=flags)
    if not sys.stdout.isatty():  # piped: one plain line per key, easy to grep
        for row in config_keys(cfg):
            print(f"{row['key']} ({row['type']}) = {row['default']}" + (f"  # {row['help']}" if row["help"] else ""))
        return 0
    table = Table(title=f"config keys (learner {cfg.learner.name}, preset {cfg.preset}; set any as key=value)")
    for col in ("key", "type", "value", "help"):
        table.add_column(col, overflow="fold")
    for row in config_keys(cfg):
        table.add_row(row["key"], row["type"], row["default"], row["help"])
    Console().print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    path = write_report(args.runs, args.out, baseline=args.baseline, sweep_key=args.sweep_key)
    print(f"Report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metabench",
                                     description="Few-shot transfer benchmark for vision foundation models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="meta-train a learner (when it has a training phase), then evaluate it",
                         description="Meta-train (train.episodes > 0) then evaluate on the evaluation sources; "
                         "writes runs/<run_id>/ (manifest.json, config.yaml, episodes.parquet) and prints a table.")
    _common_run_args(run)
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a killed or interrupted run from its last checkpoint (same results as an "
                     "uninterrupted run)")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="evaluate a saved run, or a learner on a backbone with no training",
                        description="With --run DIR: evaluate that run again (its config plus overrides) and "
                        "append the rows to its results. Without: like `run` with train.episodes=0.")
    ev.add_argument("--run", type=Path, help="a run folder written by `metabench run`")
    ev.add_argument("--mode", nargs="+", choices=["zero_shot", "full", "lora"],
                    help="evaluation protocols: zero_shot (prototypes, no gradient step), full (fine-tune the whole "
                    "task model on the support set), lora (fine-tune LoRA adapters); default: eval.modes or the "
                    "learner's own default")
    ev.add_argument("--steps", nargs="+", type=int, help="fine-tuning steps; each fine-tuning mode runs once per "
                    "positive value (zero_shot always runs with 0 steps); default: eval.steps")
    _common_run_args(ev)
    ev.set_defaults(func=cmd_eval)

    sw = sub.add_parser("sweep", help="run one learner over a grid of config values, then report the trade-off",
                        description="Run every combination of the --over values (one run folder each, under "
                        "<out>/<name>/), then write a report whose trade-off figure plots ID vs OOD accuracy "
                        "per setting. Re-running with the same --name skips finished settings.")
    sw.add_argument("--over", action="append", required=True, metavar="KEY=V1,V2,...",
                    help="a swept config key and its values, e.g. learner.sparsity=0.5,0.8,0.9; a second --over "
                    "makes a grid (one line per value of it in the figure)")
    sw.add_argument("--name", help="sweep folder name under --out (default: sweep-<time>-<learner>-<backbone>-<keys>); "
                    "reuse it to resume")
    _common_run_args(sw)
    sw.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="tables, figures and an HTML/Markdown report from run folders",
                         description="Read run folders (results only) and write report.html (self-contained), "
                         "report.md, tables (Markdown, LaTeX, CSV) and figures (PNG, SVG) to --out.")
    rep.add_argument("runs", nargs="+", type=Path, help="run folders written by `metabench run`")
    rep.add_argument("--out", type=Path, required=True, help="folder for the report")
    rep.add_argument("--baseline", help="run label that paired comparisons and the speed-up refer to "
                     "(default: the first run)")
    rep.add_argument("--sweep-key", help="dotted config key swept across the runs (default: detected)")
    rep.set_defaults(func=cmd_report, plugin=[])
    episodes_parser(sub)
    data_parser(sub)

    cf = sub.add_parser("config", help="list every config key with its type, value and help",
                        description="Every key a run takes (set it as key=value or in a YAML file), with its value "
                        "under the given learner and preset and the help written beside it in the code.")
    cf.add_argument("--list", action="store_true", help="list the keys (the default action)")
    cf.add_argument("--learner", help="include this learner's own options (learner.*); default: pre")
    cf.add_argument("--preset", help="values under this preset (cpu, gpu, paper); default: auto")
    plugin_arg(cf)
    cf.set_defaults(func=cmd_config)

    ls = sub.add_parser("ls", help="list registered learners, backbones or data sources")
    ls.add_argument("what", choices=["learners", "backbones", "sources"], help="which registry to list")
    source_config_args(ls)
    plugin_arg(ls)
    ls.set_defaults(func=cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may sit anywhere (even after a multi-value flag such as --steps): take them out first.
    # (The value of `sweep --over` is KEY=V1,V2 too: it stays with its flag.)
    is_override = [("=" in a and not a.startswith("-") and (i == 0 or argv[i - 1] != "--over"))
                   for i, a in enumerate(argv)]
    overrides = [a for a, o in zip(argv, is_override) if o]
    args = parser.parse_args([a for a, o in zip(argv, is_override) if not o])
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return _run_guarded(args, debug=bool(args.verbose or os.environ.get("METABENCH_DEBUG")))


# --------------------------------------------------------------------------- errors: one line, nothing half-written


def _run_guarded(args: argparse.Namespace, *, debug: bool) -> int:
    """Run the command; bad input or a failed write is one stderr line and exit 2, Ctrl-C exit 130.

    Either way, a run folder the command created but filled with no results is removed, and an
    unfinished one with results is kept, marked "failed" or "interrupted", for ``run --resume``.
    Anything else is a bug: its traceback is shown (as is every traceback with -v or METABENCH_DEBUG).
    """
    from episodes.registry import RegistryError
    from metabench.results import ResultsError, watch_run_folders

    with watch_run_folders() as runs:
        try:
            _load_plugins(args.plugin)
            result = args.func(args)
            if isinstance(result, str):  # a data command's report (metabench/cli_data.py): stdout, exit 0
                if result:
                    print(result)
                return 0
            return result
        except KeyboardInterrupt:
            kept = runs.abandon("interrupted", "stopped with Ctrl-C")
            where = (f"the unfinished run is kept in {kept[0]} (status \"interrupted\"); continue it with "
                     f"`metabench run --resume {kept[0]}`." if kept else "no unfinished run folder was left.")
            print(f"metabench: interrupted (Ctrl-C); {where}", file=sys.stderr)
            return 130
        except (ConfigError, RegistryError, ResultsError, OSError, ValueError) as err:
            message = _message(err)
            kept = runs.abandon("failed", message)
            if debug:
                raise
            if kept:
                message += (f" The unfinished run {kept[0]} keeps its results so far (status \"failed\"); fix the "
                            f"problem, then continue it with `metabench run --resume {kept[0]}`.")
            print(f"metabench: error: {message}", file=sys.stderr)
            return 2
        except BaseException as err:  # a bug: tidy up, then show the traceback
            runs.abandon("failed", f"{type(err).__name__}: {err}")
            raise


def _load_plugins(plugins: list[str]) -> None:
    """Import each plugin; one that cannot be imported is a ConfigError naming it."""
    for plugin in plugins:
        try:
            load_plugins([plugin])
        except (ConfigError, FileNotFoundError):
            raise
        except ImportError as err:
            raise ConfigError(f"Plugin {plugin} cannot be imported ({err}); install it, or pass the path of a "
                              ".py file to --plugin.") from None
        except Exception as err:
            raise ConfigError(f"Plugin {plugin} failed while loading ({type(err).__name__}: {err}); fix it, or "
                              f"leave out --plugin {plugin}.") from None


def _message(err: BaseException) -> str:
    """One line for ``err``; an operating-system error from a library names its file and what to do."""
    from metabench.results import OutputError, write_error

    if isinstance(err, OSError) and not isinstance(err, OutputError) and err.errno is not None:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            err = write_error(err)
        elif err.filename is not None:
            err = OSError(f"{err.filename}: {(err.strerror or str(err)).lower()}; check the path and its permissions.")
    return " ".join(str(err).split())
