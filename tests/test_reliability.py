# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"No task lost, none run twice: the task table, relay, retries, dead letters."
import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid

import pytest
from conftest import (
    ENDPOINT, dead_letters, items, newest_series_only, wait_until)

from trytond import config
from trytond.modules.async_sqs import TaskFailed, sqs
from trytond.modules.async_sqs.message import decode_call, signature_attributes
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def rows(database, **where):
    "Return the task rows matching where, as dicts."
    with Transaction(new=True).start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        domain = [(k, '=', v) for k, v in where.items()]
        return [{
                'uuid': t.uuid, 'state': t.state, 'attempts': t.attempts,
                'method': t.method, 'records': t.records, 'error': t.error,
                'enqueued_at': t.enqueued_at, 'started_at': t.started_at,
                'body': t.body, 'queue': t.queue, 'worker': t.worker,
                'tenant': t.tenant,
                } for t in Task.search(domain)]


def row(database, task_id):
    found = rows(database, uuid=task_id)
    return found[0] if found else None


def queue_depth(queue_name):
    "Return (visible, in flight, delayed) messages of the queue."
    transport = sqs.client()
    attributes = transport.sqs.get_queue_attributes(
        QueueUrl=transport.url(queue_name), AttributeNames=['All'],
        )['Attributes']
    return tuple(int(attributes[k]) for k in (
            'ApproximateNumberOfMessages',
            'ApproximateNumberOfMessagesNotVisible',
            'ApproximateNumberOfMessagesDelayed'))


def test_rows_written_with_the_commit(database, prefix):
    "Rows are written by the deferring transaction, none on rollback"
    name = 'row-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        item, = Item.create([{'name': name}])
        handles = [Item.create_named.defer(name, value=i) for i in range(3)]
        handles.append(item.bump.defer(1))
        assert not rows(database, uuid=handles[0].task_id)
    found = {r['uuid']: r for r in rows(database, method='create_named')}
    for handle in handles[:3]:
        assert found[handle.task_id]['state'] == 'queued'
        assert found[handle.task_id]['queue'] == sqs.task_queue_name(
            database, 'trytond-async')
    assert row(database, handles[3].task_id)['records'] == (
        'async_sqs.test.item,%s' % item.id)
    with pytest.raises(ZeroDivisionError):
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            dropped = Item.create_named.defer(name)
            1 / 0
    assert row(database, dropped.task_id) is None


def test_marked_queued_after_a_claim(database, prefix, caplog):
    "Marking rows queued gives way to a worker that ran one meanwhile"
    from trytond.modules.async_sqs.rows import mark_queued
    task_ids = [uuid.uuid4().hex for _ in range(2)]
    with Transaction().start(database, USER):
        Pool().get('async_sqs.task').insert_pending([{
                    'uuid': t, 'queue': 'q', 'model': 'async_sqs.test.item',
                    'method': 'create_named', 'records': None, 'user': USER,
                    'eta': None, 'body': '{}'} for t in task_ids])
    marker = threading.Thread(
        target=mark_queued, args=(database, [task_ids]))
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        # what a worker's transaction does, while the caller marks its batch
        assert Task.claim(task_ids[0], 1, 'here') == ('pending', 1)
        Task.finish(task_ids[0], 'done', attempts=1, worker='here')
        marker.start()
        marker.join(0.5)
    marker.join(30)
    assert not marker.is_alive()
    assert 'could not be marked queued' not in caplog.text
    assert row(database, task_ids[0])['state'] == 'done'
    assert row(database, task_ids[1])['state'] == 'queued'


def test_readonly_transaction_rows(database, prefix, start_worker):
    "A read-only transaction's calls get their rows and run"
    name = 'readonly-%s' % uuid.uuid4()
    with Transaction().start(database, USER, readonly=True):
        handle = Pool().get('async_sqs.test.item').create_named.defer(name)
    assert row(database, handle.task_id)['state'] == 'queued'
    start_worker()
    wait_until(lambda: row(database, handle.task_id)['state'] == 'done')
    assert items(database, name) == [(name, 0)]


def test_unreachable_at_commit_relayed(database, prefix, start_worker):
    "SQS unreachable at commit: rows stay pending and the relay sends them"
    name = 'unreachable-%s' % uuid.uuid4()
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        closed_port = sock.getsockname()[1]
    config.set(
        'async_sqs', 'endpoint_url', 'http://127.0.0.1:%s' % closed_port)
    config.set('async_sqs', 'max_attempts', '1')
    try:
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            handles = [Item.create_named.defer(name, value=i)
                for i in range(5)]
    finally:
        config.set('async_sqs', 'endpoint_url', ENDPOINT)
        config.set('async_sqs', 'max_attempts', '5')
    assert {h.state for h in handles} == {'unsent'}
    assert {row(database, h.task_id)['state'] for h in handles} == {'pending'}
    worker = start_worker(options={'relay_grace': 1})
    wait_until(lambda: len(items(database, name)) >= 5)
    worker.wait_for_log('relay 5 call(s)')
    wait_until(lambda: {row(database, h.task_id)['state']
            for h in handles} == {'done'})
    assert sorted(v for _, v in items(database, name)) == list(range(5))


