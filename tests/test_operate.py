# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Operating deferred work: retry, cancel, who may, cleaning, reply queues."
import datetime as dt
import os
import tempfile
import uuid

import pytest
from conftest import items, wait_until

from trytond import config
from trytond.exceptions import UserError
from trytond.model.modelstorage import AccessError
from trytond.modules.async_sqs import (
    AsyncTaskError, TaskCancelled, TaskFailed, TaskHandle, sqs)
from trytond.modules.async_sqs.message import decode_calls
from trytond.modules.async_sqs.sqs import reply_queue_attributes
from trytond.modules.async_sqs.task import CLEAN_SLICE, STATES
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def row(database, task_id):
    "Return the task row of the task id as a dict, or None."
    with Transaction(new=True).start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        tasks = Task.search([('uuid', '=', task_id)])
        if not tasks:
            return None
        task, = tasks
        return {
            'id': task.id, 'state': task.state, 'attempts': task.attempts,
            'error': task.error, 'body': task.body, 'queue': task.queue,
            'finished_at': task.finished_at, 'record': task.record,
            'records': task.records,
            }


def press(database, button, task_ids, user=USER, check_access=False):
    "Call the button on the tasks of the ids, in a committed transaction."
    context = {'_check_access': True} if check_access else {}
    with Transaction().start(database, user, context=context):
        Task = Pool().get('async_sqs.task')
        with Transaction().set_context(_check_access=False):
            tasks = Task.search([('uuid', 'in', task_ids)])
        getattr(Task, button)(tasks)


def set_state(database, task_ids, state, finished_at=None):
    "Put the rows in a state, as a worker or an operator would have."
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        cursor.execute(*table.update(
                [table.state, table.finished_at], [state, finished_at],
                where=table.uuid.in_(list(task_ids))))


def queue_messages(queue_name):
    "Return (visible, in flight, delayed) messages of the queue."
    transport = sqs.client()
    attributes = transport.sqs.get_queue_attributes(
        QueueUrl=transport.url(queue_name), AttributeNames=['All'],
        )['Attributes']
    return tuple(int(attributes[k]) for k in (
            'ApproximateNumberOfMessages',
            'ApproximateNumberOfMessagesNotVisible',
            'ApproximateNumberOfMessagesDelayed'))


def test_task_cancelled_exported():
    "TaskCancelled is importable from the module and an AsyncTaskError"
    assert issubclass(TaskCancelled, AsyncTaskError)


def test_retry_failed_runs_again(database, prefix, start_worker):
    "A failed task retried runs again and a later wait() gets the new outcome"
    path = tempfile.mktemp(prefix='retry-')
    name = 'retry-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        read = Item.fail_until.defer(path, name)
        unread = Item.fail_until.defer(path, name + '-unread')
    with pytest.raises(TaskFailed, match='no file at'):
        read.wait(60)
    wait_until(lambda: row(database, unread.task_id)['state'] == 'failed')
    # nobody read the failure of the second: it waits in its reply queue
    wait_until(lambda: queue_messages(unread.reply_queue)[0] == 1)
    failed = row(database, unread.task_id)
    assert failed['attempts'] == 1
    open(path, 'w').close()
    try:
        press(database, 'retry', [read.task_id, unread.task_id])
        retried = row(database, unread.task_id)
        assert retried['state'] in {'queued', 'running', 'done'}
        # a handle caches what it read: wait again with a new one
        for handle, expected in [(read, name), (unread, name + '-unread')]:
            again = TaskHandle(handle.task_id, database=database)
            assert again.wait(60) == expected
        for handle in (read, unread):
            task = row(database, handle.task_id)
            assert (task['state'], task['attempts'], task['error']) == (
                'done', 1, None)
        assert items(database, name) == [(name, None)]
        assert worker.output().count(
            '<Task %s async_sqs.test.item.fail_until@%s> starts'
            % (unread.task_id, database)) == 2
    finally:
        os.unlink(path)


