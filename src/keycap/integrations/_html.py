"""The key management page, as HTML: pure functions from what to show to a string.

No template engine and no JavaScript framework: every value goes through
:func:`html.escape`, the page links only its own stylesheet and script (served by
the router, so it works offline and under ``Content-Security-Policy: default-src
'self'``), has no inline style or script, and works without its script (which
makes open dialogs modal and the copy button copy). The usage chart is an inline
SVG drawn here, with the same numbers as a table for screen readers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from html import escape
from urllib.parse import urlencode

from keycap._models import APIKey, BudgetStatus, KeyStatus, Remaining, UsageRow
from keycap._rules import money

#: The choices the create form offers; the router accepts only these.
EXPIRIES: Mapping[str, str] = {
    "": "Never",
    "7d": "In 7 days",
    "30d": "In 30 days",
    "90d": "In 90 days",
    "365d": "In a year",
}
PERIODS: Mapping[str, str] = {"month": "per month", "week": "per week", "day": "per day"}
GRACES: Mapping[str, str] = {
    "0s": "None: the old secret stops at once",
    "1h": "1 hour",
    "24h": "24 hours",
    "7d": "7 days",
}
#: What each confirmed action says before it is done.
ACTIONS: Mapping[str, tuple[str, str]] = {
    "revoke": (
        "Revoke",
        "Every call with this key is refused from now on. This cannot be undone.",
    ),
    "disable": ("Disable", "Calls with this key are refused until you enable it again."),
    "enable": ("Enable", "Calls with this key are accepted again."),
    "roll": (
        "Roll",
        "A new secret is issued for this key; its budgets, limits and history stay. "
        "The old secret keeps working for the grace period you choose.",
    ),
}
CHART_DAYS = 30


@dataclass(frozen=True, slots=True)
class Selected:
    """The key shown in detail: what it can spend, and what it spent per day."""

    key: APIKey
    remaining: Sequence[Remaining]
    usage: Sequence[UsageRow]


@dataclass(frozen=True, slots=True)
class Dialog:
    """An open dialog: ``create`` (the form, with what was typed and why it was
    refused), ``secret`` (a new key's plaintext, shown this once), or one of
    :data:`ACTIONS` to confirm."""

    kind: str
    key: APIKey | None = None
    plaintext: str = field(default="", repr=False)
    values: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class View:
    """Everything the page shows for one request."""

    base: str  # the page's own path, ending in "/"
    org_id: str
    actor: str
    now: datetime
    keys: Sequence[APIKey]
    csrf: str = field(repr=False)
    status: KeyStatus | None = None
    offset: int = 0
    limit: int = 50
    more: bool = False
    selected: Selected | None = None
    dialog: Dialog | None = None
    notice: str | None = None
    error: str | None = None
    title: str = "API keys"
    grantable: frozenset[str] | None = None


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def when(moment: datetime | None, empty: str = "Never") -> str:
    """A UTC time for people, in a ``<time>`` element machines can read."""
    if moment is None:
        return f'<span class="muted">{_e(empty)}</span>'
    utc = moment.astimezone(UTC)
    return f'<time datetime="{_e(utc.isoformat())}">{_e(utc.strftime("%Y-%m-%d %H:%M"))} UTC</time>'


def link(view: View, **query: str | int | None) -> str:
    """The page's URL with ``query`` (None values left out), keeping the filter."""
    params: dict[str, str | int] = {}
    if view.status is not None:
        params["status"] = view.status.value
    if view.offset:
        params["offset"] = view.offset
    params.update({k: v for k, v in query.items() if v is not None})
    params = {k: v for k, v in params.items() if v != ""}
    return view.base + ("?" + urlencode(params) if params else "")


def action_url(view: View, *parts: str) -> str:
    return view.base + "ui/" + "/".join(parts)


def _csrf(view: View) -> str:
    return f'<input type="hidden" name="csrf_token" value="{_e(view.csrf)}">'


def status_badge(status: KeyStatus) -> str:
    return f'<span class="status {_e(status.value)}">{_e(status.value.capitalize())}</span>'


def page(view: View) -> str:
    """The whole page."""
    parts = [
        "<!doctype html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="color-scheme" content="light dark">',
        '<meta name="referrer" content="same-origin">',
        f"<title>{_e(view.title)}</title>",
        f'<link rel="stylesheet" href="{_e(action_url(view, "portal.css"))}">',
        f'<script src="{_e(action_url(view, "portal.js"))}" defer></script>',
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_e(view.title)}</h1>",
        '<p class="lead">Keys let your programs and agents call the API. Each key is shown '
        "once, when it is created; store it like a password.</p>",
    ]
    if view.notice:
        parts.append(f'<p class="notice" role="status">{_e(view.notice)}</p>')
    if view.error:
        parts.append(f'<p class="error" role="alert">{_e(view.error)}</p>')
    parts.append(_toolbar(view))
    parts.append(_table(view))
    if view.selected is not None:
        parts.append(_detail(view, view.selected))
    if view.dialog is not None:
        parts.append(_dialog(view, view.dialog))
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _toolbar(view: View) -> str:
    options = ['<option value="">All</option>'] + [
        f'<option value="{_e(s.value)}"{" selected" if view.status is s else ""}>'
        f"{_e(s.value.capitalize())}</option>"
        for s in KeyStatus
    ]
    return (
        '<div class="bar">'
        f'<form class="filters" method="get" action="{_e(view.base)}">'
        '<label>Status <select name="status">' + "".join(options) + "</select></label>"
        '<button type="submit" class="small">Show</button>'
        "</form>"
        f'<a class="button primary" href="{_e(link(view, dialog="create"))}">Create key</a>'
        "</div>"
    )


