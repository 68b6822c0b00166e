"""A self-contained HTML report of an audit: verdict, figure tables and picture sheets."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsynth.evaluation.figures import Figure, GroupVerdict

# One layout for MLflow's artifact pane (an iframe about 500 px wide) and a full window: nothing is
# wider than the page (figure names wrap between their words, paths and hashes anywhere), and the
# figure tables keep four short columns with each figure's meaning on a full-width line below, so
# the meaning is never squeezed to a word per line.
_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 1.5em;max-width:1100px;color:#222;line-height:1.35}
h1{font-size:1.6em;margin:.4em 0}
h2{font-size:1.25em;margin:1.2em 0 .4em}
ul.facts{padding-left:1.2em}
.facts li,.verdict,td.name,td.wrap,code{overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;margin-bottom:1.5em}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.figures tr.figure td{border-bottom:none;padding-bottom:1px}
table.figures td.name{font-weight:600}
table.figures tr.meaning td{color:#555;font-size:13px;padding-top:0}
table.figures td.num{width:6.5em}
table.figures tbody.broken td{background:#fbe3e1}
div.verdict{padding:.8em 1em;margin:1em 0;font-size:15px}
div.pass{background:#e3f4e1;border:1px solid #6a6}
div.fail{background:#fbe3e1;border:1px solid #c66}
tbody.pass td{background:#e3f4e1}
tbody.fail td{background:#fbe3e1}
img{display:block;max-width:100%;height:auto;image-rendering:pixelated;margin-bottom:1em}
@media (max-width:640px){
 body{padding:.5em .75em}
 h1{font-size:1.3em}
 h2{font-size:1.1em}
 th,td{padding:3px 5px;font-size:13px}
 table.figures tr.meaning td{font-size:12px}
}
"""


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return "not computed" if math.isnan(x) else f"{x:.4g}"


def render_report(
    *,
    title: str,
    figures: Sequence[Figure],
    passed: bool,
    reasons: Sequence[str],
    pictures: Mapping[str, Path],
    facts: Mapping[str, str],
    groups: Mapping[str, GroupVerdict] | None = None,
    provenance: Mapping[str, Any] | None = None,
    differential_privacy: Mapping[str, Any] | None = None,
) -> str:
    """Render the audit as one HTML page with pictures embedded (it can be mailed or archived alone).

    The pictures are inlined as ``data:`` URIs, so the page shows them wherever it is opened: from
    disk, downloaded, or in MLflow's artifact pane (which renders the file in a sandboxed frame
    where a relative link to a sibling file would not load). The layout fits that pane (about
    500 px wide) as well as a full window.

    Args:
        title: Page title.
        figures: All figures, grouped on the page by the prefix of their names.
        passed: Verdict.
        reasons: Broken limits, when not passed.
        pictures: Caption -> PNG file, shown in order.
        facts: Short key/value lines shown under the title (sizes, run ids, checkpoint hash).
        groups: The verdict of each group (privacy, realism, utility), shown one by one under the
            overall verdict, which names the groups that failed; their limits are also shown beside
            the figures they bound, and a figure that breaks one is marked.
        provenance: The ``provenance`` block of ``metrics.json`` (what the audit verified), shown
            as a short table with the files' hashes in a collapsed list.
        differential_privacy: The generator's DP record (``differential_privacy`` of
            ``metrics.json``), shown as a table; ``None``: a section saying it was trained without DP.

    Returns:
        The HTML text.
    """
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1><ul class='facts'>",
    ]
    parts += [f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in facts.items()]
    parts.append("</ul>")
    parts += _verdict_html(passed, reasons, groups)
    parts += _dp_html(differential_privacy)
    for group in dict.fromkeys(f.name.split("/", 1)[0] for f in figures):
        parts += _figures_html(group, [f for f in figures if f.name.startswith(group + "/")], (groups or {}).get(group))
    if provenance:
        parts += _provenance_html(provenance)
    for caption, path in pictures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _limit_text(bounds: Mapping[str, float]) -> str:
    """``&ge; 0.7``, ``&le; 4``, or both, for a figure's limits."""
    return ", ".join(f"{'&ge;' if k == 'min' else '&le;'} {v:g}" for k, v in bounds.items())


def _breakable(name: str) -> str:
    """``name`` escaped, with a line-break opportunity after each ``_`` (a long name wraps between its words)."""
    return "_<wbr>".join(html.escape(part) for part in name.split("_"))


def _figures_html(group: str, figures: Sequence[Figure], verdict: GroupVerdict | None) -> list[str]:
    """One group's figures: name, value, reference and limit on one row; which way is better and the
    meaning on a full-width row below. A figure that breaks its limit is marked; each row's id is the
    figure's name (``report.html#privacy/membership_auc`` links to it)."""
    esc = html.escape
    limits = verdict.limits if verdict is not None else {}
    broken = verdict.reasons if verdict is not None else []
    parts = [
        f"<h2>{esc(group.capitalize())}</h2><table class='figures'><thead><tr><th>figure</th><th>value</th>"
        "<th>reference</th><th>limit</th></tr></thead>"
    ]
    for f in figures:
        mark = " class='broken'" if any(reason.startswith(f"{f.name} ") for reason in broken) else ""
        parts.append(
            f"<tbody{mark}><tr class='figure' id='{esc(f.name)}'>"
            f"<td class='name'>{_breakable(f.name.split('/', 1)[1])}</td><td class='num'>{_number(f.value)}</td>"
            f"<td class='num'>{_number(f.reference)}</td><td class='num'>{_limit_text(limits.get(f.name, {}))}</td>"
            f"</tr><tr class='meaning'><td colspan='4'><i>better: {esc(f.better)}.</i> {esc(f.meaning)}"
            f"{f' <b>Not computed:</b> {esc(f.note)}' if f.note and math.isnan(f.value) else ''}</td></tr></tbody>"
        )
    parts.append("</table>")
    return parts


