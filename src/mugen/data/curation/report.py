"""The curation report: `report.html` + PNG charts beside the manifest (seed §2.1).

Shows, for a person deciding whether the thresholds are right:
- the funnel: how many videos / clips remain after each stage (table + bar chart PNG);
- one histogram PNG per score (`score_*` columns) over all scored clips, with the filter's keep
  range drawn as dashed lines where the score has one;
- why clips were dropped (filter reasons, duplicates) and why videos were rejected (reason codes);
- captioning status (how many captioned by the VLM / sidecars, how many uncaptioned and why);
- the tag ontology (most frequent subjects, actions, scenes) and the spread of sampling weights.
Every file is written atomically.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from pathlib import Path

from mugen.atomic import write_atomically, write_text_atomically
from mugen.data.curation.manifest import SCORE_PREFIX, score_columns

REPORT_NAME = "report.html"
REPORT_ASSETS = "report_files"


def _keep_range(score: str, filter_config) -> tuple[float | None, float | None]:
    if filter_config is None:
        return None, None
    name = score[len(SCORE_PREFIX) :]
    if name in ("sharpness", "sharpness_min", "sharpness_max"):
        return tuple(filter_config.sharpness_range)
    if name == "motion":
        return tuple(filter_config.motion_range)
    if name == "aesthetic":
        return filter_config.aesthetic_min, None
    if name == "border_fraction":
        return None, filter_config.border_max_fraction
    if name == "shake":
        return None, filter_config.shake_max
    return None, None


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=90, format="png", bbox_inches="tight"))
    plt.close(figure)


def score_histogram(values: list[float], score: str, path: Path, keep_range=(None, None)) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.2, 2.8))
    finite = [value for value in values if value is not None and math.isfinite(value)]
    axis.hist(finite, bins=min(40, max(5, len(finite) // 2)), color="#4472c4")
    for bound in keep_range:
        if bound is not None:
            axis.axvline(bound, color="#c00000", linestyle="--", linewidth=1)
    axis.set_title(f"{score[len(SCORE_PREFIX):]} ({len(finite)} clips)", fontsize=10)
    axis.set_ylabel("clips")
    _save_figure(figure, path)
    return path


def funnel_chart(counts: dict[str, int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(counts)
    figure, axis = plt.subplots(figsize=(6, 0.35 * len(names) + 0.8))
    axis.barh(names[::-1], [counts[name] for name in names][::-1], color="#70ad47")
    for position, name in enumerate(names[::-1]):
        axis.text(counts[name], position, f" {counts[name]}", va="center", fontsize=8)
    axis.set_xlabel("count")
    axis.set_title("kept after each stage", fontsize=10)
    _save_figure(figure, path)
    return path


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    output_dir: str | Path,
    rows: list[dict],
    rejections: list[dict],
    counts: dict[str, int],
    caption_counts: dict[str, int] | None = None,
    notes: list[str] | None = None,
    filter_config=None,
) -> Path:
    """Write `report.html` and its PNGs into `output_dir`; returns the HTML path."""
    from mugen.data.curation.tags import tag_ontology

    output_dir = Path(output_dir)
    assets = output_dir / REPORT_ASSETS
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mugen curate report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}img{margin:4px}.note{color:#a33}</style></head><body>",
        "<h1>Curation report</h1>",
    ]
    for note in notes or []:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")

    parts.append("<h2>Kept by each stage</h2>")
    parts.append(_table(["stage", "count"], [[name, value] for name, value in counts.items()]))
    funnel_chart(counts, assets / "funnel.png")
    parts.append(f"<img src='{REPORT_ASSETS}/funnel.png' alt='funnel'>")

    scores = score_columns(rows)
    parts.append("<h2>Scores</h2>")
    if not scores:
        parts.append("<p>No scores: the filter stage did not run.</p>")
    for score in scores:
        values = [row.get(score) for row in rows]
        name = score[len(SCORE_PREFIX) :].replace(".", "_")
        score_histogram(values, score, assets / f"hist_{name}.png", _keep_range(score, filter_config))
        parts.append(f"<img src='{REPORT_ASSETS}/hist_{name}.png' alt='{html.escape(name)}'>")
    unavailable = Counter(row.get(f"{SCORE_PREFIX}aesthetic_unavailable") for row in rows if row.get(f"{SCORE_PREFIX}aesthetic_unavailable"))
    for reason, number in unavailable.items():
        parts.append(f"<p class='note'>aesthetic score unavailable for {number} clips: {html.escape(str(reason))}</p>")

    parts.append("<h2>Why clips were dropped</h2>")
    reasons: Counter = Counter()
    for row in rows:
        for reason in row.get("filter_reasons") or []:
            reasons[reason.split(":")[0]] += 1
        if row.get("duplicate_of") is not None:
            reasons[f"duplicate ({row.get('duplicate_reason')})"] += 1
    parts.append(_table(["reason", "clips"], reasons.most_common()) if reasons else "<p>No clip was dropped.</p>")

    parts.append(f"<h2>Rejected videos ({len(rejections)})</h2>")
    if rejections:
        parts.append(_table(["file", "stage", "reason", "message"], [[Path(r["source_path"]).name, r["stage"], r["reason"], r["message"]] for r in rejections]))
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Captions</h2>")
    if caption_counts is None:
        parts.append("<p>The caption stage did not run.</p>")
    else:
        parts.append(_table(["captions", "clips"], [[name, value] for name, value in caption_counts.items()]))

    parts.append("<h2>Tag ontology (kept clips)</h2>")
    ontology = tag_ontology(rows)
    if any(ontology.values()):
        for kind, tag_counts in ontology.items():
            top = list(tag_counts.items())[:20]
            parts.append(f"<h3>{kind} ({len(tag_counts)})</h3>" + _table(["tag", "clips"], top))
    else:
        parts.append("<p>No tags (no captions, or the tags stage did not run).</p>")

    weights = [row["sample_weight"] for row in rows if row.get("keep")]
    if weights:
        parts.append(
            f"<h2>Sampling weights</h2><p>{len(weights)} kept clips; weight min {min(weights):.3g}, "
            f"mean {sum(weights) / len(weights):.3g}, max {max(weights):.3g}.</p>"
        )
    parts.append("</body></html>")
    return write_text_atomically(output_dir / REPORT_NAME, "\n".join(parts))
