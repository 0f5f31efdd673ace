"""Text forms of the results table (Markdown, LaTeX, CSV, HTML) and of plain frames (Markdown, HTML)."""

from __future__ import annotations

import html
import math

import pandas as pd

from analysis.tables import Column, ResultsTable, TableRow

__all__ = ["CAPTION", "NOT_PRETRAINED_NOTE", "frame_to_html", "frame_to_markdown", "to_csv", "to_html", "to_latex",
           "to_markdown"]

CAPTION = ("Accuracy (%) = mean ± 1.96·σ/√n over episodes (population σ). Averages are plain means of per-source "
           "means. Bold: the best entry and those not significantly worse (|Δ| ≤ 1.96·√(s₁²/n₁+s₂²/n₂)), shown "
           "only where some entry is significantly worse. Ranks: tied entries share the averaged rank.")
NOT_PRETRAINED_NOTE = "† backbone NOT pretrained (random init): these numbers do not measure transfer."


def _cell(row: TableRow, col: Column) -> str:
    est = row.cells.get(col)
    if est is None or math.isnan(est.mean):
        return "–"
    if row.kind == "rank":
        return f"{est.mean:.2f}"
    return f"{100 * est.mean:.2f} ± {100 * est.half_width:.2f}"


def _notes(table: ResultsTable) -> list[str]:
    return [CAPTION] + ([NOT_PRETRAINED_NOTE] if table.not_pretrained else [])


def to_markdown(table: ResultsTable) -> str:
    """A GitHub-flavoured Markdown table with bold cells and the caption below."""
    header = ["Source", *(table.column_name(c) for c in table.columns)]
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" + "---:|" * len(table.columns)]
    for row in table.rows:
        name = row.name if row.kind == "source" else f"**{row.name}**"
        cells = [f"**{_cell(row, c)}**" if c in row.bold else _cell(row, c) for c in table.columns]
        lines.append("| " + " | ".join([_md_escape(name), *cells]) + " |")
    return "\n".join(lines) + "\n\n" + "\n\n".join(_notes(table)) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text).replace("·", r"$\cdot$").replace("†", r"$^\dagger$")


def to_latex(table: ResultsTable) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), one \\midrule after each average row."""
    lines = [r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(["Source", *(_tex(table.column_name(c)) for c in table.columns)]) + r" \\", r"\midrule"]
    for row in table.rows:
        cells = []
        for c in table.columns:
            text = _cell(row, c).replace(" ± ", r" $\pm$ ").replace("–", "--")
            cells.append(rf"\textbf{{{text}}}" if c in row.bold else text)
        lines.append(" & ".join([_tex(row.name), *cells]) + r" \\")
        if row.kind == "average":
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = "\n".join(f"% {n}" for n in _notes(table))
    return notes + "\n" + "\n".join(lines) + "\n"


def to_csv(table: ResultsTable) -> str:
    """Tidy CSV: one line per (row, column) with mean, ci95, episodes, rank, bold, pretrained."""
    return table.long().to_csv(index=False, float_format="%.4f")


def to_html(table: ResultsTable) -> str:
    """An HTML ``<table>``; not-pretrained columns carry a red "NOT PRETRAINED" badge in their header."""
    heads = []
    for c in table.columns:
        badge = ' <span class="np">NOT PRETRAINED</span>' if c[0] in table.not_pretrained else ""
        heads.append(f"<th>{html.escape(table.column_name(c, mark=''))}{badge}</th>")
    body = []
    for row in table.rows:
        cls = f' class="{row.kind}"'
        cells = "".join(f"<td><b>{_cell(row, c)}</b></td>" if c in row.bold else f"<td>{_cell(row, c)}</td>"
                        for c in table.columns)
        body.append(f"<tr{cls}><th>{html.escape(row.name)}</th>{cells}</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in _notes(table))
    return (f"<table><thead><tr><th>Source</th>{''.join(heads)}</tr></thead><tbody>{''.join(body)}"
            f"</tbody></table>{notes}")


def _fmt(value: object, digits: int) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def frame_to_markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    """A plain Markdown table of a frame (no index); floats to ``digits`` places."""
    if frame.empty:
        return "_(no rows)_\n"
    lines = ["| " + " | ".join(_md_escape(str(c)) for c in frame.columns) + " |", "|" + "---|" * frame.shape[1]]
    for values in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_md_escape(_fmt(v, digits)) for v in values) + " |")
    return "\n".join(lines) + "\n"


def frame_to_html(frame: pd.DataFrame, digits: int = 2) -> str:
    """A plain HTML table of a frame (no index); values escaped, floats to ``digits`` places."""
    if frame.empty:
        return "<p><i>(no rows)</i></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v, digits))}</td>" for v in values) + "</tr>"
                   for values in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
