# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The statistics of stats.report() written out: a table for humans, JSON for
machines, the Prometheus text exposition format for a scraper."""
import json

from .stats import QUANTILES
from .task import STATES


def _seconds(value):
    return '-' if value is None else '%.3f' % value


def _percent(value):
    return '-' if value is None else '%.1f%%' % (value * 100)


#: The columns of the table of write_table: header, text of a method.
TABLE = [
    ("QUEUE", lambda m: m['queue'] or ''),
    ("METHOD", lambda m: '%s.%s' % (m['model'], m['method'])),
    ("CALLS", lambda m: str(m['calls'])),
    ("PER MIN", lambda m: '%.2f' % (m['calls_per_minute'] or 0)),
    ] + [
    (state.upper(), lambda m, state=state: str(m['states'][state]))
    for state, _ in STATES
    ] + [
    ("%s %s" % (name.upper(), suffix.upper()),
        lambda m, name=name, suffix=suffix: _seconds(m[name][suffix]))
    for name in ['wait', 'run'] for _, suffix in QUANTILES
    ] + [
    ("FAILURES", lambda m: _percent(m['failure_rate'])),
    ("RETRIES", lambda m: _percent(m['retry_rate'])),
    ]


def write_table(report, out):
    "Write the report as a table for humans."
    out.write("calls enqueued from %s to %s UTC (%s min), times in seconds\n"
        % (report['since'].isoformat(' ', 'seconds'),
            report['until'].isoformat(' ', 'seconds'), report['minutes']))
    rows = [[header for header, _ in TABLE]] + [
        [text(m) for _, text in TABLE] for m in report['methods']]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE))]
    for row in rows:
        # the names to the left, the figures to the right
        out.write('  '.join(cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths)))
            .rstrip() + '\n')
    if not report['methods']:
        out.write("no calls\n")


def write_json(report, out):
    "Write the report as one JSON object, its times in ISO 8601."
    json.dump(dict(report,
            since=report['since'].isoformat(),
            until=report['until'].isoformat()), out, indent=2)
    out.write('\n')


#: The content type of the Prometheus text exposition format.
PROMETHEUS_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
#: The metrics of prometheus(): name, help, value of a method by labels.
METRICS = [
    ('calls', "Calls enqueued in the period, by their state now.",
        lambda m: [({'state': s}, m['states'][s]) for s, _ in STATES]),
    ('calls_per_minute', "Calls enqueued per minute over the period.",
        lambda m: [({}, m['calls_per_minute'])]),
    ('wait_seconds', "Seconds from the time a call was due to its start, "
        "quantiles of the calls of the period that ended.",
        lambda m: [({'quantile': str(q)}, m['wait'][s])
            for q, s in QUANTILES]),
    ('run_seconds', "Seconds from the start of a call to its end, "
        "quantiles of the calls of the period that ended.",
        lambda m: [({'quantile': str(q)}, m['run'][s])
            for q, s in QUANTILES]),
    ('failure_ratio', "Share of the calls of the period that ended which "
        "failed.", lambda m: [({}, m['failure_rate'])]),
    ('retry_ratio', "Share of the calls of the period that ended which "
        "took more than one attempt.", lambda m: [({}, m['retry_rate'])]),
    ]


def _label(value):
    return (value or '').replace('\\', r'\\').replace('"', r'\"').replace(
        '\n', r'\n')


def _number(value):
    return str(value) if isinstance(value, int) else repr(float(value))


def prometheus(report):
    """Return the report in the Prometheus text exposition format: gauges
    named async_sqs_*, labelled by queue, model and method."""
    lines = [
        "# HELP async_sqs_period_seconds Seconds of the period the other "
        "metrics cover, up to now.",
        "# TYPE async_sqs_period_seconds gauge",
        "async_sqs_period_seconds %s" % (report['minutes'] * 60),
        ]
    for name, text, samples in METRICS:
        lines += ["# HELP async_sqs_%s %s" % (name, text),
            "# TYPE async_sqs_%s gauge" % name]
        for method in report['methods']:
            for labels, value in samples(method):
                if value is None:
                    continue
                labels = dict(queue=method['queue'], model=method['model'],
                    method=method['method'], **labels)
                lines.append('async_sqs_%s{%s} %s' % (name, ','.join(
                            '%s="%s"' % (k, _label(v))
                            for k, v in labels.items()), _number(value)))
    return '\n'.join(lines) + '\n'