def _table(view: View) -> str:
    if not view.keys:
        empty = "No keys yet." if view.status is None and not view.offset else "No keys here."
        return f'<p class="panel">{_e(empty)}</p>'
    rows = []
    for key in view.keys:
        status = key.status_at(view.now)
        chosen = view.selected is not None and view.selected.key.id == key.id
        name = key.name or "(unnamed)"
        actions = [
            f'<a class="button small" href="{_e(link(view, key=key.id))}" '
            f'aria-label="Details of {_e(name)}">Details</a>'
        ]
        if status is not KeyStatus.REVOKED:
            actions.append(
                f'<a class="button small" href="{_e(link(view, key=key.id, dialog="roll"))}" '
                f'aria-label="Roll {_e(name)}">Roll</a>'
            )
            actions.append(
                f'<a class="button small danger" '
                f'href="{_e(link(view, key=key.id, dialog="revoke"))}" '
                f'aria-label="Revoke {_e(name)}">Revoke</a>'
            )
        marked = ' class="selected" aria-current="true"' if chosen else ""
        rows.append(
            f'<tr{marked} data-key-id="{_e(key.id)}">'
            f'<th scope="row">{_e(name)}</th>'
            f"<td><code>{_e(key.start)}…</code></td>"
            f"<td>{status_badge(status)}</td>"
            f"<td>{when(key.created_at)}</td>"
            f"<td>{when(key.last_used_at)}</td>"
            f"<td>{when(key.expires_at)}</td>"
            f'<td class="actions">{" ".join(actions)}</td>'
            "</tr>"
        )
    pages = []
    if view.offset:
        pages.append(
            f'<a href="{_e(link(view, offset=max(0, view.offset - view.limit)))}">Newer keys</a>'
        )
    if view.more:
        pages.append(f'<a href="{_e(link(view, offset=view.offset + view.limit))}">Older keys</a>')
    return (
        "<table>"
        "<caption>Your organization's keys, newest first</caption>"
        "<thead><tr>"
        '<th scope="col">Name</th><th scope="col">Key</th><th scope="col">Status</th>'
        '<th scope="col">Created</th><th scope="col">Last used</th>'
        '<th scope="col">Expires</th><th scope="col"><span class="visually-hidden">'
        "Actions</span></th>"
        "</tr></thead>"
        "<tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + (f'<nav class="pages" aria-label="Pages">{"".join(pages)}</nav>' if pages else "")
    )


