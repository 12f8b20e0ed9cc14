# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Cancelling a call while it runs stops it, and loses nothing else."
import uuid

import pytest
from conftest import items, wait_until
from test_operate import press
from test_reliability import USER, queue_depth, row

from trytond import backend
from trytond.modules.async_sqs import TaskCancelled, sqs
from trytond.pool import Pool
from trytond.transaction import Transaction

pytestmark = pytest.mark.skipif(backend.name != 'postgresql',
    reason="SQLite takes its write lock when a transaction begins: a "
    "running call holds it, so no cancel commits before the call ends")


def started(worker, name):
    "Wait until the worker runs the call, its row locked."
    worker.wait_for_log('%s running' % name, timeout=60)


def test_cancel_running(database, prefix, start_worker):
    "A running call cancelled is stopped within seconds and rolled back"
    name, other = 'stop-%s' % uuid.uuid4(), 'after-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').until_cancelled.defer(
            name)
    started(worker, name)
    press(database, 'cancel', [handle.task_id])
    # well before the call's 120 s of sleep
    with pytest.raises(TaskCancelled):
        handle.wait(30)
    task = row(database, handle.task_id)
    assert task['state'] == 'cancelled'
    assert task['error'] == "the task was cancelled"
    assert items(database, name) == []
    output = worker.output()
    assert 'cancelled while it runs: stopping it' in output
    assert 'exited with' not in output
    # its message is deleted, and the same process runs the next call
    queue_name = sqs.task_queue_name(database)
    wait_until(lambda: queue_depth(queue_name) == (0, 0, 0))
    with Transaction().start(database, USER):
        after = Pool().get('async_sqs.test.item').sleep_then_create.defer(
            other, 0)
    assert after.wait(30) == other
    assert worker.output().count('ready, pid') == 1


def test_cancel_running_swallowed(database, prefix, start_worker):
    "A call that swallows TaskCancelled is ended after cancel_grace"
    name = 'swallow-%s' % uuid.uuid4()
    worker = start_worker(processes=2, options={
            'cancel_grace': 2, 'visibility_timeout': 10})
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').ignore_cancel.defer(name)
    started(worker, name)
    press(database, 'cancel', [handle.task_id])
    with pytest.raises(TaskCancelled):
        handle.wait(60)
    assert row(database, handle.task_id)['state'] == 'cancelled'
    assert items(database, name) == []
    worker.wait_for_log('was cancelled and did not stop within 2 s')
    wait_until(lambda: worker.output().count('ready, pid') == 3)
    # its message comes back once hidden no more, and does not run again
    worker.wait_for_log('<Task %s async_sqs.test.item.ignore_cancel@%s> '
        'skipped: cancelled already' % (handle.task_id, database),
        timeout=60)
    assert items(database, name) == []


def test_cancel_running_and_queued(database, prefix, start_worker):
    "One cancel stops the running call and cancels the queued one"
    first, second = 'first-%s' % uuid.uuid4(), 'second-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        running = Item.until_cancelled.defer(first)
        queued = Item.until_cancelled.defer(second)
    started(worker, first)
    press(database, 'cancel', [running.task_id, queued.task_id])
    for handle in (running, queued):
        with pytest.raises(TaskCancelled):
            handle.wait(30)
        assert row(database, handle.task_id)['state'] == 'cancelled'
    worker.wait_for_log('<Task %s async_sqs.test.item.until_cancelled@%s> '
        'skipped: cancelled already' % (queued.task_id, database))
    assert items(database, first) == items(database, second) == []
