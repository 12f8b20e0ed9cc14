# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"One pending call per key: async_task(unique=...)."
import os
import tempfile
import threading
import uuid

import pytest
from conftest import items, wait_until
from test_operate import press
from test_reliability import queue_depth

from trytond import backend
from trytond.modules.async_sqs import TaskFailed, TaskHandle, async_task
from trytond.modules.async_sqs.exceptions import TaskStateError
from trytond.modules.async_sqs.testing import eager
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def rows(database, method, name):
    "Return the task rows of the method whose call names name, as dicts."
    with Transaction(new=True).start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        tasks = Task.search([
                ('method', '=', method), ('body', 'like', '%' + name + '%')],
            order=[('id', 'ASC')])
        return [{'uuid': t.uuid, 'state': t.state, 'queue': t.queue,
                'unique_key': t.unique_key} for t in tasks]


def holding(database, method, name):
    "Return the uuids of the rows that hold their key."
    return [r['uuid'] for r in rows(database, method, name)
        if r['state'] in {'pending', 'queued'} and r['unique_key']]


def messages(database, method, name):
    "Return the count of messages waiting in the queue of the calls."
    queue, = {r['queue'] for r in rows(database, method, name)}
    return queue_depth(queue)[0]


def test_unique_option_checked():
    "unique is True, False or a callable"
    with pytest.raises(ValueError, match='unique'):
        async_task(unique='yes')


def test_same_call_twice_in_a_transaction(database, prefix):
    "Deferred twice in one transaction, a unique call is one row, one message"
    name = 'twice-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.refresh.defer(name, value=1)
        second = Item.refresh.defer(name, value=1)
        other = Item.refresh.defer(name, value=2)
        assert second is first
    assert other.task_id != first.task_id
    assert {r['uuid'] for r in rows(database, 'refresh', name)} == {
        first.task_id, other.task_id}
    assert first.state == other.state == 'sent'
    assert messages(database, 'refresh', name) == 2


def test_pending_call_joined(database, prefix, start_worker):
    """A defer while the identical call is queued gets its handle and sends
    nothing; once it ran, a new call is made"""
    name = 'joined-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        first = Pool().get('async_sqs.test.item').refresh.defer(name)
    with Transaction().start(database, USER):
        second = Pool().get('async_sqs.test.item').refresh.defer(name)
        assert second.task_id == first.task_id
    assert second.task_id == first.task_id
    assert second.state == 'queued'
    assert len(rows(database, 'refresh', name)) == 1
    assert messages(database, 'refresh', name) == 1
    start_worker()
    assert second.wait(60) == 0
    assert first.wait(60) == 0
    with Transaction().start(database, USER):
        third = Pool().get('async_sqs.test.item').refresh.defer(name)
    assert third.task_id != first.task_id
    assert third.wait(60) == 0
    assert items(database, name) == [(name, 0), (name, 0)]


def test_running_call_not_joined(database, prefix, start_worker):
    """A call that runs holds its key no more, though on PostgreSQL its row
    reads queued until it ends: an identical defer makes a new call"""
    name = 'running-%s' % uuid.uuid4()
    path = tempfile.mktemp(prefix='unique-')
    with Transaction().start(database, USER):
        first = Pool().get('async_sqs.test.item').refresh.defer(
            name, wait_for=path)
    worker = start_worker()
    try:
        worker.wait_for_log('<Task %s async_sqs.test.item.refresh@%s> '
            'starts' % (first.task_id, database))
        wait_until(lambda: not holding(database, 'refresh', name))
        with Transaction().start(database, USER):
            second = Pool().get('async_sqs.test.item').refresh.defer(
                name, wait_for=path)
            assert second.task_id != first.task_id
            # on SQLite the running call holds the write lock: the commit
            # waits for it to end
            open(path, 'w').close()
        assert second.task_id != first.task_id
        assert first.wait(60) == second.wait(60) == 0
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert items(database, name) == [(name, 0), (name, 0)]


