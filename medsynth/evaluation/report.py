"""A self-contained HTML report of an audit: verdict, figure tables and picture sheets."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from medsynth.evaluation.figures import Figure

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;width:100%;margin-bottom:1.5em}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{background:#e3f4e1;border:1px solid #6a6;padding:1em}
.fail{background:#fbe3e1;border:1px solid #c66;padding:1em}
img{max-width:100%;image-rendering:pixelated}
"""


def _number(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def render_report(
    *,
    title: str,
    figures: Sequence[Figure],
    passed: bool,
    reasons: Sequence[str],
    pictures: Mapping[str, Path],
    facts: Mapping[str, str],
) -> str:
    """Render the audit as one HTML page with pictures embedded (it can be mailed or archived alone).

    Args:
        title: Page title.
        figures: All figures, grouped on the page by the prefix of their names.
        passed: Verdict.
        reasons: Broken limits, when not passed.
        pictures: Caption -> PNG file, shown in order.
        facts: Short key/value lines shown under the title (sizes, run ids, checkpoint hash).

    Returns:
        The HTML text.
    """
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1><ul>"]
    parts += [f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in facts.items()]
    parts.append("</ul>")
    verdict_text = "PASS: every limit of the evaluation config holds" if passed else "FAIL: " + "; ".join(reasons)
    parts.append(f"<div class='{'pass' if passed else 'fail'}'><b>Verdict.</b> {esc(verdict_text)}</div>")
    for group in dict.fromkeys(f.name.split("/", 1)[0] for f in figures):
        parts.append(f"<h2>{esc(group.capitalize())}</h2><table><tr><th>figure</th><th>value</th><th>reference</th>"
                     "<th>better</th><th>meaning</th></tr>")
        for f in figures:
            if f.name.startswith(group + "/"):
                parts.append(f"<tr><td>{esc(f.name.split('/', 1)[1])}</td><td class='num'>{_number(f.value)}</td>"
                             f"<td class='num'>{_number(f.reference)}</td><td>{esc(f.better)}</td><td>{esc(f.meaning)}</td></tr>")
        parts.append("</table>")
    for caption, path in pictures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
