"""The report as one self-contained HTML file: charts embedded as base64 PNG, plus the tables.

Everything is rendered through Jinja2 with autoescape on, because campaign names, step
ids, owners and touchpoints can carry text a lead or a marketer typed. A strict
Content-Security-Policy (no scripts, images only from ``data:``) is a second fence: even
an escaping mistake could not run code or load anything from the network.
"""

from __future__ import annotations

import base64
import re
from dataclasses import asdict
from pathlib import Path

from jinja2 import Environment

from nurture.reporting.charts import funnel_png, transitions_png
from nurture.reporting.report import Report, Table, report_tables

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem;
         color: #1d2733; padding: 0 1rem; }
  h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
  table { border-collapse: collapse; width: 100%; font-size: .9rem; }
  th, td { border-bottom: 1px solid #dde3ea; padding: .3rem .5rem; text-align: left; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  th { background: #f2f5f8; }
  .charts { display: flex; flex-wrap: wrap; gap: 1.5rem; }
  .charts figure { margin: 0; }
  .charts img { max-width: 100%; border: 1px solid #dde3ea; }
  .note { color: #5b6776; font-size: .85rem; }
  .status-humming { color: #2e7d32; } .status-experimenting { color: #b26a00; }
  .status-thrashing { color: #c62828; }
  pre { background: #f2f5f8; padding: .8rem; overflow-x: auto; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="note">{{ subtitle }}</p>
<section class="charts">
{% for chart in charts %}
  <figure>
    <img id="{{ chart.id }}" alt="{{ chart.alt }}" src="data:image/png;base64,{{ chart.data }}">
    <figcaption class="note">{{ chart.alt }}</figcaption>
  </figure>
{% endfor %}
</section>
{% for table in tables %}
<section>
  <h2>{{ table.title }}</h2>
  {% if table.rows %}
  <table>
    <thead><tr>{% for col in table.columns %}
      <th class="{{ 'num' if table.numeric[loop.index0] else '' }}">{{ col }}</th>
    {% endfor %}</tr></thead>
    <tbody>
    {% for row in table.rows %}
      <tr>{% for cell in row %}
        <td class="{{ 'num' if table.numeric[loop.index0] else '' }}
{%- if cell in statuses %} status-{{ cell }}{% endif %}">{{ cell }}</td>
      {% endfor %}</tr>
    {% endfor %}
    </tbody>
  </table>
  {% else %}
  <p class="note">No data in this period.</p>
  {% endif %}
  {% if table.note %}<p class="note">{{ table.note }}</p>{% endif %}
</section>
{% endfor %}
{% if promotions %}
<section>
  <h2>Winners to promote</h2>
  <p class="note">Change these steps in the campaign YAML to keep the winning variant.</p>
  <pre>{% for p in promotions %}{{ p }}
{% endfor %}</pre>
</section>
{% endif %}
</body>
</html>
"""

# Control characters (TAB, LF and CR aside) and lone surrogates are no text: HTML calls
# them parse errors and a surrogate cannot even be written as UTF-8. Lead values lose them
# before they are escaped.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _finalize(value: object) -> object:
    if isinstance(value, str) and _NOT_TEXT.search(value):
        return _NOT_TEXT.sub("\ufffd", value)
    return value


_ENV = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True, finalize=_finalize)
_NUMERIC = re.compile(r"[-+]?[\d,]*\.?\d+%?")


def _numeric_columns(table: Table) -> list[bool]:
    """Columns whose every filled cell is a number are right-aligned."""
    return [
        bool(table.rows) and all(_NUMERIC.fullmatch(row[i]) or row[i] == "-" for row in table.rows)
        for i in range(len(table.columns))
    ]


def render_html(report: Report) -> str:
    """The report as one HTML document with its charts inlined."""
    since = report.period.since.isoformat() if report.period.since else "the start"
    until = report.period.until.isoformat() if report.period.until else "now"
    scope = f"campaign {report.campaign}" if report.campaign else "all campaigns"
    charts = [
        {
            "id": "funnel-chart",
            "alt": "Funnel: leads entering each stage",
            "data": base64.b64encode(funnel_png(report)).decode("ascii"),
        },
        {
            "id": "transitions-chart",
            "alt": "Stage transitions in the period",
            "data": base64.b64encode(transitions_png(report)).decode("ascii"),
        },
    ]
    return _ENV.from_string(_TEMPLATE).render(
        title=f"Nurture report: {scope}",
        subtitle=f"From {since} to {until}; breakdown by {report.by}.",
        charts=charts,
        tables=[
            {**asdict(table), "numeric": _numeric_columns(table)} for table in report_tables(report)
        ],
        statuses={"humming", "experimenting", "thrashing"},
        promotions=[ab.promotion for ab in report.ab_tests if ab.promotion],
    )


def write_html(report: Report, path: Path) -> Path:
    """Write the HTML report to ``path`` (parent folders created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
