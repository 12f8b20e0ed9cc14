# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Round trips: defer in a transaction, a real worker runs it, wait()."
import datetime as dt
import uuid
from decimal import Decimal

import pytest
from conftest import items, wait_until

from trytond.exceptions import UserError
from trytond.modules.async_sqs import (
    ResultIgnored, ResultTimeout, TaskFailed, TaskHandle, TaskNotSent)
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def defer(database, function, user=USER, context=None):
    "Run function(pool) in a committed transaction and return its value."
    with Transaction().start(database, user, context=context):
        return function(Pool())


def test_effect_and_result(database, start_worker):
    "A deferred call runs in a worker and its effect is committed"
    start_worker()
    name = 'effect-%s' % uuid.uuid4()
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').create_named.defer(name, value=7))
    assert handle.state == 'sent'
    assert wait_until(lambda: items(database, name)) == [(name, 7)]
    with pytest.raises(ResultIgnored):
        handle.wait(1)


def test_result_types_user_and_context(database, start_worker):
    "Tryton types survive the trip; the call runs as the user with the context"
    start_worker()
    values = [dt.datetime(2026, 11, 23, 12, 30, 1, 5), dt.date(2026, 1, 2),
        dt.time(8, 15), dt.timedelta(hours=3), Decimal('12.345'), b'\x00\xff',
        None, True, 3, 1.5, 'text', {'nested': [1, 'x']}]
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').echo(*values, key=Decimal('1.1'),
            _defer_=True), context={'probe': 'yes', 'language': 'fr'})
    result = handle.wait(60)
    assert result['args'] == values
    assert type(result['args'][4]) is Decimal
    assert result['kwargs'] == {'key': Decimal('1.1')}
    assert result['user'] == USER
    assert result['context'] == {'language': 'fr', 'probe': 'yes'}
    # cached: a second wait answers at once, the reply queue is gone
    assert handle.wait(0) == result


def test_report_quick_start(database, start_worker):
    "The quick start of a report method works as written"
    start_worker()

    def run(pool):
        return pool.get('report.bigreport', type='report').expensive_method(
            1, 2, _defer_=True)
    handle = defer(database, run)
    assert handle.wait(60) == {
        'sum': 3, 'at': dt.date(2026, 11, 23), 'cost': Decimal('1.50')}


def test_wizard_method(database, start_worker):
    "A classmethod of a wizard is deferrable"
    start_worker()
    name = 'wizard-%s' % uuid.uuid4()
    defer(database, lambda pool: pool.get(
            'async_sqs.test.item').create([{'name': name}] * 2))
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.touch', type='wizard').count_items.defer(name))
    assert handle.wait(60) == 2


def test_instance_method_and_records(database, start_worker):
    "Records travel by reference and are browsed again in the worker"
    start_worker()
    name = 'bump-%s' % uuid.uuid4()

    def run(pool):
        Item = pool.get('async_sqs.test.item')
        item, other = Item.create([
                {'name': name, 'value': 1}, {'name': 'other'}])
        return item.bump(5, _defer_=True), Item.describe.defer([item, other])
    bump, describe = defer(database, run)
    assert bump.wait(60) == 6
    assert items(database, name) == [(name, 6)]
    described = describe.wait(60)
    assert [n for _, n, _ in described] == [name, 'other']


def test_deleted_record(database, start_worker):
    "A record deleted before the worker runs gives a clear UserError"
    def run(pool):
        Item = pool.get('async_sqs.test.item')
        item, = Item.create([{'name': 'deleted'}])
        handle = Item.describe.defer([item])
        Item.delete([item])
        return handle
    handle = defer(database, run)
    start_worker()
    with pytest.raises(UserError) as info:
        handle.wait(60)
    assert 'no longer exist' in info.value.message


def test_errors_reach_the_waiter(database, start_worker):
    "UserError comes back as UserError, anything else as TaskFailed"
    worker = start_worker()

    def run(pool):
        Item = pool.get('async_sqs.test.item')
        return (Item.fail_user.defer('user says no'),
            Item.fail.defer('boom'), Item.fail_quietly.defer('quiet'),
            Item.create_named.defer('after failures'))
    user_error, failure, quiet, after = defer(database, run)
    with pytest.raises(UserError) as info:
        user_error.wait(60)
    assert info.value.message == 'user says no'
    assert info.value.description == 'from the worker'
    with pytest.raises(TaskFailed) as info:
        failure.wait(60)
    assert info.value.exc_type == 'builtins.ValueError'
    assert info.value.message == 'boom'
    assert 'raise ValueError(text)' in info.value.traceback
    # the worker logged the failures with the task id and went on
    assert wait_until(lambda: items(database, 'after failures'))
    worker.wait_for_log(quiet.task_id)
    assert 'ValueError: quiet' in worker.output()
    assert worker.process.poll() is None


def test_wait_timeout_then_again(database, start_worker):
    "wait() raises ResultTimeout, and the handle can wait again"
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').echo.defer('late'))
    with pytest.raises(ResultTimeout) as info:
        handle.wait(1)
    assert isinstance(info.value, TimeoutError)
    start_worker()
    assert handle.wait(60)['args'] == ['late']


def test_handle_from_task_id(database, start_worker):
    "A handle made again from the task id waits for the same result"
    start_worker()
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').echo.defer('by id'))
    assert TaskHandle(handle.task_id).wait(60)['args'] == ['by id']


