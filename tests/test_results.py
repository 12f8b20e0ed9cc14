# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Results that last: read from the task row, by any process, as often."
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
from conftest import ENDPOINT, wait_until

from trytond import config
from trytond.exceptions import UserError
from trytond.modules.async_sqs import (
    ResultTimeout, TaskCancelled, TaskFailed, TaskHandle, settings, sqs)
from trytond.modules.async_sqs.listener import close_listeners, listener
from trytond.modules.async_sqs.message import decode_call
from trytond.modules.async_sqs.result import task_status
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1
#: Awaits of the test of many: fewer than the benchmark's 500, for moto.
FAST, SLOW = 170, 30


@pytest.fixture(params=['task', 'process'])
def reply_queue(request):
    "Run the test with either kind of reply queue."
    config.set('async_sqs', 'reply_queue', request.param)
    yield request.param
    config.set('async_sqs', 'reply_queue', '')


def defer(database, function, user=USER):
    "Run function(pool) in a committed transaction and return its value."
    with Transaction().start(database, user):
        return function(Pool())


def item_method(name, *args, **kwargs):
    "Return a function that defers the method of the test item."
    def run(pool):
        return getattr(pool.get('async_sqs.test.item'), name).defer(
            *args, **kwargs)
    return run


def press_cancel(database, task_ids):
    with Transaction().start(database, USER):
        Task = Pool().get('async_sqs.task')
        Task.cancel(Task.search([('uuid', 'in', task_ids)]))