def test_killed_between_commit_and_send(database, prefix, start_worker):
    "A process killed between its commit and its send loses no call"
    name = 'killed-%s' % uuid.uuid4()
    # a server that accepts and never answers: the send hangs after commit
    black_hole = socket.socket()
    black_hole.bind(('127.0.0.1', 0))
    black_hole.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(black_hole.accept())
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    script = textwrap.dedent('''
        import sys
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        database, name = sys.argv[1:]
        Pool.start()
        with Transaction().start(database, 0, readonly=True):
            Pool(database).init()
        with Transaction().start(database, 1):
            Item = Pool().get('async_sqs.test.item')
            for i in range(5):
                Item.create_named.defer(name, value=i)
        print("sent", flush=True)
        ''')
    env = dict(os.environ,
        TRYTOND_ASYNC_SQS__ENDPOINT_URL='http://127.0.0.1:%s'
        % black_hole.getsockname()[1],
        TRYTOND_ASYNC_SQS__QUEUE_PREFIX=prefix)
    process = subprocess.Popen([sys.executable, '-c', script, database, name],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pending = wait_until(lambda: [r for r in rows(database,
                        method='create_named', state='pending')
                    if name in r['body']] if len(
                    [r for r in rows(database, state='pending')
                        if name in r['body']]) == 5 else None)
        process.kill()
        process.wait(10)
    finally:
        black_hole.close()
        if process.poll() is None:
            process.kill()
    assert b'sent' not in process.stdout.read()
    assert len(pending) == 5
    start_worker(options={'relay_grace': 1})
    wait_until(lambda: {row(database, r['uuid'])['state']
            for r in pending} == {'done'})
    assert sorted(v for _, v in items(database, name)) == list(range(5))


def test_same_message_twice(database, prefix, start_worker):
    "A message delivered three times has its effect once"
    name = 'twice-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').create_named.defer(name)
    task = row(database, handle.task_id)
    transport = sqs.client()
    url = transport.url(task['queue'])
    for _ in range(2):
        transport.send(url, task['body'],
            attributes=signature_attributes(task['body']))
    worker = start_worker()
    wait_until(lambda: worker.output().count('%s async_sqs' % handle.task_id)
        >= 6)
    worker.wait_for_log('skipped: done already')
    wait_until(lambda: queue_depth(task['queue']) == (0, 0, 0))
    assert items(database, name) == [(name, 0)]
    assert row(database, handle.task_id)['state'] == 'done'


def test_killed_between_commit_and_delete(database, prefix, start_worker):
    "A worker killed after its commit, before its delete: no second effect"
    quick, slow = 'quick-%s' % uuid.uuid4(), 'slow-%s' % uuid.uuid4()
    worker = start_worker(options={'visibility_timeout': 2})
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.create_named.defer(quick)
        second = Item.sleep_then_create.defer(slow, 30)
    # deletes go in batches once the buffer is empty: the quick call is
    # committed, its message not yet deleted while the slow one runs
    worker.wait_for_log('<Task %s async_sqs.test.item.sleep_then_create@%s> '
        'starts' % (second.task_id, database))
    assert row(database, first.task_id)['state'] == 'done'
    assert '%s' % first.task_id in worker.output()
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)
    assert items(database, quick) == [(quick, 0)]
    again = start_worker(options={'visibility_timeout': 2})
    again.wait_for_log('<Task %s async_sqs.test.item.create_named@%s> skipped'
        % (first.task_id, database))
    assert items(database, quick) == [(quick, 0)]
    assert row(database, first.task_id)['state'] == 'done'


def test_retries_with_backoff(database, prefix, start_worker):
    "A call that raises is run again, every attempt counted on the row"
    path = tempfile.mktemp(prefix='flaky-')
    worker = start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        succeeds = Item.flaky.defer(path, 2)
        fails = Item.flaky.defer(path + '-never', 10)
        user_error = Item.fail_user_with_retries.defer('no retry')
    assert succeeds.wait(60) == 3
    task = row(database, succeeds.task_id)
    assert (task['state'], task['attempts']) == ('done', 3)
    with pytest.raises(TaskFailed) as info:
        fails.wait(60)
    assert info.value.exc_type == 'builtins.RuntimeError'
    task = row(database, fails.task_id)
    assert (task['state'], task['attempts']) == ('failed', 3)
    assert 'attempt 3 fails' in task['error']
    with pytest.raises(Exception, match='no retry'):
        user_error.wait(60)
    task = row(database, user_error.task_id)
    assert (task['state'], task['attempts']) == ('failed', 1)
    # the failed call is parked in the dead-letter queue, for requeueing
    dead = sqs.task_queue_name(database, 'trytond-async') + '-dead'
    wait_until(lambda: queue_depth(dead)[0] >= 1)
    assert worker.output().count('retries in') == 2 + 2