def _detail(view: View, selected: Selected) -> str:
    key = selected.key
    status = key.status_at(view.now)
    name = key.name or "(unnamed)"
    action = {KeyStatus.ACTIVE: "disable", KeyStatus.DISABLED: "enable"}.get(status)
    buttons = (
        f'<a class="button small" href="{_e(link(view, key=key.id, dialog=action))}">'
        f"{_e(ACTIONS[action][0])}</a>"
        if action
        else ""
    )
    scopes = ", ".join(key.scopes) if key.scopes else "none"
    parts = [
        '<section class="panel" aria-labelledby="detail-title" id="detail">',
        f'<h2 id="detail-title">{_e(name)} {status_badge(status)}</h2>',
        f"<p><code>{_e(key.start)}…</code> · scopes: {_e(scopes)} · "
        f"{_e(key.use_count)} calls · created by {_e(key.delegated_by or 'an administrator')}</p>",
        f'<div class="row">{buttons}</div>' if buttons else "",
        "<h3>Budgets</h3>",
    ]
    if not selected.remaining:
        parts.append('<p class="muted">No budget: nothing limits what this key spends.</p>')
    for remaining in selected.remaining:
        for budget in remaining.budgets:
            parts.append(budget_bar(budget, view.now))
    meters = sorted({r.meter for r in selected.remaining} | {u.meter for u in selected.usage})
    parts.append(f"<h3>Usage, last {CHART_DAYS} days</h3>")
    if not meters:
        parts.append('<p class="muted">Nothing charged yet.</p>')
    for meter in meters:
        parts.append(usage_chart(selected.usage, meter, view.now.astimezone(UTC).date()))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


_SCOPE_NAMES = {
    "key": "This key",
    "identity": "Its owner",
    "project": "Its project",
    "organization": "The organization",
}


def budget_bar(budget: BudgetStatus, now: datetime) -> str:
    """One budget: a ``<meter>`` of used (and held) against the limit, the numbers,
    and when it resets."""
    ceiling = budget.limit + budget.credit
    taken = budget.used + budget.held
    shown = min(taken, ceiling)
    whose = _SCOPE_NAMES.get(budget.scope, budget.scope)
    period = "lifetime" if budget.period == "lifetime" else f"per {budget.period}"
    label_id = f"budget-{_e(budget.id)}"
    held = f", {money.plain(budget.held)} held" if budget.held else ""
    resets = f"resets {when(budget.reset_at)}" if budget.reset_at is not None else "never resets"
    return (
        '<div class="budget">'
        f'<div id="{label_id}"><strong>{_e(whose)}</strong>: {_e(budget.meter)}, {_e(period)}</div>'
        f'<meter aria-labelledby="{label_id}" min="0" '
        f'max="{_e(money.plain(ceiling) if ceiling else 1)}" '
        f'value="{_e(money.plain(shown))}" high="{_e(money.plain(ceiling * Decimal("0.8")))}" '
        f'optimum="0">{_e(money.plain(taken))} of {_e(money.plain(ceiling))}</meter>'
        f"<div>{_e(money.plain(budget.used))} used{_e(held)} of {_e(money.plain(ceiling))} · "
        f"<strong>{_e(money.plain(budget.remaining))} left</strong> · {resets}</div>"
        "</div>"
    )