def wait_elsewhere(database, prefix, task_id, timeout=60):
    """Wait for the task in a process of its own; return what it printed:
    the result, or the class and text of what wait() raised."""
    script = textwrap.dedent('''
        import json, sys
        from trytond.modules.async_sqs import TaskHandle
        handle = TaskHandle(sys.argv[1], database=sys.argv[2])
        try:
            value = handle.wait(float(sys.argv[3]))
        except Exception as exc:
            value = [type(exc).__name__, str(exc)]
        print(json.dumps({'outcome': value, 'state': handle.state}))
        ''')
    env = dict(os.environ, TRYTOND_ASYNC_SQS__QUEUE_PREFIX=prefix,
        TRYTOND_ASYNC_SQS__REPLY_QUEUE=settings.reply_queue())
    output = subprocess.run(
        [sys.executable, '-c', script, task_id, database, str(timeout)],
        env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert output.returncode == 0, output.stderr
    return json.loads(output.stdout.splitlines()[-1])


def test_result_read_twice(database, start_worker, reply_queue):
    "A result is read again, by the same handle and by new ones"
    start_worker()
    handle = defer(database, item_method('identity', {'n': 1}))
    assert handle.wait(60) == {'n': 1}
    assert handle.wait(0) == {'n': 1}
    for _ in range(2):
        again = TaskHandle(handle.task_id, database=database)
        assert again.ready()
        assert again.wait(5) == {'n': 1}
        assert again.state == 'done'


def test_result_in_another_process(database, prefix, start_worker):
    "Another process reads the result after the reply queue was consumed"
    start_worker()
    handle = defer(database, item_method('identity', [1, 'two']))
    assert handle.wait(60) == [1, 'two']
    found = wait_elsewhere(database, prefix, handle.task_id)
    assert found == {'outcome': [1, 'two'], 'state': 'done'}


def test_other_process_waits_first(database, prefix, start_worker):
    "A process that waits before the call ran gets the result too"
    handle = defer(database, item_method('identity', 'late'))
    start_worker()
    found = wait_elsewhere(database, prefix, handle.task_id)
    assert found['outcome'] == 'late'
    # the other process read the reply queue: the row still answers here
    assert handle.wait(30) == 'late'


def test_failure_from_the_row(database, prefix, start_worker):
    "A failed call's error, type and traceback come from the row"
    start_worker()
    failure = defer(database, item_method('fail', 'kaput'))
    refused = defer(database, item_method('fail_user', 'refused'))
    with pytest.raises(TaskFailed):
        failure.wait(60)
    with pytest.raises(UserError):
        refused.wait(60)
    for _ in range(2):
        with pytest.raises(TaskFailed) as info:
            TaskHandle(failure.task_id, database=database).wait(5)
        assert info.value.exc_type == 'builtins.ValueError'
        assert info.value.message == 'kaput'
        assert 'raise ValueError(text)' in info.value.traceback
        with pytest.raises(UserError) as info:
            TaskHandle(refused.task_id, database=database).wait(5)
        assert info.value.message == 'refused'
        assert info.value.description == 'from the worker'
    status = task_status(database, failure.task_id)
    assert status['state'] == 'failed'
    assert status['error'] == {
        'type': 'builtins.ValueError', 'message': 'kaput'}
    assert status['result'] is None
    found = wait_elsewhere(database, prefix, failure.task_id)
    assert found['outcome'][0] == 'TaskFailed'
    assert 'kaput' in found['outcome'][1]


def test_unencodable_result(database, start_worker):
    "A result that cannot travel is the same error from the queue and row"
    start_worker()
    handle = defer(database, item_method('unencodable'))
    with pytest.raises(TaskFailed) as info:
        handle.wait(60)
    assert info.value.exc_type == 'builtins.ValueError'
    with pytest.raises(TaskFailed) as again:
        TaskHandle(handle.task_id, database=database).wait(5)
    assert again.value.exc_type == 'builtins.ValueError'
    assert again.value.message == info.value.message
    status = task_status(database, handle.task_id)
    # the call's effects stand: it is done, only its result is an error
    assert status['state'] == 'done'
    assert status['error']['type'] == 'builtins.ValueError'


def test_cancelled_from_the_row(database, prefix, reply_queue):
    "A cancelled task raises TaskCancelled from its row"
    handle = defer(database, item_method('identity', 'never'))
    press_cancel(database, [handle.task_id])
    # the reply of the cancel is read once, by the first handle
    with pytest.raises(TaskCancelled):
        handle.wait(30)
    for _ in range(2):
        with pytest.raises(TaskCancelled):
            TaskHandle(handle.task_id, database=database).wait(5)
    status = task_status(database, handle.task_id)
    assert status['state'] == 'cancelled'
    assert status['error']['type'] == 'TaskCancelled'
    found = wait_elsewhere(database, prefix, handle.task_id)
    assert found == {
        'outcome': ['TaskCancelled',
            "task %s was cancelled" % handle.task_id],
        'state': 'cancelled'}


def test_ready(database, start_worker):
    "ready() is false until the call ran, then true for every handle"
    handle = defer(database, item_method('identity', 3))
    other = TaskHandle(handle.task_id, database=database)
    assert not handle.ready()
    assert not other.ready()
    assert other.state == 'queued'
    with pytest.raises(ResultTimeout):
        other.wait(1)
    start_worker()
    assert wait_until(handle.ready)
    assert wait_until(other.ready)
    assert (handle.wait(0), other.wait(0)) == (3, 3)


def test_ignored_result_from_the_row(database, prefix, start_worker):
    "A handle made from the id of a call that ignores its result gets None"
    start_worker()
    name = 'ignored-%s' % uuid.uuid4()
    done = defer(database, item_method('create_named', name))
    failed = defer(database, item_method('fail_quietly', 'silent'))
    wait_until(lambda: task_status(database, failed.task_id)['state']
        == 'failed')
    assert TaskHandle(done.task_id, database=database).wait(60) is None
    with pytest.raises(TaskFailed) as info:
        TaskHandle(failed.task_id, database=database).wait(5)
    assert info.value.message == 'silent'
    status = task_status(database, done.task_id)
    assert (status['state'], status['result'], status['error']) == (
        'done', None, None)
    assert status['user'] == USER
    assert status['model'] == 'async_sqs.test.item'
    assert status['method'] == 'create_named'
    assert status['enqueued_at'] <= status['started_at'] <= (
        status['finished_at'])
    with Transaction().start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        task, = Task.search([('uuid', '=', done.task_id)])
        # nothing stored for a call that returns nothing
        assert task.result is None


def test_status_of_unknown_task(database):
    "task_status of an id without a row, or not a UUID, is None"
    assert task_status(database, uuid.uuid4().hex) is None
    assert task_status(database, 'not-a-uuid') is None
    assert TaskHandle(uuid.uuid4().hex, database=database).state == 'unknown'


def test_status_inside_another_transaction(database, start_worker):
    "The row is read afresh inside a transaction started before the end"
    start_worker()
    with Transaction().start(database, USER, readonly=True):
        # a first read fixes the snapshot of PostgreSQL's repeatable read
        Pool().get('async_sqs.task').search([], limit=1)
        with Transaction(new=True).start(database, USER):
            handle = Pool().get('async_sqs.test.item').identity.defer('fresh')
        assert TaskHandle(handle.task_id, database=database).wait(60) == (
            'fresh')
        assert task_status(database, handle.task_id)['result'] == 'fresh'


def test_many_awaits(database, prefix, start_worker, reply_queue):
    "Many awaits in one loop end as results arrive; the loop keeps running"
    start_worker(queues=(settings.queue(),), processes=2)

    def run(pool):
        Item = pool.get('async_sqs.test.item')
        # slow: their queue gets a worker once every fast call is back
        slow = [Item.behind_gate.defer(-i) for i in range(SLOW)]
        fast = [Item.identity.defer(i) for i in range(FAST)]
        return slow, fast
    slow, fast = defer(database, run)

    async def main():
        order, ticks, fast_done = [], [0], asyncio.Event()

        async def one(handle, kind):
            order.append((kind, await handle))
            if kind == 'fast' and len(order) == FAST:
                fast_done.set()

        async def ticker():
            while True:
                await asyncio.sleep(0.01)
                ticks[0] += 1

        async def opener():
            # the slow calls end only once every fast one has come back
            await fast_done.wait()
            ticks_then = ticks[0]
            await asyncio.to_thread(start_worker, queues=('other',))
            return ticks_then
        ticking = asyncio.create_task(ticker())
        opening = asyncio.create_task(opener())
        # the slow ones first: with a thread per waiter, they would hold
        # every thread of the pool
        await asyncio.wait_for(asyncio.gather(
                *[one(h, 'slow') for h in slow],
                *[one(h, 'fast') for h in fast]), 600)
        ticking.cancel()
        return order, await opening, ticks[0]
    order, ticks_at_open, ticks = asyncio.run(main())
    assert [k for k, _ in order] == ['fast'] * FAST + ['slow'] * SLOW
    assert sorted(v for k, v in order if k == 'fast') == list(range(FAST))
    assert sorted(v for k, v in order if k == 'slow') == list(
        range(-SLOW + 1, 1))
    assert 0 < ticks_at_open < ticks


def test_wait_async_timeout(database, reply_queue):
    "wait_async() raises ResultTimeout and the handle can wait again"
    handle = defer(database, item_method('identity', 'not yet'))

    async def main():
        with pytest.raises(ResultTimeout):
            await handle.wait_async(1)
        return handle.ready()
    assert asyncio.run(main()) is False


def test_process_reply_queue(database, prefix, start_worker):
    "With reply_queue = process, replies come back on the process's queue"
    config.set('async_sqs', 'reply_queue', 'process')
    try:
        worker = start_worker()
        # the first wait creates the queue: a reply before it is dropped,
        # and the row answers
        first = defer(database, item_method('identity', 'first'))
        assert first.wait(60) == 'first'
        dropped = worker.output().count('reply dropped')
        handles = defer(database, lambda pool: [
                pool.get('async_sqs.test.item').identity.defer(i)
                for i in range(5)])
        with Transaction().start(database, 0, readonly=True):
            Task = Pool().get('async_sqs.task')
            bodies = [t.body for t in Task.search(
                    [('uuid', 'in', [h.task_id for h in handles])])]
        names = {decode_call(b).reply_to for b in bodies}
        assert len(names) == 1
        name, = names
        assert sqs.is_process_reply_queue(name)
        assert [h.wait(60) for h in handles] == list(range(5))
        assert not any(sqs.client().sqs.list_queues(
                    QueueNamePrefix=h.reply_queue).get('QueueUrls')
                for h in handles)
        # a live process's queue stays; one not alive for long goes
        assert sqs.sweep_reply_queues(older_than=3600) == 0
        assert sqs.client().sqs.list_queues(
            QueueNamePrefix=name).get('QueueUrls')
        # another process: its own queue, deleted when it exits
        other = defer(database, item_method('identity', 'there'))
        found = wait_elsewhere(database, prefix, other.task_id)
        assert found['outcome'] == 'there'
        remaining = sqs.client().sqs.list_queues(
            QueueNamePrefix=sqs.reply_queue_prefix() + 'process').get(
            'QueueUrls', [])
        assert [u.rsplit('/', 1)[1] for u in remaining] == [name]
        assert worker.output().count('reply dropped') == dropped
        # what the exit does, done before the server goes: the queue is
        # deleted and the listener's thread ends rather than create another
        found = listener()
        close_listeners(ENDPOINT)
        assert not sqs.client().sqs.list_queues(
            QueueNamePrefix=name).get('QueueUrls')
        wait_until(lambda: not any(
                t.name == 'async_sqs listener replies' and t.is_alive()
                for t in threading.enumerate()))
        with pytest.raises(RuntimeError):
            found.open_queue()
    finally:
        config.set('async_sqs', 'reply_queue', '')
