"""Page assembly for ``analysis.report``: provenance, the not-pretrained warning, HTML and Markdown pages."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.figures import FigureResult

__all__ = ["Section", "Skipped", "not_pretrained_runs", "provenance_section", "render_html", "render_markdown"]

NOT_PRETRAINED = "NOT PRETRAINED"
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}th,td{border:1px solid #ccc;padding:2px 6px}
td{text-align:right}tr.average,tr.rank{background:#f3f3f3}.note{font-size:.85em;color:#555}
.np{background:#c00;color:#fff;font-weight:bold;padding:1px 5px;border-radius:3px;font-size:.8em}
.banner{border:3px solid #c00;background:#fee;padding:.6em 1em;font-weight:bold}
figure{margin:1em 0}figcaption{font-size:.85em;color:#444;max-width:900px}img{max-width:100%}
.skipped{color:#777;font-style:italic}pre{background:#f6f6f6;padding:.5em;overflow:auto;font-size:.8em}
"""


@dataclass
class Section:
    title: str
    html: str
    md: str


@dataclass(frozen=True)
class Skipped:
    """A figure that was not drawn, and why (shown in the report instead of an empty plot)."""

    name: str
    reason: str


def not_pretrained_runs(manifests: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Run ids whose backbone was not loaded from pretrained weights (random init)."""
    return [r for r, m in manifests.items() if not m.get("backbone", {}).get("pretrained", False)]


def _provenance(manifest: Mapping[str, Any], label: str) -> list[tuple[str, str]]:
    bb, git = manifest.get("backbone", {}), manifest.get("git", {})
    sha = f"{git.get('sha') or 'unknown'}{' (dirty tree)' if git.get('dirty') else ''}"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))
    return [("label", label), ("status", str(manifest.get("status", "?"))),
            ("created", str(manifest.get("created", "?"))),
            ("run folder", str(manifest.get("_run_dir", ""))),
            ("backbone", f"{bb.get('alias', '?')} = {bb.get('timm_name', '?')}.{bb.get('tag', '')}"),
            ("pretrained", "yes" if bb.get("pretrained") else NOT_PRETRAINED),
            ("weights source", str(bb.get("weights_source"))), ("weights location", str(bb.get("weights_location"))),
            ("weights sha256", str(bb.get("weights_sha256"))), ("weights note", str(bb.get("weights_note") or "")),
            ("git sha", sha), ("versions", versions),
            ("device / precision", f"{manifest.get('device')} / {manifest.get('precision')}"),
            ("seed", str(manifest.get("seed"))), ("argv", " ".join(map(str, manifest.get("argv", []))))]


def _config_text(manifest: Mapping[str, Any]) -> str:
    path = Path(manifest.get("_run_dir", "")) / "config.yaml"
    return path.read_text() if path.is_file() else json.dumps(manifest.get("config", {}), indent=2, default=str)


def provenance_section(manifests: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> Section:
    """Per run: provenance key/values (git sha, versions, weights source) and its config."""
    html_parts, md_parts = [], []
    for run_id, manifest in manifests.items():
        pairs = _provenance(manifest, labels[run_id])
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{'<span class=np>' + NOT_PRETRAINED + '</span>' if v == NOT_PRETRAINED else html.escape(v)}"
                       "</td></tr>" for k, v in pairs)
        config = html.escape(_config_text(manifest))
        html_parts.append(f"<h3>{html.escape(run_id)}</h3><table>{rows}</table>"
                          f"<details><summary>config.yaml</summary><pre>{config}</pre></details>")
        items = "\n".join(f"- **{k}**: {'**' + v + '**' if v == NOT_PRETRAINED else v}" for k, v in pairs)
        md_parts.append(f"### {run_id}\n\n{items}\n\n```yaml\n{_config_text(manifest).rstrip()}\n```\n")
    return Section("Runs and provenance", "".join(html_parts), "\n".join(md_parts))


def _banner(manifests: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    bad = not_pretrained_runs(manifests)
    if not bad:
        return ""
    names = ", ".join(f"{labels[r]} ({r})" for r in bad)
    return (f"{NOT_PRETRAINED}: {names} used a randomly initialised backbone (no pretrained weights were found). "
            "Their results are marked † / NOT PRETRAINED and do not measure transfer from a foundation model.")


def _png_data(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _figures_html(outcomes: Sequence[FigureResult | Skipped]) -> str:
    parts = []
    for item in outcomes:
        if isinstance(item, Skipped):
            parts.append(f"<p class='skipped'>Skipped {html.escape(item.name)}: {html.escape(item.reason)}</p>")
        else:
            name = html.escape(item.name)
            parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{_png_data(item.png)}'>"
                         f"<figcaption><b>{name}.</b> {html.escape(item.caption)}</figcaption></figure>")
    return "".join(parts)


def _figures_md(outcomes: Sequence[FigureResult | Skipped], out: Path) -> str:
    parts = []
    for item in outcomes:
        if isinstance(item, Skipped):
            parts.append(f"_Skipped {item.name}: {item.reason}_\n")
        else:
            rel = Path(os.path.relpath(item.png, out)).as_posix()
            svg = Path(os.path.relpath(item.svg, out)).as_posix()
            parts.append(f"![{item.name}]({rel})\n\n**{item.name}.** {item.caption} ([SVG]({svg}))\n")
    return "\n".join(parts)


def render_html(manifests: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str], sections: Sequence[Section],
                outcomes: Sequence[FigureResult | Skipped]) -> str:
    """The self-contained page: banner, sections, figures (base64 PNG), provenance last."""
    banner = _banner(manifests, labels)
    body = [f"<h1>metabench report</h1><p class='note'>{len(manifests)} run(s); generated "
            f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</p>"]
    if banner:
        body.append(f"<p class='banner'><span class='np'>{NOT_PRETRAINED}</span> {html.escape(banner)}</p>")
    *tables, provenance = sections
    body += [f"<h2>{html.escape(s.title)}</h2>{s.html}" for s in tables]
    body.append(f"<h2>Figures</h2>{_figures_html(outcomes)}")
    body.append(f"<h2>{html.escape(provenance.title)}</h2>{provenance.html}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>metabench report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def render_markdown(manifests: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                    sections: Sequence[Section], outcomes: Sequence[FigureResult | Skipped], out: Path) -> str:
    """The Markdown page: same content, figures as relative links to the files next to it."""
    banner = _banner(manifests, labels)
    parts = ["# metabench report\n", f"> **⚠ {banner}**\n" if banner else ""]
    *tables, provenance = sections
    parts += [f"## {s.title}\n\n{s.md}" for s in tables]
    parts.append(f"## Figures\n\n{_figures_md(outcomes, out)}")
    parts.append(f"## {provenance.title}\n\n{provenance.md}")
    return "\n".join(p for p in parts if p)