def _verdict_html(passed: bool, reasons: Sequence[str], groups: Mapping[str, GroupVerdict] | None) -> list[str]:
    """The overall verdict (naming the failed groups), then one line per group with its limits."""
    esc = html.escape
    failed = [name for name, g in (groups or {}).items() if not g.passed]
    if passed:
        text = "PASS: every limit of the evaluation config holds"
    else:
        text = f"FAIL ({', '.join(failed)}): " if failed else "FAIL: "
        text += "; ".join(reasons)
    parts = [f"<div class='verdict {'pass' if passed else 'fail'}'><b>Verdict.</b> {esc(text)}</div>"]
    if groups:
        parts.append("<table><thead><tr><th>group</th><th>verdict</th><th>limits</th></tr></thead>")
        for name, g in groups.items():
            limits = "<br>".join(
                f"{esc(figure.split('/', 1)[1])} {_limit_text({k: v})}"
                for figure, bounds in g.limits.items()
                for k, v in bounds.items()
            )
            parts.append(
                f"<tbody class='{'pass' if g.passed else 'fail'}'><tr><td><b>{esc(name)}</b></td>"
                f"<td>{'PASS' if g.passed else 'FAIL'}</td><td class='wrap'>{limits or 'no limits'}</td></tr>"
            )
            if g.reasons:
                parts.append("<tr><td></td><td colspan='2' class='wrap'>broken: " + esc("; ".join(g.reasons)) + "</td></tr>")
            parts.append("</tbody>")
        parts.append("</table>")
    return parts


def _provenance_html(record: Mapping[str, Any]) -> list[str]:
    """What the audit verified: the generator, the dataset, the synthetic manifest and runs, then every file's hash."""
    esc = html.escape
    checkpoint, data, runs = record.get("checkpoint", {}), record.get("data_manifest", {}), record.get("runs", {})
    rows = [
        (
            "generator",
            f"{checkpoint.get('source', '')} ({checkpoint.get('registered_model') or 'not registered'})",
            checkpoint.get("sha256", ""),
        ),
        ("dataset manifest", data.get("path", ""), data.get("sha256", "")),
        ("synthetic manifest", f"{record.get('synthetic_folder', '')}/manifest.csv", record.get("synthetic_manifest_sha256", "")),
    ]
    parts = [
        "<h2>Provenance</h2><p>Every hash below was verified before the audit; re-check the set on disk with "
        "<code>medsynth verify PATH</code>.</p><table><tr><th>what</th><th>where</th><th>SHA-256</th></tr>"
    ]
    parts += [
        f"<tr><td>{esc(a)}</td><td class='wrap'>{esc(str(b))}</td><td><code>{esc(str(c))}</code></td></tr>" for a, b, c in rows
    ]
    parts.append("</table><p>MLflow runs: " + esc(", ".join(f"{k} {v or 'unknown'}" for k, v in runs.items())) + "</p>")
    files = record.get("files", {})
    parts.append(
        f"<details><summary>{len(files)} files in the synthetic folder</summary><table>"
        + "".join(
            f"<tr><td class='wrap'>{esc(str(name))}</td><td><code>{esc(str(sha))}</code></td></tr>" for name, sha in files.items()
        )
        + "</table></details>"
    )
    return parts


_DP_ROWS = (
    ("epsilon", "epsilon spent (lower is more private)"),
    ("delta", "delta of the guarantee"),
    ("unit", "unit of privacy"),
    ("accountant", "accountant"),
    ("noise_multiplier", "noise multiplier"),
    ("sample_rate", "patient sample rate per step"),
    ("max_grad_norm", "clipping norm per patient"),
    ("steps", "noised steps"),
    ("train_patients", "training patients"),
    ("records_per_patient", "records per sampled patient per step"),
)


def _dp_html(record: Mapping[str, Any] | None) -> list[str]:
    """The generator's differential-privacy guarantee, or a line saying it has none."""
    esc = html.escape
    parts = ["<h2>Differential privacy</h2>"]
    if not record:
        return parts + [
            "<p>The generator was trained without differential privacy (trainer.privacy.enabled=false): "
            "the per-sample rules and figures below are its only privacy evidence.</p>"
        ]
    parts.append(
        f"<p>{esc(str(record.get('mechanism', '')))}: the weights reveal at most this much about any one "
        "patient of the training set (all of the patient's records together).</p><table>"
    )
    parts += [f"<tr><td>{esc(label)}</td><td class='num'>{esc(_dp_value(record.get(key)))}</td></tr>" for key, label in _DP_ROWS]
    parts.append("</table>")
    return parts


def _dp_value(value: Any) -> str:
    if value is None:
        return "all"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
