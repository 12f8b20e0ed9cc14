# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Chains and groups: calls deferred once others are done, exactly once."
import json
import os
import signal
import uuid

import pytest
from conftest import items, wait_until
from test_eager import no_sqs  # noqa: F401
from test_operate import press

from trytond.exceptions import UserError
from trytond.modules.async_sqs import (
    TaskCancelled, TaskFailed, TaskGroup, TaskHandle, group)
from trytond.modules.async_sqs.testing import eager
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def link_row(database, task_id):
    "Return the state and links of the row of task_id, None without one."
    with Transaction(new=True).start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        tasks = Task.search([('uuid', '=', task_id)])
        if not tasks:
            return None
        task, = tasks
        return {'state': task.state, 'then': json.loads(task.then or '[]'),
            'waiting_for': task.waiting_for, 'body': task.body,
            'error': task.error}


def values(database, name):
    return sorted(v for _, v in items(database, name))


def test_chain_of_three(database, prefix, start_worker):
    "Each link gets the result of the one before it, and runs once"
    name = 'chain-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.add_then_create.defer(1, name, 1)
        second = first.then(Item.add_then_create, name, 10)
        last = second.then(Item.add_then_create, name, 100)
    assert (second.state, last.state) == ('waiting', 'waiting')
    # the continuation is on the row, not in the message
    found = link_row(database, first.task_id)
    assert found['then'] == [[second.task_id, None]]
    assert second.task_id not in found['body']
    found = link_row(database, last.task_id)
    assert (found['state'], found['waiting_for']) == ('waiting', 1)
    start_worker()
    assert last.wait(60) == 112
    assert (first.wait(60), second.wait(60)) == (2, 12)
    assert values(database, name) == [2, 12, 112]
    for handle in (first, second, last):
        assert link_row(database, handle.task_id)['state'] == 'done'


def test_failing_link_stops_the_chain(database, prefix, start_worker):
    "A link failed for good fails the links after it: their waiters know"
    name = 'broken-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.add_then_create.defer(1, name, 1)
        failing = first.then(Item.fail)
        last = failing.then(Item.add_then_create, name, 100)
    start_worker()
    with pytest.raises(TaskFailed) as info:
        last.wait(60)
    assert info.value.task_id == last.task_id
    assert info.value.exc_type == 'builtins.ValueError'
    assert 'a call it waits for failed' in info.value.message
    with pytest.raises(TaskFailed) as info:
        failing.wait(60)
    assert info.value.exc_type == 'builtins.ValueError'
    assert values(database, name) == [2]
    assert link_row(database, last.task_id)['state'] == 'failed'


def test_cancel_then_retry_resumes(database, prefix, start_worker):
    "A cancel cancels the links after it; its retry lets them run again"
    name = 'cancelled-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.add_then_create.defer(1, name, 1)
        second = first.then(Item.add_then_create, name, 10)
        last = second.then(Item.add_then_create, name, 100)
    press(database, 'cancel', [first.task_id])
    with pytest.raises(TaskCancelled):
        last.wait(10)
    assert link_row(database, second.task_id)['state'] == 'cancelled'
    # its row holds its call without the result it waits for
    with pytest.raises(UserError, match="never deferred"):
        press(database, 'retry', [second.task_id])
    press(database, 'retry', [first.task_id])
    assert link_row(database, last.task_id)['state'] == 'waiting'
    start_worker()
    # the handle keeps the outcome it read: a new one reads the new
    assert TaskHandle(last.task_id, database=database).wait(60) == 112
    assert values(database, name) == [2, 12, 112]


def test_cancel_a_waiting_link(database, prefix, start_worker):
    "A link cancelled while it waits is not deferred, nor those after it"
    name = 'skip-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first = Item.add_then_create.defer(1, name, 1)
        second = first.then(Item.add_then_create, name, 10)
        last = second.then(Item.add_then_create, name, 100)
    press(database, 'cancel', [second.task_id])
    start_worker()
    assert first.wait(60) == 2
    with pytest.raises(TaskCancelled):
        second.wait(60)
    with pytest.raises(TaskCancelled):
        last.wait(60)
    assert values(database, name) == [2]


def test_group_callback_once(database, prefix, start_worker):
    "The callback of a group of 5 gets the 5 results, in order, once"
    name = 'group-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        members = group(*(Item.slow_value.defer(i, 0, name + '-member')
                for i in range(5)))
        callback = members.then(Item.collect, name)
    assert isinstance(members, TaskGroup)
    found = link_row(database, callback.task_id)
    assert (found['state'], found['waiting_for']) == ('waiting', 5)
    assert link_row(database, members.handles[3].task_id)['then'] == [
        [callback.task_id, 3]]
    start_worker(processes=2)
    assert callback.wait(60) == [0, 1, 2, 3, 4]
    assert members.wait(60) == [0, 1, 2, 3, 4]
    assert items(database, name) == [(name, 10)]
    assert values(database, name + '-member') == [0, 1, 2, 3, 4]


def test_group_member_fails(database, prefix, start_worker):
    "A member failed for good fails the callback; the group wait raises"
    name = 'group-failed-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        members = group(Item.identity.defer(1), Item.fail.defer('member'),
            Item.identity.defer(3))
        callback = members.then(Item.collect, name)
    start_worker()
    with pytest.raises(TaskFailed) as info:
        callback.wait(60)
    assert 'member' in info.value.message
    with pytest.raises(TaskFailed):
        members.wait(60)
    assert members.handles[2].wait(60) == 3
    assert items(database, name) == []


def test_group_survives_a_killed_worker(database, prefix, start_worker):
    "Members on 2 processes, one killed mid-way, another started: once"
    name = 'group-killed-%s' % uuid.uuid4()
    options = {'visibility_timeout': 2, 'relay_grace': 1}
    killed = start_worker(options=options)
    start_worker(options=options)
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        members = group(*(Item.slow_value.defer(i, 1, name + '-member')
                for i in range(8)))
        callback = members.then(Item.collect, name)
    wait_until(lambda: len(items(database, name + '-member')) >= 2)
    os.killpg(killed.process.pid, signal.SIGKILL)
    killed.process.wait(10)
    start_worker(options=options)
    assert callback.wait(120) == list(range(8))
    assert items(database, name) == [(name, 28)]
    assert values(database, name + '-member') == list(range(8))


def test_eager_chain_and_group(database, prefix, no_sqs):  # noqa: F811
    "In eager mode the links run here, each after the calls it waits for"
    name = 'eager-chain-%s' % uuid.uuid4()
    with eager():
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            first = Item.add_then_create.defer(1, name, 1)
            last = first.then(Item.add_then_create, name, 10).then(
                Item.add_then_create, name, 100)
            callback = group(first, Item.identity.defer(5)).then(
                Item.collect, name + '-sum')
        assert last.wait(0) == 112
        assert callback.wait(0) == [2, 5]
    assert values(database, name) == [2, 12, 112]
    assert items(database, name + '-sum') == [(name + '-sum', 7)]


def test_then_refused(database, prefix):
    "then() takes only deferrable methods, of calls not committed yet"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handle = Item.identity.defer(1)
        with pytest.raises(TypeError, match="decorated with async_task"):
            handle.then(Item.not_deferrable)
        with pytest.raises(TypeError, match="decorated with async_task"):
            group(handle).then(print)
        with pytest.raises(TypeError, match="_delay_"):
            handle.then(Item.identity, _delay_=5)
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        with pytest.raises(RuntimeError, match="same transaction"):
            handle.then(Item.identity)
    assert link_row(database, handle.task_id)['then'] == []
