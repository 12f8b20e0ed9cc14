# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Statistics of the deferred calls, computed by the database from the task
rows: per queue and method over a period, and per interval of it.

The calls of a period are the rows enqueued in it, whatever their state now.
The waiting time of a call that ended (done or failed) runs from the time it
was due (its commit, or its eta: the end of a delay or of a retry's back-off)
to the start of its last attempt; its run time, from that start to its end.
A quantile interpolates between the two nearest values, as PostgreSQL's
percentile_cont does, with window functions that SQLite has too, so that
both backends give the same figures."""
import datetime as dt

from sql import Column, Literal, Null, Window
from sql.aggregate import Count, Min, Sum
from sql.conditionals import Case, Greatest, NullIf
from sql.functions import (
    CurrentTimestamp, DateTrunc, Extract, Floor, Function, Round, RowNumber)

from trytond import backend
from trytond.model import ModelSQL, ModelView, fields
from trytond.pool import Pool
from trytond.pyson import Eval, If
from trytond.transaction import Transaction

from .task import STATES

#: Minutes of the period the statistics cover by default: the last hour.
DEFAULT_MINUTES = 60
#: The quantiles of the waiting and run times, and their column suffixes.
QUANTILES = [(0.5, 'p50'), (0.95, 'p95')]
#: States of a call that ran and ended.
ENDED = ('done', 'failed')
#: The intervals of the time series.
INTERVALS = [
    ('minute', "Minute"),
    ('hour', "Hour"),
    ('day', "Day"),
    ]


class JulianDay(Function):
    __slots__ = ()
    _function = 'JULIANDAY'


def epoch(column):
    "Return the SQL of the seconds of a timestamp column since an origin."
    if backend.name == 'sqlite':
        # timestamps are text on SQLite: julianday reads them
        return JulianDay(column) * 86400
    return Extract('EPOCH', column)


def period():
    """Return (since, until) of the context: its since and until, by default
    the DEFAULT_MINUTES until now."""
    context = Transaction().context
    until = context.get('until') or dt.datetime.now()
    since = context.get('since') or (
        until - dt.timedelta(minutes=DEFAULT_MINUTES))
    return since, until


def calls_query(since, until, ranks=True, interval=None):
    """Return the select of the calls enqueued from since until until: their
    waiting and run seconds; with ranks, the rank and count of each among
    the values of their queue and method; with an interval, the start of
    the interval (date) they were enqueued in."""
    pool = Pool()
    Task = pool.get('async_sqs.task')
    task = Task.__table__()
    ran = task.state.in_(ENDED) & (task.started_at != Null)
    due = Greatest(epoch(task.enqueued_at), epoch(task.eta))
    started = epoch(task.started_at)
    # a message may come a little before its eta: it waited nothing
    wait = Case((ran, Greatest(started - due, 0)), else_=Null)
    run = Case((ran & (task.finished_at != Null),
            epoch(task.finished_at) - started), else_=Null)
    group = [task.queue, task.model, task.method]
    columns = [task.id, *group, task.state, task.attempts,
        task.enqueued_at, wait.as_('wait'), run.as_('run')]
    for name, value in [('wait', wait), ('run', run)] if ranks else []:
        # the empty values rank apart, in a partition of their own
        columns.append(RowNumber(window=Window(group + [value == Null],
                    order_by=[value.asc])).as_(name + '_rank'))
        columns.append(
            Count(value, window=Window(group)).as_(name + '_count'))
    if interval:
        # here, for the grouping to read a column: PostgreSQL does not
        # match a GROUP BY expression with parameters to the selected one
        columns.append(DateTrunc(interval, task.enqueued_at).as_('date'))
    return task.select(*columns,
        where=(task.enqueued_at >= since) & (task.enqueued_at < until))


def quantile(calls, name, fraction):
    """Return the aggregate of the quantile of the column name of calls,
    interpolated linearly between the two nearest ranks, rounded to the
    millisecond."""
    value = Column(calls, name)
    rank = Column(calls, name + '_rank')
    position = (Column(calls, name + '_count') - 1) * fraction
    low = Floor(position)
    part = position - low
    return Round(Sum(Case(
                (rank == low + 1, value * (Literal(1) - part)),
                (rank == low + 2, value * part),
                else_=Null)) * 1000) / 1000.0


def _count(condition):
    return Sum(Case((condition, 1), else_=0))


class TaskStatisticsContext(ModelView):
    __name__ = 'async_sqs.task.statistics.context'
    __string__ = "Deferred Task Statistics Context"

    since = fields.Timestamp("From",
        domain=[
            If(Eval('since') & Eval('until'),
                ('since', '<=', Eval('until')),
                ()),
            ],
        help="The calls enqueued from this time on.")
    until = fields.Timestamp("To",
        domain=[
            If(Eval('since') & Eval('until'),
                ('until', '>=', Eval('since')),
                ()),
            ],
        help="The calls enqueued before this time; empty for now.")
    interval = fields.Selection(INTERVALS, "Interval", required=True,
        help="The interval of the statistics over time.")

    @classmethod
    def default_since(cls):
        context = Transaction().context
        if context.get('since'):
            return context['since']
        return dt.datetime.now() - dt.timedelta(minutes=DEFAULT_MINUTES)

    @classmethod
    def default_until(cls):
        return Transaction().context.get('until')

    @classmethod
    def default_interval(cls):
        return Transaction().context.get('interval', 'minute')


class _Statistics(ModelSQL, ModelView):
    queue = fields.Char("Queue", readonly=True)
    model = fields.Char("Model", readonly=True)
    method = fields.Char("Method", readonly=True)
    calls = fields.Integer("Calls", readonly=True,
        help="The calls enqueued in the period.")
    done = fields.Integer("Done", readonly=True)
    failed = fields.Integer("Failed", readonly=True)

    @classmethod
    def _columns(cls, calls):
        columns = [
            Min(calls.id).as_('id'),
            Literal(0).as_('create_uid'),
            CurrentTimestamp().as_('create_date'),
            cls.write_uid.sql_cast(Literal(Null)).as_('write_uid'),
            cls.write_date.sql_cast(Literal(Null)).as_('write_date'),
            calls.queue.as_('queue'),
            calls.model.as_('model'),
            calls.method.as_('method'),
            Count(calls.id).as_('calls'),
            ]
        for state, _ in STATES:
            if state in cls._fields:
                columns.append(_count(calls.state == state).as_(state))
        return columns

    @classmethod
    def _group_by(cls, calls):
        return [calls.queue, calls.model, calls.method]

    #: Whether the columns need the rank of each value.
    _ranks = False

    @classmethod
    def _interval(cls):
        "Return the interval the rows are grouped by, if any."
        return None

    @classmethod
    def table_query(cls):
        calls = calls_query(*period(), ranks=cls._ranks,
            interval=cls._interval())
        return calls.select(*cls._columns(calls),
            group_by=cls._group_by(calls))


class TaskStatistics(_Statistics):
    __name__ = 'async_sqs.task.statistics'
    __string__ = "Deferred Task Statistics"

    waiting = fields.Integer("Waiting", readonly=True)
    pending = fields.Integer("Pending", readonly=True)
    queued = fields.Integer("Queued", readonly=True)
    running = fields.Integer("Running", readonly=True)
    cancelled = fields.Integer("Cancelled", readonly=True)
    retried = fields.Integer("Retried", readonly=True,
        help="The calls ended after more than one attempt.")
    calls_per_minute = fields.Float("Calls per Minute", readonly=True,
        digits=(10, 3))
    wait_p50 = fields.Float("Waiting Median", readonly=True, digits=(10, 3),
        help="Seconds from the time a call was due to its start, that half "
        "of the calls ended did not exceed.")
    wait_p95 = fields.Float("Waiting 95th", readonly=True, digits=(10, 3),
        help="Seconds from the time a call was due to its start, that 95% "
        "of the calls ended did not exceed.")
    run_p50 = fields.Float("Run Median", readonly=True, digits=(10, 3),
        help="Seconds from the start of a call to its end, that half of the "
        "calls ended did not exceed.")
    run_p95 = fields.Float("Run 95th", readonly=True, digits=(10, 3),
        help="Seconds from the start of a call to its end, that 95% of the "
        "calls ended did not exceed.")
    failure_rate = fields.Float("Failure Rate", readonly=True,
        digits=(10, 4), help="The share of the calls ended that failed.")
    retry_rate = fields.Float("Retry Rate", readonly=True, digits=(10, 4),
        help="The share of the calls ended that took more than one attempt.")

    _ranks = True

    @classmethod
    def __setup__(cls):
        super().__setup__()
        cls._order = [('queue', 'ASC'), ('model', 'ASC'), ('method', 'ASC'),
            ('id', 'ASC')]

    @classmethod
    def _columns(cls, calls):
        since, until = period()
        minutes = (until - since).total_seconds() / 60
        ended = _count(calls.state.in_(ENDED))
        retried = _count(calls.state.in_(ENDED) & (calls.attempts > 1))
        columns = super()._columns(calls) + [
            retried.as_('retried'),
            (cls.calls_per_minute.sql_cast(Count(calls.id)) / minutes
                if minutes > 0 else Literal(Null)).as_('calls_per_minute'),
            (cls.failure_rate.sql_cast(_count(calls.state == 'failed'))
                / NullIf(ended, 0)).as_('failure_rate'),
            (cls.retry_rate.sql_cast(retried)
                / NullIf(ended, 0)).as_('retry_rate'),
            ]
        for name in ['wait', 'run']:
            for fraction, suffix in QUANTILES:
                field = getattr(cls, '%s_%s' % (name, suffix))
                columns.append(field.sql_cast(
                        quantile(calls, name, fraction)).as_(field.name))
        return columns


class TaskStatisticsTimeSeries(_Statistics):
    __name__ = 'async_sqs.task.statistics.time_series'
    __string__ = "Deferred Task Statistics over Time"

    date = fields.Timestamp("Date", readonly=True,
        help="The start of the interval the calls were enqueued in.")
    run_time = fields.Float("Run Time", readonly=True, digits=(10, 3),
        help="The seconds the calls ended took to run, together.")

    @classmethod
    def __setup__(cls):
        super().__setup__()
        cls._order = [('date', 'ASC'), ('queue', 'ASC'), ('model', 'ASC'),
            ('method', 'ASC'), ('id', 'ASC')]

    @classmethod
    def _interval(cls):
        interval = Transaction().context.get('interval') or 'minute'
        if interval not in dict(INTERVALS):
            raise ValueError("interval must be one of %s, not %r" % (
                    ', '.join(dict(INTERVALS)), interval))
        return interval

    @classmethod
    def _columns(cls, calls):
        return super()._columns(calls) + [
            cls.date.sql_cast(calls.date).as_('date'),
            cls.run_time.sql_cast(
                Round(Sum(calls.run) * 1000) / 1000.0).as_('run_time'),
            ]

    @classmethod
    def _group_by(cls, calls):
        return super()._group_by(calls) + [calls.date]


def report(minutes=None):
    """Return the statistics of the last minutes (DEFAULT_MINUTES by
    default): a dict of since, until, minutes and methods, a dict per queue
    and method of the calls enqueued in that time.

    Each method has queue, model, method, calls, states (the count of each
    state), calls_per_minute, wait and run ({'p50': seconds, 'p95':
    seconds}, None without a call ended), retried, failure_rate and
    retry_rate (from 0 to 1, None without a call ended)."""
    pool = Pool()
    Statistics = pool.get('async_sqs.task.statistics')
    transaction = Transaction()
    minutes = minutes or DEFAULT_MINUTES
    until = dt.datetime.now()
    since = until - dt.timedelta(minutes=minutes)
    cursor = transaction.connection.cursor()
    with transaction.set_context(since=since, until=until):
        cursor.execute(*Statistics.table_query())
    names = [d[0] for d in cursor.description]
    methods = []
    for values in cursor:
        row = dict(zip(names, values))
        methods.append({
                'queue': row['queue'],
                'model': row['model'],
                'method': row['method'],
                'calls': row['calls'],
                'states': {s: row[s] for s, _ in STATES},
                'calls_per_minute': row['calls_per_minute'],
                'wait': {s: row['wait_' + s] for _, s in QUANTILES},
                'run': {s: row['run_' + s] for _, s in QUANTILES},
                'retried': row['retried'],
                'failure_rate': row['failure_rate'],
                'retry_rate': row['retry_rate'],
                })
    methods.sort(key=lambda m: (m['queue'] or '', m['model'] or '',
            m['method'] or ''))
    return {'since': since, 'until': until, 'minutes': minutes,
        'methods': methods}