def usage_chart(rows: Sequence[UsageRow], meter: str, today: date) -> str:
    """Spending of ``meter`` per day over the :data:`CHART_DAYS` days ending ``today``,
    as an inline SVG bar chart, with a table of the same numbers for screen readers."""
    days = [today - timedelta(days=CHART_DAYS - 1 - i) for i in range(CHART_DAYS)]
    per_day = {r.period: r.amount for r in rows if r.meter == meter}
    amounts = [per_day.get(d.isoformat(), Decimal(0)) for d in days]
    peak = max(amounts)
    total = sum(amounts, Decimal(0))
    width, height, left, bottom, gap = 600, 160, 48, 20, 2
    bar_width = Decimal(width - left) / CHART_DAYS
    plot = height - bottom - 8
    chart_id = f"chart-{_e(meter)}"
    bars = []
    for i, (day, amount) in enumerate(zip(days, amounts, strict=True)):
        if not amount:
            continue
        tall = (amount / peak * plot).quantize(Decimal("0.1")) if peak else Decimal(0)
        tall = max(tall, Decimal(1))
        x = (left + bar_width * i + gap / Decimal(2)).quantize(Decimal("0.1"))
        y = (height - bottom - tall).quantize(Decimal("0.1"))
        bars.append(
            f'<rect class="bar-day" x="{x}" y="{y}" '
            f'width="{(bar_width - gap).quantize(Decimal("0.1"))}" height="{tall}">'
            f"<title>{_e(day.isoformat())}: {_e(money.plain(amount))}</title></rect>"
        )
    summary = f"{money.plain(total)} {meter} in the last {CHART_DAYS} days" + (
        f", at most {money.plain(peak)} in a day" if peak else ""
    )
    table_rows = "".join(
        f"<tr><td>{_e(d.isoformat())}</td><td>{_e(money.plain(a))}</td></tr>"
        for d, a in zip(days, amounts, strict=True)
        if a
    )
    axis = height - bottom
    svg = [
        f'<svg viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-title">{_e(meter)} per day</title>',
        f'<desc id="{chart_id}-desc">{_e(summary)}</desc>',
        f'<line class="axis" x1="{left}" y1="{axis}" x2="{width}" y2="{axis}"/>',
        f'<text x="{left - 6}" y="14" text-anchor="end">{_e(money.plain(peak))}</text>'
        if peak
        else "",
        f'<text x="{left - 6}" y="{axis}" text-anchor="end">0</text>',
        f'<text x="{left}" y="{height - 4}">{_e(days[0].strftime("%b %d"))}</text>',
        f'<text x="{width}" y="{height - 4}" text-anchor="end">'
        f"{_e(days[-1].strftime('%b %d'))}</text>",
        *bars,
        "</svg>",
    ]
    table = (
        "<details><summary>Show as a table</summary><table>"
        f"<caption>{_e(meter)} per day</caption>"
        '<thead><tr><th scope="col">Day (UTC)</th><th scope="col">Amount</th></tr></thead>'
        f"<tbody>{table_rows}</tbody></table></details>"
        if table_rows
        else ""
    )
    return (
        f'<figure class="chart" data-meter="{_e(meter)}" data-total="{_e(money.plain(total))}">'
        + "".join(svg)
        + f"<figcaption>{_e(summary)}.</figcaption>{table}</figure>"
    )