def test_retry_packed_call_goes_alone(database, prefix, start_worker):
    "A retried call that was packed is sent alone, the others not again"
    path = tempfile.mktemp(prefix='packed-')
    other = tempfile.mktemp(prefix='packed-ok-')
    open(other, 'w').close()
    name = 'packed-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.packed_until.defer(p, '%s-%s' % (name, i))
            for i, p in enumerate([other, path, other])]
    for i, handle in enumerate(handles):
        if i == 1:
            with pytest.raises(TaskFailed):
                handle.wait(60)
        else:
            assert handle.wait(60) == '%s-%s' % (name, i)
    worker.terminate()
    task = row(database, handles[1].task_id)
    assert task['state'] == 'failed'
    open(path, 'w').close()
    try:
        press(database, 'retry', [handles[1].task_id])
        assert row(database, handles[1].task_id)['state'] == 'queued'
        transport = sqs.client()
        url = transport.url(task['queue'])
        messages = wait_until(lambda: transport.receive(url, wait_time=1))
        assert len(messages) == 1
        calls, packed = decode_calls(messages[0]['Body'])
        assert not packed
        assert [c.task for c in calls] == [handles[1].task_id]
        assert messages[0]['Body'] == task['body']
        transport.change_visibility_batch(
            url, [messages[0]['ReceiptHandle']], 0)
        worker = start_worker()
        assert TaskHandle(handles[1].task_id, database=database).wait(
            60) == '%s-1' % name
        for i in range(3):
            assert items(database, '%s-%s' % (name, i)) == [
                ('%s-%s' % (name, i), None)]
        # the others of its message were not sent again
        assert worker.output().count('> starts') == 1
    finally:
        os.unlink(path)
        os.unlink(other)


def test_cancel_queued(database, prefix, start_worker):
    "A cancelled task does not run: its message is deleted, waiters told"
    name = 'cancel-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        echo = Item.echo.defer('cancelled')
        quiet = Item.create_named.defer(name)
    press(database, 'cancel', [echo.task_id, quiet.task_id])
    for handle in (echo, quiet):
        task = row(database, handle.task_id)
        assert task['state'] == 'cancelled'
        assert task['finished_at'] is not None
    with pytest.raises(TaskCancelled) as info:
        echo.wait(30)
    assert info.value.task_id == echo.task_id
    worker = start_worker()
    for handle in (echo, quiet):
        worker.wait_for_log('<Task %s %s@%s> skipped: cancelled already' % (
                handle.task_id, 'async_sqs.test.item.' + (
                    'echo' if handle is echo else 'create_named'), database))
    queue = row(database, quiet.task_id)['queue']
    wait_until(lambda: queue_messages(queue) == (0, 0, 0))
    assert items(database, name) == []
    assert 'async_sqs.test.item.echo@%s> done' % database not in (
        worker.output())
    for handle in (echo, quiet):
        assert row(database, handle.task_id)['state'] == 'cancelled'


def test_cancel_then_retry(database, prefix, start_worker):
    "A cancelled task retried runs, and a new waiter gets its result"
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').echo.defer('again')
    press(database, 'cancel', [handle.task_id])
    # the cancel reply is in the reply queue: the retry must remove it
    wait_until(lambda: queue_messages(handle.reply_queue)[0] == 1)
    press(database, 'retry', [handle.task_id])
    start_worker()
    again = TaskHandle(handle.task_id, database=database)
    assert again.wait(60)['args'] == ['again']
    assert row(database, handle.task_id)['state'] == 'done'


@pytest.mark.parametrize('button,allowed', [
        ('retry', {'failed', 'cancelled'}),
        ('cancel', {'waiting', 'pending', 'queued'}),
        ])
