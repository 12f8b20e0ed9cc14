# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Faults of the database and of the network are not the call's failure:
no call is lost, none runs twice, no worker process dies."""
import datetime as dt
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid

import pytest
from conftest import ENDPOINT, items, newest_series_only, wait_until
from test_reliability import USER, queue_depth, row, rows

from trytond import backend, config
from trytond.modules.async_sqs import sqs
from trytond.pool import Pool
from trytond.transaction import Transaction

pytestmark = pytest.mark.usefixtures('database')


def defer_many(database, name, count, slow=None):
    "Defer count quick calls, and a slow one of slow seconds in the middle."
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.create_named.defer(name, value=i)
            for i in range(count // 2)]
        if slow:
            handles.append(Item.sleep_then_create.defer(name + '-slow', slow))
        handles += [Item.create_named.defer(name, value=i)
            for i in range(count // 2, count)]
    return handles


def all_done(database, handles):
    task_ids = {h.task_id for h in handles}
    return {r['state'] for r in rows(database)
        if r['uuid'] in task_ids} == {'done'}


def assert_alive(worker, processes):
    "The worker and each of its processes are the ones it started with."
    assert worker.process.poll() is None
    output = worker.output()
    assert output.count('ready, pid') == processes, output
    assert 'exited with' not in output
    assert 'worker process failed' not in output
    assert 'could not be handled' not in output


def worker_pids(worker):
    return {int(p) for p in re.findall(r'ready, pid (\d+)', worker.output())}


@newest_series_only
def test_paused_worker(database, prefix, start_worker, monkeypatch):
    "A worker frozen mid-call past the visibility timeout loses nothing"
    name = 'paused-%s' % uuid.uuid4()
    # the retries of a locked database end well within the pause
    monkeypatch.setenv('TRYTOND_DATABASE__RETRY', '1')
    options = {'visibility_timeout': 3, 'prefetch': 3}
    workers = [start_worker(options=options) for _ in range(2)]
    handles = defer_many(database, name, 60, slow=6)
    slow = handles[30]
    starts = '<Task %s async_sqs.test.item.sleep_then_create@%s> starts' % (
        slow.task_id, database)
    paused = wait_until(lambda: next(
            (w for w in workers if starts in w.output()), None))
    # in the call's sleep, past its claim: on SQLite it holds the write lock
    time.sleep(1.5)
    os.killpg(paused.process.pid, signal.SIGSTOP)
    try:
        # past the visibility timeout and the other worker's retries
        time.sleep(15)
    finally:
        os.killpg(paused.process.pid, signal.SIGCONT)
    wait_until(lambda: all_done(database, handles), timeout=180)
    assert sorted(v for _, v in items(database, name)) == list(range(60))
    assert items(database, name + '-slow') == [(name + '-slow', None)]
    for worker in workers:
        assert_alive(worker, 1)
    output = ''.join(w.output() for w in workers)
    assert 'dead letter' not in output
    assert 'failed after' not in output
    if backend.name == 'sqlite':
        # the other worker met the lock, and let the calls go
        assert 'the database failed' in output


def pg_ctl(*args):
    "Run pg_ctl on the test cluster, as its owner."
    data = os.environ['ASYNC_SQS_PG_DATA']
    command = [os.path.join(os.environ['ASYNC_SQS_PG_BIN'], 'pg_ctl'),
        '-D', data] + list(args)
    if os.getuid() == 0:
        command = ['runuser', '-u', 'postgres', '--'] + command
    # the server outlives the test run: it must not carry the run's marker,
    # by which the test command kills what a run left behind
    env = {k: v for k, v in os.environ.items() if k != 'ASYNC_SQS_RUN_ID'}
    subprocess.run(command, check=True, cwd=os.path.dirname(data), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120)


@pytest.mark.skipif(
    backend.name != 'postgresql' or 'ASYNC_SQS_PG_DATA' not in os.environ,
    reason="restarts the test's own PostgreSQL cluster")
def test_postgresql_restarted_mid_drain(database, prefix, start_worker):
    "The database server restarted mid-drain: calls wait, none is lost"
    name = 'restart-%s' % uuid.uuid4()
    worker = start_worker(processes=2, options={'visibility_timeout': 5})
    handles = defer_many(database, name, 120)
    wait_until(lambda: len(items(database, name)) >= 20, timeout=120)
    pg_ctl('restart', '-m', 'fast', '-w', '-t', '60')

    def done_once_reachable():
        # this process's own pool backs off while the server restarts: on a
        # loaded machine it may give no connection for a while
        try:
            return all_done(database, handles)
        except backend.DatabaseOperationalError:
            return False
    wait_until(done_once_reachable, timeout=240)
    assert sorted(v for _, v in items(database, name)) == list(range(120))
    assert_alive(worker, 2)
    # competing receives are not atomic: SQS (moto too) may hand a message
    # to both processes, and the row then counts the second receive,
    # whichever ran; the other is skipped. A database error counts none.
    twice = set(re.findall(r'<Task ([0-9a-f]{32}) [^>]*> skipped: done '
            'already', worker.output()))
    attempts = {h.task_id: row(database, h.task_id)['attempts']
        for h in handles}
    assert {t: a for t, a in attempts.items() if a != 1} == {
        t: 2 for t, a in attempts.items() if a != 1 and t in twice}


@pytest.mark.skipif(backend.name != 'sqlite', reason="an SQLite file lock")
def test_sqlite_locked_past_the_retries(
        database, prefix, start_worker, monkeypatch):
    "The database locked past the worker's retries: the calls come back"
    name = 'locked-%s' % uuid.uuid4()
    monkeypatch.setenv('TRYTOND_DATABASE__RETRY', '1')
    worker = start_worker(options={'visibility_timeout': 5})
    path = os.path.join(
        config.get('database', 'path'), database + '.sqlite')
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        # SQS holds them back until the lock is taken
        handles = [Item.create_named.defer(name, value=i, _delay_=2)
            for i in range(20)]
    connection = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        connection.execute('BEGIN EXCLUSIVE')
        worker.wait_for_log('the database failed', timeout=60)
        time.sleep(2)
    finally:
        connection.execute('ROLLBACK')
        connection.close()
    wait_until(lambda: all_done(database, handles), timeout=120)
    assert sorted(v for _, v in items(database, name)) == list(range(20))
    assert_alive(worker, 1)
    output = worker.output()
    assert 'failed after' not in output
    assert {row(database, h.task_id)['attempts'] for h in handles} == {1}
    # the calls went back as fresh copies: none was dead-lettered
    dead = sqs.task_queue_name(database, 'trytond-async') + '-dead'
    assert queue_depth(dead) == (0, 0, 0)


@newest_series_only
def test_stale_row_relayed(database, prefix, start_worker):
    "A row left queued whose message is gone runs once stale_after passed"
    name = 'stale-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').create_named.defer(name)
    task = row(database, handle.task_id)
    assert task['state'] == 'queued'
    # the message is lost: received and deleted by someone else
    transport = sqs.client()
    url = transport.url(task['queue'])
    lost = wait_until(lambda: transport.receive(url, wait_time=1))
    transport.delete_batch(url, [m['ReceiptHandle'] for m in lost])
    assert queue_depth(task['queue']) == (0, 0, 0)
    # left a day ago: the first of the relay, before the rows other tests
    # of this database left queued
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        cursor.execute(*table.update(
                [table.write_date],
                [dt.datetime.now() - dt.timedelta(days=1)],
                where=table.uuid == handle.task_id))
    worker = start_worker(options={
            'visibility_timeout': 2, 'stale_after': 4, 'relay_grace': 1})
    wait_until(lambda: row(database, handle.task_id)['state'] == 'done')
    worker.wait_for_log('left queued or running')
    assert items(database, name) == [(name, 0)]
    assert row(database, handle.task_id)['attempts'] == 1
    with pytest.raises(ValueError, match='stale_after'):
        config.set('async_sqs', 'stale_after', '10')
        try:
            from trytond.modules.async_sqs import settings
            settings.stale_after()
        finally:
            config.set('async_sqs', 'stale_after', '')


def test_stale_row_sent_once_per_period(database, prefix):
    "The relay notes on a stale row that it sent it: not again at once"
    from trytond.modules.async_sqs.relay import relay_pending
    task_id = uuid.uuid4().hex
    queue = sqs.task_queue_name(database, 'trytond-async')
    long_ago = dt.datetime.now() - dt.timedelta(days=1)
    with Transaction().start(database, USER):
        Task = Pool().get('async_sqs.task')
        Task.insert_pending([{
                    'uuid': task_id, 'queue': queue,
                    'model': 'async_sqs.test.item', 'method': 'create_named',
                    'records': None, 'user': USER, 'eta': None,
                    'body': '{}'}])
        Task.mark_queued([task_id])
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        cursor.execute(*table.update([table.write_date], [long_ago],
                where=table.uuid == task_id))
    stale_before = dt.datetime.now() - dt.timedelta(hours=1)

    def stale():
        with Transaction().start(database, 0, readonly=True):
            Task = Pool().get('async_sqs.task')
            return [r[0] for r in Task.stale_since(stale_before, limit=None)]
    assert task_id in stale()
    relay_pending(database, long_ago - dt.timedelta(days=1), stale_before)
    assert task_id not in stale()
    assert queue_depth(queue)[0] == 1
    assert row(database, task_id)['state'] == 'queued'


class Proxy:
    "A TCP relay in front of the SQS server that can be cut and restored."

    def __init__(self, target):
        self.target = target
        self.port = None
        self.listener = None
        self.lock = threading.Lock()
        self.connections = []
        self.open()

    @property
    def url(self):
        return 'http://127.0.0.1:%s' % self.port

    def open(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(('127.0.0.1', self.port or 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self.accept, args=(listener,),
            daemon=True).start()

    def accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in [(client, upstream), (upstream, client)]:
                threading.Thread(target=self.pump, args=(a, b),
                    daemon=True).start()

    def pump(self, source, destination):
        try:
            while data := source.recv(65536):
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, destination):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        "Reset every connection and refuse new ones."
        # shutdown wakes the accept of the other thread: close alone would
        # leave the socket listening until it returns
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            connections, self.connections = self.connections, []
        for sock in connections:
            try:
                # SO_LINGER 0: a reset; shutdown wakes the pumps' recv
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                    b'\x01\x00\x00\x00\x00\x00\x00\x00')
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def close(self):
        self.cut()


@newest_series_only
def test_sqs_outage_under_load(database, prefix, start_worker):
    "SQS unreachable for 25 s under load: same processes, no call lost"
    name = 'outage-%s' % uuid.uuid4()
    host, port = ENDPOINT.rsplit('/', 1)[1].split(':')
    proxy = Proxy((host, int(port)))
    try:
        worker = start_worker(processes=2, options={
                'endpoint_url': proxy.url, 'visibility_timeout': 10,
                'max_attempts': 2})
        pids = worker_pids(worker)
        handles = defer_many(database, name, 200)
        wait_until(lambda: len(items(database, name)) >= 40, timeout=120)
        proxy.cut()
        time.sleep(25)
        proxy.open()
        wait_until(lambda: all_done(database, handles), timeout=300)
        assert sorted(v for _, v in items(database, name)) == list(range(200))
        # the deletes kept during the outage are done once it ends
        queue = row(database, handles[0].task_id)['queue']
        wait_until(lambda: queue_depth(queue) == (0, 0, 0), timeout=120)
        assert worker_pids(worker) == pids
        assert_alive(worker, 2)
        output = worker.output()
        # logged once per outage and kind of call, not once per message
        started = output.count('failed, trying again')
        assert 1 <= started <= 2 * 8, output
        assert output.count('works again') >= 1
    finally:
        proxy.close()


def test_two_deliveries_claimed_at_once(database, prefix):
    "Two deliveries claiming one row at once: exactly one of them runs it"
    task_ids = [uuid.uuid4().hex for _ in range(10)]
    with Transaction().start(database, USER):
        Pool().get('async_sqs.task').insert_pending([{
                    'uuid': t, 'queue': 'q', 'model': 'async_sqs.test.item',
                    'method': 'create_named', 'records': None, 'user': USER,
                    'eta': None, 'body': '{}'} for t in task_ids])
    runs = []
    lock = threading.Lock()

    def deliver(task_id, barrier):
        barrier.wait()
        for _ in range(20):
            try:
                with Transaction().start(database, 0):
                    Task = Pool(database).get('async_sqs.task')
                    _, attempt = Task.claim(task_id, 1, 'test')
                    if attempt is None:
                        return
                    # the call runs, holding whatever the claim took
                    time.sleep(0.05)
                    Task.finish(task_id, 'done', attempts=attempt)
                with lock:
                    runs.append(task_id)
                return
            except backend.DatabaseOperationalError:
                time.sleep(0.05)
        raise AssertionError("no delivery could claim %s" % task_id)
    for task_id in task_ids:
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=deliver, args=(task_id, barrier))
            for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(runs) == sorted(task_ids)
    assert {row(database, t)['state'] for t in task_ids} == {'done'}
