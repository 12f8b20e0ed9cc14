# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The statistics of the calls, on task rows whose times are known: through
the model, trytond-async-admin stats and the Prometheus route."""
import datetime as dt
import json
import re
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest
from conftest import Server
from test_admin import admin

from trytond import backend
from trytond.pool import Pool
from trytond.transaction import Transaction

MODEL = 'async_sqs.test.item'
#: The rows of the tests: method, state, attempts, then the seconds after
#: the base of enqueued_at, eta, started_at and finished_at.
ROWS = [
    ('create_named', 'done', 1, 0, None, 0.2, 1.2),
    # delayed by 600 s: it waited from its eta
    ('create_named', 'done', 1, 10, 610, 610.4, 612.4),
    # retried: its last attempt waited from the eta of the retry
    ('create_named', 'done', 2, 70, 100, 100.6, 103.6),
    ('create_named', 'done', 1, 80, None, 80.8, 84.8),
    ('create_named', 'failed', 3, 90, 200, 201, 211),
    ('create_named', 'pending', 0, 100, None, None, None),
    # waits for a retry: its attempt ended, the call did not
    ('create_named', 'queued', 1, 110, 400, 115, 116),
    ('create_named', 'cancelled', 0, 120, None, None, 130),
    ('echo', 'running', 1, 60, None, 61, None),
    ('echo', 'done', 1, 130, None, 132.5, 132.75),
    # 90 minutes before the base: in the last three hours only
    ('create_named', 'done', 1, -5400, None, -5395, -5390),
    ]
#: The figures of create_named over the hour from the base.
CREATE_NAMED = {
    'calls': 8,
    'states': {'waiting': 0, 'pending': 1, 'queued': 1, 'running': 0,
        'done': 4, 'failed': 1, 'cancelled': 1},
    'calls_per_minute': 8 / 60,
    # waits 0.2 0.4 0.6 0.8 1.0, runs 1 2 3 4 10: percentile_cont's
    'wait': {'p50': 0.6, 'p95': 0.96},
    'run': {'p50': 3.0, 'p95': 8.8},
    'retried': 2,
    'failure_rate': 1 / 5,
    'retry_rate': 2 / 5,
    }
ECHO = {
    'calls': 2,
    'states': {'waiting': 0, 'pending': 0, 'queued': 0, 'running': 1,
        'done': 1, 'failed': 0, 'cancelled': 0},
    'calls_per_minute': 2 / 60,
    'wait': {'p50': 2.5, 'p95': 2.5},
    'run': {'p50': 0.25, 'p95': 0.25},
    'retried': 0,
    'failure_rate': 0.0,
    'retry_rate': 0.0,
    }


@pytest.fixture(scope='module')
def calls():
    """Write the task rows of ROWS on a queue of their own, half an hour
    ago; return the database, the queue and the base time."""
    from trytond.tests.test_tryton import DB_NAME, activate_module
    activate_module(['async_sqs', 'async_sqs_test'])
    queue = 'stats-%s' % uuid.uuid4().hex
    base = (dt.datetime.now() - dt.timedelta(minutes=30)).replace(
        second=0, microsecond=0)

    def at(seconds):
        return None if seconds is None else (
            base + dt.timedelta(seconds=seconds))
    with Transaction().start(DB_NAME, 0) as transaction:
        table = Pool().get('async_sqs.task').__table__()
        cursor = transaction.connection.cursor()
        values = [[uuid.uuid4().hex, queue, MODEL, method, state, attempts,
                at(enqueued), at(eta), at(started), at(finished), 0,
                at(enqueued)]
            for method, state, attempts, enqueued, eta, started, finished
            in ROWS]
        cursor.execute(*table.insert([table.uuid, table.queue, table.model,
                    table.method, table.state, table.attempts,
                    table.enqueued_at, table.eta, table.started_at,
                    table.finished_at, table.create_uid, table.create_date],
                values))
    yield DB_NAME, queue, base
    with Transaction().start(DB_NAME, 0) as transaction:
        cursor = transaction.connection.cursor()
        cursor.execute(*table.delete(where=table.queue == queue))


def figures(method):
    "Return the figures of a method of the report, without its names."
    return {k: v for k, v in method.items()
        if k not in {'queue', 'model', 'method'}}


def test_model_period(calls):
    "The model gives the figures of each method of the context's period"
    database, queue, base = calls
    with Transaction().start(database, 0, readonly=True):
        Statistics = Pool().get('async_sqs.task.statistics')
        with Transaction().set_context(
                since=base, until=base + dt.timedelta(hours=1)):
            create_named, echo = Statistics.search(
                [('queue', '=', queue)], order=[('method', 'ASC')])
            assert (create_named.model, create_named.method) == (
                MODEL, 'create_named')
            for record, expected in [(create_named, CREATE_NAMED),
                    (echo, ECHO)]:
                assert record.calls == expected['calls']
                for state, count in expected['states'].items():
                    assert getattr(record, state) == count, state
                for name in ['wait', 'run']:
                    for suffix, value in expected[name].items():
                        assert getattr(record, '%s_%s' % (name, suffix)) == (
                            value), (name, suffix)
                for name in ['calls_per_minute', 'retried', 'failure_rate',
                        'retry_rate']:
                    assert getattr(record, name) == expected[name], name
        with Transaction().set_context(
                since=base - dt.timedelta(hours=2), until=base):
            older, = Statistics.search([('queue', '=', queue)])
            assert (older.calls, older.done, older.run_p50) == (1, 1, 5.0)
            assert older.calls_per_minute == 1 / 120
            assert older.wait_p95 == 5.0


def test_model_time_series(calls):
    "The calls, outcomes and run time of each minute of the period"
    database, queue, base = calls
    with Transaction().start(database, 0, readonly=True):
        Series = Pool().get('async_sqs.task.statistics.time_series')
        with Transaction().set_context(since=base,
                until=base + dt.timedelta(hours=1), interval='minute'):
            series = Series.search([('queue', '=', queue)])
            assert [(s.date, s.method, s.calls, s.done, s.failed,
                    s.run_time) for s in series] == [
                (base, 'create_named', 2, 2, 0, 3.0),
                (base + dt.timedelta(minutes=1), 'create_named',
                    5, 2, 1, 17.0),
                (base + dt.timedelta(minutes=1), 'echo', 1, 0, 0, None),
                (base + dt.timedelta(minutes=2), 'create_named',
                    1, 0, 0, None),
                (base + dt.timedelta(minutes=2), 'echo', 1, 1, 0, 0.25),
                ]
        with Transaction().set_context(since=base,
                until=base + dt.timedelta(hours=1), interval='hour'):
            hours = Series.search([('queue', '=', queue)])
            expected = Counter(
                ((base + dt.timedelta(seconds=row[3])).replace(
                        minute=0, second=0), row[0])
                for row in ROWS if row[3] >= 0)
            assert [(s.date, s.method, s.calls) for s in hours] == sorted(
                (date, method, count)
                for (date, method), count in expected.items())


@pytest.mark.skipif(backend.name != 'postgresql',
    reason="percentile_cont is PostgreSQL's")
def test_quantiles_are_percentile_cont(calls):
    "On PostgreSQL the quantiles are those of percentile_cont"
    from sql import Cast, Literal
    from sql.aggregate import Aggregate
    from sql.functions import Extract

    class PercentileCont(Aggregate):
        _sql = 'PERCENTILE_CONT'
    database, queue, base = calls
    with Transaction().start(database, 0, readonly=True) as transaction:
        pool = Pool()
        Statistics = pool.get('async_sqs.task.statistics')
        table = pool.get('async_sqs.task').__table__()
        cursor = transaction.connection.cursor()
        run = Cast(Extract('EPOCH', table.finished_at - table.started_at),
            'DOUBLE PRECISION')
        cursor.execute(*table.select(
                *(PercentileCont(Literal(q), within=[run]) for q in (0.5,
                        0.95)),
                where=(table.queue == queue)
                & (table.method == 'create_named')
                & table.state.in_(['done', 'failed'])
                & (table.enqueued_at >= base)))
        native = cursor.fetchone()
        with Transaction().set_context(since=base):
            record, = Statistics.search(
                [('queue', '=', queue), ('method', '=', 'create_named')])
        assert [record.run_p50, record.run_p95] == [
            pytest.approx(float(v), abs=1e-9) for v in native]


def test_admin_stats(calls):
    "stats --json gives the figures of the last hour, the table the same"
    database, queue, base = calls
    result = admin(database, 'unused', 'stats', '--json')
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['minutes'] == 60
    since, until = (dt.datetime.fromisoformat(report[k])
        for k in ['since', 'until'])
    assert until - since == dt.timedelta(hours=1)
    methods = [m for m in report['methods'] if m['queue'] == queue]
    assert [(m['model'], m['method']) for m in methods] == [
        (MODEL, 'create_named'), (MODEL, 'echo')]
    assert figures(methods[0]) == CREATE_NAMED
    assert figures(methods[1]) == ECHO

    result = admin(database, 'unused', 'stats', '--since', '180', '--json')
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    create_named, = [m for m in report['methods']
        if m['queue'] == queue and m['method'] == 'create_named']
    assert create_named['calls'] == 9
    assert create_named['calls_per_minute'] == 9 / 180
    assert create_named['run'] == {'p50': 3.5, 'p95': 8.75}
    assert create_named['failure_rate'] == 1 / 6

    result = admin(database, 'unused', 'stats')
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[1] == ['QUEUE', 'METHOD', 'CALLS', 'PER', 'MIN', 'WAITING',
        'PENDING', 'QUEUED', 'RUNNING', 'DONE', 'FAILED', 'CANCELLED', 'WAIT',
        'P50', 'WAIT', 'P95', 'RUN', 'P50', 'RUN', 'P95', 'FAILURES',
        'RETRIES']
    assert [queue, MODEL + '.create_named', '8', '0.13', '0', '1', '1', '0',
        '4', '1', '1', '0.600', '0.960', '3.000', '8.800', '20.0%', '40.0%'
        ] in lines
    assert [queue, MODEL + '.echo', '2', '0.03', '0', '0', '0', '1', '1',
        '0', '0', '2.500', '2.500', '0.250', '0.250', '0.0%', '0.0%'
        ] in lines

    result = admin(database, 'unused', 'stats', '--since', '0')
    assert result.returncode == 2
    assert 'not a positive number' in result.stderr


@pytest.fixture(scope='module')
def keys(calls):
    "Return a key of the task administrator and one of another user."
    database = calls[0]
    with Transaction().start(database, 0):
        pool = Pool()
        User = pool.get('res.user')
        Application = pool.get('res.user.application')
        ModelData = pool.get('ir.model.data')
        group = ModelData.get_id('async_sqs', 'group_task_admin')
        admin_user = User(1)
        if group not in [g.id for g in admin_user.groups]:
            User.write([admin_user], {'groups': [('add', [group])]})
        user, = User.create([{
                    'name': "Metrics",
                    'login': 'metrics-%s' % uuid.uuid4().hex,
                    }])
        admin_key, user_key = Application.create([
                {'user': 1, 'application': 'async_sqs'},
                {'user': user.id, 'application': 'async_sqs'},
                ])
        return {'admin': admin_key.key, 'user': user_key.key}


@pytest.fixture(scope='module')
def server(keys):
    server = Server('test%s' % uuid.uuid4().hex[:10])
    try:
        server.ready()
        yield server
    finally:
        server.stop()
        print("--- server log %s\n%s" % (server.log_path, server.output()))


def scrape(server, database, key=None, query=''):
    "Return the status, content type and text of GET metrics."
    headers = {'Authorization': 'bearer %s' % key} if key else {}
    request = urllib.request.Request('%s/%s/async_sqs/metrics%s' % (
            server.url, database, query), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return (response.status, response.headers['Content-Type'],
                response.read().decode('utf-8'))
    except urllib.error.HTTPError as error:
        return (error.code, error.headers['Content-Type'],
            error.read().decode('utf-8'))


SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """Return {(name, labels): value} of the samples of a Prometheus text,
    and the set of names with both HELP and TYPE."""
    samples, described = {}, {}
    for line in text.splitlines():
        if line.startswith('# '):
            kind, name = line.split()[1:3]
            described.setdefault(name, set()).add(kind)
            continue
        name, labels, value = SAMPLE.match(line).groups()
        samples[name, frozenset(LABEL.findall(labels or ''))] = float(value)
    return samples, {n for n, k in described.items() if k == {'HELP', 'TYPE'}}


def test_prometheus_metrics(calls, keys, server):
    "The metrics route gives the figures of the last hour to the admin"
    database, queue, _ = calls
    status, content_type, text = scrape(server, database, keys['admin'])
    assert status == 200, text
    assert content_type.startswith('text/plain; version=0.0.4')
    samples, described = parse(text)
    assert {name for name, _ in samples} <= described
    assert samples['async_sqs_period_seconds', frozenset()] == 3600

    def value(name, method, **labels):
        labels.update(queue=queue, model=MODEL, method=method)
        return samples.get((name, frozenset(labels.items())))
    for method, expected in [('create_named', CREATE_NAMED), ('echo', ECHO)]:
        for state, count in expected['states'].items():
            assert value('async_sqs_calls', method, state=state) == count
        assert value('async_sqs_calls_per_minute', method) == (
            expected['calls_per_minute'])
        for name in ['wait', 'run']:
            for quantile, suffix in [('0.5', 'p50'), ('0.95', 'p95')]:
                assert value('async_sqs_%s_seconds' % name, method,
                    quantile=quantile) == expected[name][suffix]
        assert value('async_sqs_failure_ratio', method) == (
            expected['failure_rate'])
        assert value('async_sqs_retry_ratio', method) == (
            expected['retry_rate'])

    status, _, text = scrape(server, database, keys['admin'], '?since=180')
    assert status == 200, text
    samples, _ = parse(text)
    assert samples['async_sqs_period_seconds', frozenset()] == 10800
    assert value('async_sqs_calls', 'create_named', state='done') == 5


def test_prometheus_refused(calls, keys, server):
    "No key, a key of a user outside the group, a bad since: refused"
    database = calls[0]
    status, _, text = scrape(server, database)
    assert status == 401
    assert json.loads(text)['status'] == 401
    status, _, text = scrape(server, database, 'not-a-key')
    assert status == 401
    status, _, text = scrape(server, database, keys['user'])
    assert status == 403
    assert 'Deferred Task Administration' in json.loads(text)['message']
    status, _, text = scrape(server, database, keys['admin'], '?since=x')
    assert status == 400