def test_wrong_state_refused(database, prefix, button, allowed):
    "A button on a task in another state is refused with a UserError"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handle = Item.create_named.defer('state-%s' % uuid.uuid4())
    for state in [s for s, _ in STATES if s not in allowed] + ['bogus']:
        set_state(database, [handle.task_id], state)
        with pytest.raises(UserError) as info:
            press(database, button, [handle.task_id])
        assert handle.task_id in info.value.message
        assert ("only failed or cancelled" if button == 'retry'
            else "only waiting, pending or queued") in info.value.message
        assert row(database, handle.task_id)['state'] == state
    # a state of no one's: not left for the tests that count the states
    set_state(database, [handle.task_id], 'cancelled')


def make_user(database, login, groups=()):
    "Create a user in the groups (XML ids), committed; return its id."
    with Transaction().start(database, 0):
        pool = Pool()
        User = pool.get('res.user')
        ModelData = pool.get('ir.model.data')
        user, = User.create([{
                    'login': login, 'name': login,
                    'groups': [('add', [
                                ModelData.get_id(*g.split('.'))
                                for g in groups])],
                    }])
        return user.id


def test_buttons_access(database, prefix):
    "Only the group and administrators may read tasks and press the buttons"
    suffix = uuid.uuid4().hex[:8]
    outsider = make_user(database, 'outsider-%s' % suffix)
    operator = make_user(database, 'operator-%s' % suffix,
        groups=['async_sqs.group_task_admin'])
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.create_named.defer('access-%s' % i)
            for i in range(3)]
    task_ids = [h.task_id for h in handles]
    with pytest.raises(AccessError):
        press(database, 'cancel', task_ids[:1], user=outsider,
            check_access=True)
    with Transaction().start(database, outsider,
            context={'_check_access': True}):
        Task = Pool().get('async_sqs.task')
        with pytest.raises(AccessError):
            Task.search([])
    assert row(database, task_ids[0])['state'] == 'queued'
    press(database, 'cancel', task_ids[:1], user=operator, check_access=True)
    press(database, 'cancel', task_ids[1:2], user=USER, check_access=True)
    assert row(database, task_ids[0])['state'] == 'cancelled'
    assert row(database, task_ids[1])['state'] == 'cancelled'
    with pytest.raises(AccessError):
        press(database, 'retry', task_ids[:1], user=outsider,
            check_access=True)
    # the state shown to the client is enforced too
    with pytest.raises(UserError):
        press(database, 'retry', task_ids[2:], user=operator,
            check_access=True)
    with Transaction().start(database, operator,
            context={'_check_access': True}):
        Task = Pool().get('async_sqs.task')
        assert len(Task.search([('uuid', 'in', task_ids)])) == 3
    with Transaction().start(database, 0, readonly=True):
        pool = Pool()
        Button = pool.get('ir.model.button')
        ModelData = pool.get('ir.model.data')
        group = ModelData.get_id('async_sqs', 'group_task_admin')
        for name in ('retry', 'cancel'):
            assert Button.get_groups('async_sqs.task', name) == {group}
        Menu = pool.get('ir.ui.menu')
        menu = Menu(ModelData.get_id('async_sqs', 'menu_task_form'))
        assert [g.id for g in menu.groups] == [group]


def test_record_opens(database, prefix):
    "The task names its record as a reference the client opens"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        first, second = Item.create([{'name': 'a'}, {'name': 'b'}])
        on_record = first.bump.defer(1)
        on_list = Item.describe.defer([second, first])
        plain = Item.create_named.defer('plain')
    with Transaction().start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        found = {t.uuid: t for t in Task.search([('uuid', 'in', [
                            on_record.task_id, on_list.task_id,
                            plain.task_id])])}
        record = found[on_record.task_id].record
        assert (record.__name__, record.id) == (
            'async_sqs.test.item', first.id)
        assert found[on_list.task_id].record.id == second.id
        assert found[on_list.task_id].records == (
            'async_sqs.test.item,%s,%s' % (second.id, first.id))
        assert found[plain.task_id].record is None
        models = dict(Task.get_record_models())
        assert 'async_sqs.test.item' in models


