"""The campaign page as HTML: rendered on the server, charts in inline SVG, no script, no build step."""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from typing import Any

from airflow_provider_pepipost.status.model import DELIVERY_STATUS_MEANINGS, TASK_STATE_MEANINGS
from airflow_provider_pepipost.status.reports import FAILED_LISTED, CampaignReport, Cost, Latency

_COLORS = {"sent": "#128c7e", "delivered": "#25d366", "read": "#34b7f1", "failed": "#d9534f"}

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:20px;color:#1f2933}h1{font-size:20px;margin:0 0 4px}
h2{font-size:16px;margin:22px 0 8px}.sub{color:#52606d}table{border-collapse:collapse;margin:4px 0}
td,th{padding:3px 10px;border-bottom:1px solid #e4e7eb;text-align:left}td.n{text-align:right;
font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid
#e4e7eb;border-radius:6px;padding:8px 14px;min-width:90px}.card b{display:block;font-size:22px}
a.button{display:inline-block;padding:6px 12px;border:1px solid #128c7e;border-radius:4px;color:#128c7e;
text-decoration:none}svg text{font:11px system-ui,sans-serif;fill:#52606d}dl.legend dt{font-weight:600}
dl.legend dd{margin:0 0 4px 16px;color:#52606d}
"""


def render_page(report: CampaignReport, *, title: str, scope: str, csv_url: str) -> str:
    """The whole page: what the task did with each row, what the phones reported, what it cost."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1><div class='sub'>{escape(scope)}</div>",
    ]
    if not report.tasks:
        parts.append(
            "<p id='empty'>No WhatsApp messages were sent by this run or task (nothing in the status store).</p>"
        )
        return "".join(parts) + "</body></html>"
    parts.append(f"<h2>What the task did with each row <span class='sub'>({report.rows:,} rows)</span></h2>")
    parts.append(_cards(report.states, "states", "data-state"))
    parts.append(f"<h2>What the phones reported <span class='sub'>({report.messages:,} messages)</span></h2>")
    parts.append(_cards(report.statuses, "statuses", "data-status"))
    reached = [(s, report.reached(s)) for s in ("sent", "delivered", "read")] + [
        ("failed", report.statuses.get("failed", 0))
    ]
    parts.append("<div class='sub'>Messages that got at least this far</div>")
    parts.append(_bar_chart(reached, "funnel-chart"))
    parts.append(_cost(report.cost))
    parts.append(f"<p><a class='button' id='csv' href='{escape(csv_url)}'>Download one row per recipient (CSV)</a></p>")

    parts.append("<h2>Time from send to status</h2><table id='latency'><tr><th></th><th>messages</th>")
    parts.append("<th>median</th><th>90th percentile</th></tr>")
    for name, latency in (("delivered", report.to_delivered), ("read", report.to_read)):
        parts.append(
            f"<tr data-latency='{name}'><td>to {name}</td><td class='n'>{latency.count:,}</td>"
            f"<td class='n'>{_seconds(latency.median)}</td><td class='n'>{_seconds(latency.p90)}</td></tr>"
        )
    parts.append("</table>")
    parts.append(_histogram(report.to_delivered, "to delivered"))

    if report.timeline:
        parts.append(f"<h2>Delivered over time</h2><div class='sub'>one bar per {_seconds(report.timeline_step)}</div>")
        clock = _clock_format(report.timeline_step, len(report.timeline))
        bars = [(_clock(start, clock), n) for start, n in report.timeline]
        parts.append(_bar_chart(bars, "timeline", small_labels=True))

    parts.append("<h2>Refused by the vendor</h2>")
    parts.append(_table(["code", "message", "rows"], [(c, m, n) for c, m, n in report.refusals], "refusals"))
    parts.append("<h2>Failed on the phone's side</h2>")
    parts.append(_table(["remark", "messages"], report.failures, "failures"))
    parts.append("<h2>Failed recipients</h2>")
    rows = [(r["task"], r["row"], r["recipient"], r["kind"], r["reason"]) for r in report.failed_recipients]
    if rows:
        shown = f"the first {len(rows):,}; the CSV lists every one" if len(rows) >= FAILED_LISTED else f"{len(rows):,}"
        parts.append(f"<div class='sub'>{shown}, refused rows first</div>")
        parts.append(_table(["task", "row", "number", "outcome", "reason"], rows, "failed-recipients"))
    else:
        parts.append("<p class='sub' id='failed-recipients'>No recipient was refused and no message failed.</p>")
    parts.append(_legend())
    return "".join(parts) + "</body></html>"


def _cards(counts: dict[str, int], block_id: str, attribute: str) -> str:
    cards = "".join(
        f"<div class='card' title='{escape(_meaning(name))}'><b {attribute}='{escape(name)}'>{count:,}</b>"
        f"{escape(name.replace('_', ' '))}</div>"
        for name, count in counts.items()
    )
    return f"<div class='cards' id='{block_id}'>{cards}</div>"


def _meaning(name: str) -> str:
    return TASK_STATE_MEANINGS.get(name) or DELIVERY_STATUS_MEANINGS.get(name) or "a status the provider does not know"


def _cost(cost: Cost) -> str:
    parts = ["<h2>What it cost</h2><table id='cost'><tr><th>category</th><th>billable messages</th></tr>"]
    lines = [*sorted(cost.billable.items()), ("not billable", cost.not_billable), ("not reported", cost.not_reported)]
    for category, count in lines:
        name = escape(category)
        parts.append(f"<tr data-category='{name}'><td>{name}</td><td class='n'>{count:,}</td></tr>")
    parts.append("</table>")
    if cost.currency is not None and cost.estimated is None:  # a rate card, and no pricing reported at all
        parts.append(
            "<p id='estimated-cost'>Estimated cost: <b>not reported</b> (no report of these messages carried "
            "pricing: webhook v1, or no report yet)</p>"
        )
    elif cost.estimated is not None:
        unpriced = ", ".join(f"{c} ({n:,})" for c, n in sorted(cost.unpriced.items()))
        notes = [f"no rate for {escape(unpriced)}"] if unpriced else []
        notes += [f"{cost.not_reported:,} message(s) not reported"] if cost.not_reported else []
        parts.append(
            f"<p id='estimated-cost'>Estimated cost: <b>{cost.estimated:,.2f} {escape(cost.currency or '')}</b> "
            "(billable messages by the rate card" + "".join(f"; {note}" for note in notes) + ")</p>"
        )
    else:
        parts.append(
            "<p class='sub' id='estimated-cost'>No rate card: give the Pepipost connection an extra "
            "<code>rate_card</code> (a price per billable message by category, and a currency) to see an estimate.</p>"
        )
    parts.append(
        "<div class='sub'>From the pricing webhook v2 reports carry; a message whose reports carry none "
        "(webhook v1, or no report yet) is not reported, not free.</div>"
    )
    return "".join(parts)


def _legend() -> str:
    parts = ["<h2>What the words mean</h2><dl class='legend' id='legend'>"]
    for name, meaning in (*TASK_STATE_MEANINGS.items(), *DELIVERY_STATUS_MEANINGS.items()):
        parts.append(f"<dt>{escape(name.replace('_', ' '))}</dt><dd>{escape(meaning)}</dd>")
    return "".join(parts) + "</dl>"


def _table(headers: list[str], rows: list[tuple[Any, ...]], table_id: str) -> str:
    if not rows:
        return f"<p class='sub' id='{table_id}'>None.</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{'n' if isinstance(v, int) else ''}'>{escape(str(v))}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


def _bar_chart(bars: list[tuple[str, int]], chart_id: str, small_labels: bool = False) -> str:
    width, height, gap = 640, 160, 4
    top = max((n for _, n in bars), default=0) or 1
    bar_width = (width - gap * len(bars)) / max(len(bars), 1)
    shapes = []
    for index, (label, value) in enumerate(bars):
        x = index * (bar_width + gap)
        h = (height - 30) * value / top
        color = _COLORS.get(label, "#25d366")
        shapes.append(
            f"<rect x='{x:.1f}' y='{height - 20 - h:.1f}' width='{bar_width:.1f}' height='{h:.1f}' fill='{color}'>"
        )
        shapes.append(f"<title>{escape(label)}: {value:,}</title></rect>")
        if not small_labels or index % 5 == 0:
            shapes.append(f"<text x='{x:.1f}' y='{height - 5}'>{escape(label)}</text>")
        if not small_labels:
            shapes.append(f"<text x='{x:.1f}' y='{max(height - 24 - h, 10):.1f}'>{value:,}</text>")
    return f"<svg id='{chart_id}' width='{width}' height='{height}' role='img'>{''.join(shapes)}</svg>"


def _histogram(latency: Latency, what: str) -> str:
    if not latency.count:
        return ""
    return f"<div class='sub'>Messages by time {escape(what)}</div>" + _bar_chart(
        latency.histogram, "latency-histogram"
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _clock_format(step: float, bars: int) -> str:
    """A time format fine enough that ``bars`` bars ``step`` seconds apart (``step`` >= 1) all get
    different labels: seconds under a minute a bar, the date once the chart spans a day."""
    if step * bars >= 86400:
        return "%Y-%m-%d" if step >= 86400 else "%m-%d %H:%M"
    return "%H:%M:%S" if step < 60 else "%H:%M"


def _clock(epoch: float, fmt: str) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime(fmt)