def test_refused_messages_dead_lettered(database, prefix, start_worker):
    "Malformed, unknown or undecorated calls go to the dead-letter queue"
    worker = start_worker()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').echo.defer('model')
    task = row(database, handle.task_id)
    transport = sqs.client()
    url = transport.url(task['queue'])
    call = decode_call(task['body'])
    undecorated = task['body'].replace(
        '"method":"echo"', '"method":"not_deferrable"').replace(
        call.task, uuid.uuid4().hex)
    for body in ['not json', '{"v": 2}', undecorated]:
        transport.send(url, body, attributes=signature_attributes(body))
    assert sorted(dead_letters(task['queue'], 3)) == sorted(
        ['not json', '{"v": 2}', undecorated])
    assert handle.wait(60)['args'] == ['model']
    assert worker.output().count('refused') >= 3
    with Transaction().start(database, 0, readonly=True):
        Item = Pool().get('async_sqs.test.item')
        assert not Item.search([('name', '=', 'not deferrable')])


def test_long_task_runs_once(database, prefix, start_worker):
    "A call three times longer than the visibility timeout runs once"
    name = 'long-%s' % uuid.uuid4()
    # a timeout the heartbeat keeps up with on a loaded machine too
    worker = start_worker(processes=2, options={'visibility_timeout': 4})
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').sleep_then_create.defer(
            name, 12)
    assert handle.wait(60) == name
    assert items(database, name) == [(name, None)]
    assert worker.output().count(
        '<Task %s async_sqs.test.item.sleep_then_create@%s> starts'
        % (handle.task_id, database)) == 1
    assert row(database, handle.task_id)['attempts'] == 1


def test_postponed_calls(database, prefix, start_worker):
    "delay and eta hold a call back; past 15 minutes the worker holds it"
    name = 'postponed-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        soon = Item.create_named.defer(name, value=1, _delay_=2)
        later = Item.create_named.defer(
            name, value=2, _eta_=dt.datetime.now() + dt.timedelta(hours=3))
    wait_until(lambda: row(database, soon.task_id)['state'] == 'done')
    task = row(database, soon.task_id)
    assert task['started_at'] - task['enqueued_at'] >= dt.timedelta(
        seconds=2)
    task = row(database, later.task_id)
    assert task['state'] == 'queued'
    # SQS holds it the first 15 minutes
    assert queue_depth(task['queue']) == (0, 0, 1)
    # as it comes out of that delay, the worker holds it back again
    transport = sqs.client()
    transport.send(transport.url(task['queue']), task['body'],
        attributes=signature_attributes(task['body']))
    worker.wait_for_log('<Task %s async_sqs.test.item.create_named@%s> '
        'postponed, due in' % (later.task_id, database))
    assert row(database, later.task_id)['state'] == 'queued'
    assert items(database, name) == [(name, 1)]
    # not lost: the message waits, hidden, in its queue
    assert queue_depth(task['queue']) == (0, 1, 1)


@newest_series_only
def test_crash_under_load(database, prefix, start_worker):
    "1,000 calls, 3 processes, one killed halfway: every effect once"
    name = 'load-%s' % uuid.uuid4()
    queues = ['load%s' % i for i in range(4)]
    worker = start_worker(processes=3, queues=queues,
        options={'visibility_timeout': 5})
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        # a few hundred messages per queue: moto slows down as one grows
        handles = [Item.create_named.defer(
                name, value=i, _queue_=queues[i % len(queues)])
            for i in range(1000)]
    wait_until(lambda: len(items(database, name)) >= 500, timeout=300)
    pids = [int(p) for p in re.findall(r'ready, pid (\d+)', worker.output())]
    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: len(items(database, name)) >= 1000, timeout=300)
    task_ids = {h.task_id for h in handles}
    wait_until(lambda: {r['state']
            for r in rows(database, method='create_named')
            if r['uuid'] in task_ids} == {'done'}, timeout=120)
    values = sorted(v for _, v in items(database, name))
    assert values == list(range(1000))


def test_concurrent_commits_share_batches(database, prefix, start_worker,
        caplog):
    "Calls committed at once by threads share rounds; each runs once"
    name = 'shared-%s' % uuid.uuid4()
    count = 20
    barrier = threading.Barrier(count)
    handles, errors = [], []

    def commit(value):
        try:
            with Transaction(new=True).start(database, USER):
                Item = Pool().get('async_sqs.test.item')
                handle = Item.create_named.defer(name, value=value)
                barrier.wait(30)
            handles.append(handle)
        except Exception as exc:
            errors.append(exc)

    caplog.set_level('DEBUG', logger='trytond.modules.async_sqs.outbox')
    threads = [threading.Thread(target=commit, args=(i,))
        for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(handles) == count
    assert {h.state for h in handles} == {'sent'}
    assert {r['state'] for r in rows(database, method='create_named')
        if r['uuid'] in {h.task_id for h in handles}} == {'queued'}
    # 20 commits released together: some wait while another sends
    assert 'commits share a round' in caplog.text, caplog.text
    start_worker()
    found = wait_until(lambda: len(items(database, name)) >= count
        and items(database, name))
    assert sorted(v for _, v in found) == list(range(count))