def insert_rows(database, count, state, finished_at, method='clean'):
    "Insert count rows in state, finished at finished_at; return uuids."
    uuids = [uuid.uuid4().hex for _ in range(count)]
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        Task.insert_pending([{
                    'uuid': u, 'queue': 'q', 'model': 'async_sqs.test.item',
                    'method': method, 'records': None, 'user': USER,
                    'eta': None, 'body': '{}'} for u in uuids])
    set_state(database, uuids, state, finished_at)
    return uuids


def test_clean(database, prefix):
    "The cron deletes old finished rows only, in slices; 0 keeps them"
    now = dt.datetime.now()
    old, recent = now - dt.timedelta(days=31), now - dt.timedelta(days=29)
    method = 'clean_%s' % uuid.uuid4().hex[:8]
    doomed = []
    for state in ('done', 'failed', 'cancelled'):
        doomed += insert_rows(database, 2, state, old, method)
    doomed += insert_rows(database, CLEAN_SLICE + 3, 'done', old, method)
    kept = insert_rows(database, 1, 'done', recent, method)
    for state in ('pending', 'queued', 'running'):
        # a queued row may have finished an attempt long ago
        kept += insert_rows(database, 1, state, old, method)

    def remaining():
        with Transaction().start(database, 0, readonly=True):
            Task = Pool().get('async_sqs.task')
            return {t.uuid for t in Task.search([('method', '=', method)])}
    config.set('async_sqs', 'clean_days', '0')
    try:
        with Transaction().start(database, 0):
            pool = Pool()
            Cron = pool.get('ir.cron')
            cron, = Cron.search([('method', '=', 'async_sqs.task|clean')])
            assert (cron.interval_number, cron.interval_type) == (1, 'days')
            Cron.run_once([cron])
        assert remaining() == set(doomed) | set(kept)
        config.set('async_sqs', 'clean_days', '30')
        with Transaction().start(database, 0):
            Cron = Pool().get('ir.cron')
            Cron.run_once(Cron.search(
                    [('method', '=', 'async_sqs.task|clean')]))
        assert remaining() == set(kept)
        with Transaction().start(database, 0):
            assert Pool().get('async_sqs.task').clean(days=28) == 1
        assert remaining() == set(kept[1:])
        config.set('async_sqs', 'clean_days', '-1')
        with pytest.raises(ValueError, match='clean_days'):
            with Transaction().start(database, 0):
                Pool().get('async_sqs.task').clean()
    finally:
        config.set('async_sqs', 'clean_days', '30')
        # a pending row left behind would be sent by the relay of later tests
        with Transaction().start(database, 0):
            Task = Pool().get('async_sqs.task')
            table = Task.__table__()
            Transaction().connection.cursor().execute(
                *table.delete(where=table.method == method))


def test_sweep_reply_queues(database, prefix):
    "Old reply queues are swept, new ones and task queues kept"
    transport = sqs.client()
    names = [sqs.reply_queue_name(uuid.uuid4().hex) for _ in range(3)]
    for name in names:
        transport.create(name, reply_queue_attributes())
    # the task queue of a database named reply starts the same way
    task_queue = sqs.task_queue_name('reply')
    transport.url(task_queue)

    def listed():
        return {url.rsplit('/', 1)[-1]
            for url in transport.list_queues(prefix + '-', page_size=2)}
    assert listed() >= set(names) | {task_queue}
    assert sqs.sweep_reply_queues() == 0
    assert sqs.sweep_reply_queues(older_than=3600) == 0
    assert sqs.sweep_reply_queues(older_than=0) == 3
    assert task_queue in listed()
    assert not listed() & set(names)
    with pytest.raises(ValueError):
        sqs.sweep_reply_queues(older_than=-1)
    # a queue gone meanwhile is no error
    url = transport.create(names[0], reply_queue_attributes())
    transport.delete_queue(names[0])
    assert transport.created_at(url) is None
    assert transport.delete_queue(names[0], url=url) is False