def _dialog(view: View, dialog: Dialog) -> str:
    back = link(view, key=dialog.key.id if dialog.key else None)
    cancel = f'<a class="button" href="{_e(back)}" data-cancel>Cancel</a>'
    if dialog.kind == "secret":
        assert dialog.key is not None
        body = (
            '<h2 id="dialog-title">Your new key</h2>'
            f"<p>For <strong>{_e(dialog.key.name or '(unnamed)')}</strong>.</p>"
            '<p class="warning" role="alert"><strong>Copy it now.</strong> This is the only '
            "time it is shown: it is not stored anywhere you can read it again. If you lose "
            "it, roll the key.</p>"
            '<div class="secret"><label class="visually-hidden" for="new-secret">New key</label>'
            f'<input id="new-secret" readonly value="{_e(dialog.plaintext)}" '
            'autocomplete="off" spellcheck="false">'
            '<button type="button" class="primary" data-copy="new-secret" hidden>Copy</button>'
            "</div>"
            '<p id="new-secret-copied" role="status" aria-live="polite"></p>'
            f'<p><a class="button" href="{_e(link(view, key=dialog.key.id))}" data-cancel>'
            "I stored it</a></p>"
        )
    elif dialog.kind == "create":
        body = '<h2 id="dialog-title">Create a key</h2>' + _create_form(view, dialog, cancel)
    else:
        assert dialog.key is not None
        title, warning = ACTIONS[dialog.kind]
        name = dialog.key.name or "(unnamed)"
        extra = ""
        if dialog.kind == "roll":
            options = "".join(
                f'<option value="{_e(v)}"{" selected" if v == "24h" else ""}>{_e(t)}</option>'
                for v, t in GRACES.items()
            )
            extra = (
                "<label>Old secret keeps working for "
                f'<select name="grace">{options}</select></label>'
            )
        kind = "danger" if dialog.kind in ("revoke", "disable") else "primary"
        if kind == "danger":  # Enter on the opened dialog must not destroy anything
            cancel = cancel.replace(" data-cancel>", " data-cancel autofocus>")
        target = action_url(view, "keys", dialog.key.id, dialog.kind)
        body = (
            f'<h2 id="dialog-title">{_e(title)} {_e(name)}?</h2>'
            f"<p>{_e(warning)}</p>"
            f'<form class="stack" method="post" action="{_e(target)}">'
            f"{_csrf(view)}{extra}"
            f'<div class="row"><button type="submit" class="{kind}">{_e(title)} key</button>'
            f"{cancel}</div></form>"
        )
    return (
        '<dialog open aria-modal="true" aria-labelledby="dialog-title" '
        f'data-dialog="{_e(dialog.kind)}">{body}</dialog>'
    )


def _create_form(view: View, dialog: Dialog, cancel: str) -> str:
    values = dialog.values

    def options(choices: Mapping[str, str], chosen: str) -> str:
        return "".join(
            f'<option value="{_e(v)}"{" selected" if v == chosen else ""}>{_e(t)}</option>'
            for v, t in choices.items()
        )

    grantable = (
        "Scopes you may grant: " + ", ".join(sorted(view.grantable)) + "."
        if view.grantable is not None
        else "Separate scopes with spaces, as in chat:write files:read."
    )
    error = f'<p class="error" role="alert">{_e(dialog.error)}</p>' if dialog.error else ""
    return (
        f'{error}<form class="stack" method="post" action="{_e(action_url(view, "keys"))}">'
        f"{_csrf(view)}"
        '<label>Name <span class="hint">What the key is for, as in "billing agent"</span>'
        f'<input name="name" maxlength="200" required value="{_e(values.get("name", ""))}"></label>'
        f'<label>Scopes <span class="hint">{_e(grantable)}</span>'
        f'<input name="scopes" value="{_e(values.get("scopes", ""))}"></label>'
        '<div class="row"><label>Budget <span class="hint">Empty: no limit</span>'
        f'<input name="budget" inputmode="decimal" placeholder="5.00" '
        f'value="{_e(values.get("budget", ""))}"></label>'
        '<label>Period <select name="period">'
        f"{options(PERIODS, values.get('period', 'month'))}</select></label></div>"
        '<label>Requests per minute <span class="hint">Empty: no rate limit</span>'
        f'<input name="per_minute" inputmode="numeric" value="{_e(values.get("per_minute", ""))}">'
        "</label>"
        '<label>Expires <select name="expires_in">'
        f"{options(EXPIRIES, values.get('expires_in', ''))}</select></label>"
        f'<div class="row"><button type="submit" class="primary">Create key</button>{cancel}</div>'
        "</form>"
    )