def test_concurrent_defers_one_call(database, prefix, caplog):
    """Transactions that defer the same call at once and commit together
    make one call: the others' handles point to it after the commit"""
    name = 'race-%s' % uuid.uuid4()
    count = 3
    barrier = threading.Barrier(count)
    handles, errors = [], []

    def defer():
        try:
            with Transaction(new=True).start(database, USER):
                Item = Pool().get('async_sqs.test.item')
                handle = Item.refresh.defer(name)
                # none sees another's row before its commit
                barrier.wait(30)
            handles.append(handle)
        except Exception as exc:
            errors.append(exc)

    caplog.set_level('DEBUG', logger='trytond.modules.async_sqs.unique')
    threads = [threading.Thread(target=defer) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    found = rows(database, 'refresh', name)
    assert len(found) == 1
    assert {h.task_id for h in handles} == {found[0]['uuid']}
    assert messages(database, 'refresh', name) == 1
    assert [h.state for h in handles].count('sent') == 1
    if backend.name == 'postgresql':
        # the rows committed after their snapshot: read in a savepoint's wake
        assert 'conflict with a later commit' in caplog.text


def test_callable_key(database, prefix, start_worker):
    "With a callable, the calls of one key are one, whatever else differs"
    name = 'callable-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.refresh_named.defer(name, value=1)
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        same = Item.refresh_named.defer(name, value=2)
        other = Item.refresh_named.defer(name + '-other', value=3)
    assert same.task_id == first.task_id
    assert other.task_id != first.task_id
    start_worker()
    assert same.wait(60) == 1
    assert other.wait(60) == 3
    assert items(database, name) == [(name, 1)]


def test_records_in_the_key(database, prefix):
    "A unique method of records: one pending call per record"
    name = 'records-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        one, two = Item.create([{'name': name}, {'name': name}])
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item(i).refresh_record.defer()
            for i in [one.id, two.id, one.id]]
    assert handles[0] is handles[2]
    assert handles[0].task_id != handles[1].task_id


def test_retry_refused_while_identical_pending(database, prefix):
    """A cancelled unique call is not retried while an identical one is
    pending; it is once that one is gone"""
    name = 'retry-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        first = Pool().get('async_sqs.test.item').refresh.defer(name)
    press(database, 'cancel', [first.task_id])
    with Transaction().start(database, USER):
        second = Pool().get('async_sqs.test.item').refresh.defer(name)
    assert second.task_id != first.task_id
    with pytest.raises(TaskStateError, match='identical call'):
        press(database, 'retry', [first.task_id])
    assert holding(database, 'refresh', name) == [second.task_id]
    press(database, 'cancel', [second.task_id])
    press(database, 'retry', [first.task_id])
    assert holding(database, 'refresh', name) == [first.task_id]


def test_retry_of_a_call_that_ran(database, prefix, start_worker):
    """A unique call that failed released its key as it started: retried,
    it runs again beside an identical call deferred since"""
    name = 'ran-%s' % uuid.uuid4()
    path = tempfile.mktemp(prefix='unique-')
    worker = start_worker()
    with Transaction().start(database, USER):
        first = Pool().get('async_sqs.test.item').refresh_unless.defer(
            path, name)
    with pytest.raises(TaskFailed, match='no file'):
        first.wait(60)
    worker.terminate()
    with Transaction().start(database, USER):
        second = Pool().get('async_sqs.test.item').refresh_unless.defer(
            path, name)
    assert second.task_id != first.task_id
    open(path, 'w').close()
    try:
        press(database, 'retry', [first.task_id])
        assert holding(database, 'refresh_unless', name) == [second.task_id]
        start_worker()
        assert TaskHandle(first.task_id, database=database).wait(60) == name
        assert second.wait(60) == name
    finally:
        os.unlink(path)
    assert items(database, name) == [(name, None), (name, None)]


def test_index_enforced(database):
    "The database refuses a second pending row of a key"
    key = uuid.uuid4().hex * 2
    values = {'queue': 'q', 'model': 'async_sqs.test.item',
        'method': 'refresh', 'records': None, 'user': USER, 'eta': None,
        'body': '{}', 'unique_key': key}
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        first = uuid.uuid4().hex
        assert Task.insert_pending([dict(values, uuid=first)]) == {}
        second = uuid.uuid4().hex
        assert Task.insert_pending([dict(values, uuid=second)]) == {
            second: first}
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        with pytest.raises(backend.DatabaseIntegrityError):
            cursor.execute(*table.insert(
                    [table.uuid, table.unique_key, table.state],
                    [[uuid.uuid4().hex, key, 'queued']]))
        Transaction().rollback()


def test_eager(database, prefix):
    "In eager mode a unique call deferred twice runs once"
    name = 'eager-%s' % uuid.uuid4()
    with eager():
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            first = Item.refresh.defer(name, value=4)
            second = Item.refresh.defer(name, value=4)
        assert second is first
        assert first.wait(10) == 4
        with Transaction().start(database, USER):
            third = Pool().get('async_sqs.test.item').refresh.defer(
                name, value=4)
        assert third.task_id != first.task_id
        assert third.wait(10) == 4
    assert items(database, name) == [(name, 4), (name, 4)]
