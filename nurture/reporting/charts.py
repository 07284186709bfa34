"""Report charts as PNG bytes: a stage funnel and a stage-transition matrix.

matplotlib runs headless here: the Agg canvas is used directly, so no GUI backend and
no global ``pyplot`` state are involved (safe in threads and in Prefect workers).
"""

from __future__ import annotations

import io
import re
import warnings

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nurture.reporting.report import Report

_BAR = "#3b6ea8"
_DROP = "#c8553d"
_UNDRAWABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _plain(text: str) -> str:
    """A label matplotlib draws as written: every ``$`` escaped, so a stage name such as
    ``$100k+`` or ``$x^$`` is never parsed as math text (which can fail the whole chart).

    With no unescaped ``$`` left, matplotlib treats the string as plain text and only turns
    each ``\\$`` back into ``$``. Control characters and lone surrogates are shown as
    ``?``: they have no glyph, and FreeType refuses a surrogate outright.
    """
    text = _UNDRAWABLE.sub("?", text)
    return text.replace("$", "\\$")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # A label in a script the bundled font lacks (a CJK owner name) is drawn as boxes;
        # one warning per missing glyph per chart would only flood the logs.
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def funnel_png(report: Report) -> bytes:
    """Leads that entered each pipeline stage in the period, with stage-to-next conversion."""
    rows = [r for r in report.stages if r.next_stage is not None or r.entered or r.still_in_stage]
    main = [r for r in rows if r.stage not in ("lost", "recycled")]
    fig = Figure(figsize=(8, 0.6 * max(len(main), 1) + 1.4))
    ax = fig.add_subplot()
    labels = [_plain(r.label) for r in main]
    values = [r.entered for r in main]
    ys = list(range(len(main)))[::-1]
    top = max(values, default=0) or 1
    ax.barh(ys, values, color=_BAR, height=0.6)
    for y, r in zip(ys, main, strict=True):
        note = f"{r.entered}"
        if r.conversion_to_next is not None:
            note += f"   -> {r.conversion_to_next:.0%} to next"
        ax.text(r.entered + top * 0.01, y, note, va="center", fontsize=9)
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel("leads entering the stage")
    ax.set_title("Funnel: leads entering each stage")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png(fig)


def transitions_png(report: Report) -> bytes:
    """A from-stage x to-stage matrix of the transitions in the period, counts annotated."""
    stage_order = [r.stage for r in report.stages]
    seen_from = {t.from_stage for t in report.transitions}
    seen_to = {t.to_stage for t in report.transitions}
    sources = [s for s in ["(capture)", *stage_order] if s in seen_from]
    sources += sorted(seen_from - set(sources))
    targets = [s for s in stage_order if s in seen_to] + sorted(seen_to - set(stage_order))
    fig = Figure(figsize=(1.1 * max(len(targets), 2) + 2.5, 0.55 * max(len(sources), 2) + 1.8))
    ax = fig.add_subplot()
    if not sources:
        ax.text(0.5, 0.5, "no transitions in this period", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    grid = [[0] * len(targets) for _ in sources]
    for t in report.transitions:
        grid[sources.index(t.from_stage)][targets.index(t.to_stage)] = t.count
    peak = max(max(row) for row in grid) or 1
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=peak * 1.2, aspect="auto")
    for i, row in enumerate(grid):
        for j, n in enumerate(row):
            if n:
                colour = "white" if n > peak * 0.6 else "black"
                ax.text(j, i, str(n), ha="center", va="center", fontsize=9, color=colour)
    ax.set_xticks(range(len(targets)), [_plain(t) for t in targets], rotation=30, ha="right")
    ax.set_yticks(range(len(sources)), [_plain(s) for s in sources])
    ax.set_xlabel("to stage")
    ax.set_ylabel("from stage")
    ax.set_title("Stage transitions in the period")
    return _png(fig)