def test_override_without_decorator(database, start_worker):
    "An override that does not repeat the decorator stays deferrable"
    start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        assert Item.overridden(1) == ['override', 'base', 1]
        handle = Item.overridden.defer(2)
        other = Item.overridden(3, _defer_=True)
    assert handle.wait(60) == ['override', 'base', 2]
    assert other.wait(60) == ['override', 'base', 3]


def test_named_queue(database, start_worker):
    "A method with a queue of its own is served by a default worker"
    start_worker()
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').on_other_queue.defer(21))
    assert handle.wait(60) == 42


def test_rollback_sends_nothing(database, start_worker):
    "A deferred call of a transaction that rolls back never leaves"
    with pytest.raises(ZeroDivisionError):
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            handle = Item.echo.defer('rolled back')
            1 / 0
    with pytest.raises(TaskNotSent):
        handle.wait(1)
    worker = start_worker()
    check = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').echo.defer('marker'))
    assert check.wait(60)['args'] == ['marker']
    assert handle.task_id not in worker.output()


def test_readonly_transaction(database, start_worker):
    "A call deferred from a read-only transaction leaves when it ends well"
    with Transaction().start(database, USER, readonly=True):
        sent = Pool().get('async_sqs.test.item').echo.defer('readonly')
    with pytest.raises(KeyError):
        with Transaction().start(database, USER, readonly=True):
            dropped = Pool().get('async_sqs.test.item').echo.defer('error')
            {}['missing']
    assert sent.state == 'sent'
    assert dropped.state == 'dropped'
    worker = start_worker()
    assert sent.wait(60)['args'] == ['readonly']
    with pytest.raises(TaskNotSent):
        dropped.wait(1)
    assert dropped.task_id not in worker.output()


def test_plain_call_runs_here(database):
    "Called without _defer_ the method runs at once, in the caller"
    import os
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        result = Item.echo('here')
        assert result['pid'] == os.getpid()
        Item.create_named('plain', value=1)
        assert [i.value for i in Item.search([('name', '=', 'plain')])] == [1]
        Transaction().rollback()


def test_sigterm_finishes_calls_in_flight(database, start_worker):
    "SIGTERM: the call in flight finishes, the others wait for the next worker"
    worker = start_worker(processes=2)
    slow_name, queued = 'slow-%s' % uuid.uuid4(), 'queued-%s' % uuid.uuid4()

    def run(pool):
        Item = pool.get('async_sqs.test.item')
        slow = Item.sleep_then_create.defer(slow_name, 3)
        for i in range(20):
            Item.create_named.defer(queued, value=i)
        return slow
    slow = defer(database, run)
    worker.wait_for_log('<Task %s async_sqs.test.item.sleep_then_create@%s> '
        'starts' % (slow.task_id, database))
    assert worker.terminate() == 0
    assert slow.wait(0) == slow_name
    assert items(database, slow_name) == [(slow_name, None)]
    start_worker()
    found = wait_until(lambda: len(items(database, queued)) >= 20
        and items(database, queued))
    assert sorted(v for _, v in found) == list(range(20))


def test_dead_worker_process_replaced(database, start_worker):
    "A worker process that dies is replaced and the work goes on"
    import os
    import re
    import signal
    worker = start_worker()
    pid = int(re.search(r'ready, pid (\d+)', worker.output()).group(1))
    os.kill(pid, signal.SIGKILL)
    worker.wait_for_log('exited with -9')
    worker.ready(count=2)
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').echo.defer('after restart'))
    assert handle.wait(60)['pid'] != pid


def test_processes_share_the_supervisor_pool(database, start_worker):
    "The supervisor inits the pool once, before its processes fork"
    import os
    import re
    import signal

    def inheritable():
        "Return what the supervisor holds open that a child would share."
        fds = '/proc/%s/fd' % worker.process.pid
        targets = []
        for fd in os.listdir(fds):
            try:
                targets.append(os.readlink(os.path.join(fds, fd)))
            except FileNotFoundError:
                pass
        return [t for t in targets if t.startswith('socket:')
            or '%s.sqlite' % database in t]
    worker = start_worker(processes=2)
    assert worker.output().count('init pool for "%s"' % database) == 1
    assert inheritable() == []
    pid = int(re.search(r'ready, pid (\d+)', worker.output()).group(1))
    os.kill(pid, signal.SIGKILL)
    worker.wait_for_log('exited with -9')
    worker.ready(count=3)
    # the process started again forked from the same pool
    assert worker.output().count('init pool for "%s"' % database) == 1
    assert inheritable() == []
    handle = defer(database, lambda pool: pool.get(
            'async_sqs.test.item').echo.defer('shared pool'))
    assert handle.wait(60)['args'] == ['shared pool']


def test_prefetch_spreads_slow_calls(database, start_worker):
    "With a prefetch of one, two slow calls go to two processes at once"
    start_worker(processes=2, options={'prefetch': '1'})

    def run(pool):
        Item = pool.get('async_sqs.test.item')
        return [Item.sleep_then_pid.defer(2) for _ in range(2)]
    handles = defer(database, run)
    pids = [h.wait(60) for h in handles]
    assert pids[0] != pids[1]
