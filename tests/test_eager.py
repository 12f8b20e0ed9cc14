# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Eager mode: deferred calls run in the caller's process, without SQS."
import os
import socket
import uuid

import pytest
from conftest import ENDPOINT, SECRET, items
from test_reliability import row

from trytond import config
from trytond.exceptions import UserError
from trytond.modules.async_sqs import TaskFailed, TaskNotSent, settings, sqs
from trytond.modules.async_sqs.exceptions import SigningKeyMissing
from trytond.modules.async_sqs.testing import eager, local_sqs
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


@pytest.fixture
def no_sqs():
    "No endpoint that answers and no secret: eager mode needs neither."
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        closed_port = sock.getsockname()[1]
    config.set(
        'async_sqs', 'endpoint_url', 'http://127.0.0.1:%s' % closed_port)
    config.set('async_sqs', 'max_attempts', '1')
    config.set('async_sqs', 'secret', '')
    try:
        yield
    finally:
        config.set('async_sqs', 'endpoint_url', ENDPOINT)
        config.set('async_sqs', 'max_attempts', '5')
        config.set('async_sqs', 'secret', SECRET)


def test_eager_helper_sets_and_restores():
    "eager() turns eager mode on for its block only"
    assert not settings.eager()
    with eager():
        assert settings.eager()
    assert not settings.eager()


def test_eager_result(database, prefix, no_sqs):
    "The call runs after the commit, here, as the user with the context"
    name = 'eager-%s' % uuid.uuid4()
    with pytest.raises(SigningKeyMissing):
        with Transaction().start(database, USER):
            Pool().get('async_sqs.test.item').create_named.defer(name)
    with eager():
        with Transaction().start(database, USER, context={'probe': 'x'}):
            Item = Pool().get('async_sqs.test.item')
            handle = Item.echo.defer(1, key='value')
            created = Item.create_named.defer(name, value=3)
            with pytest.raises(TaskNotSent):
                handle.wait(0)
            assert items(database, name) == []
        result = handle.wait(0)
    assert result['args'] == [1]
    assert result['kwargs'] == {'key': 'value'}
    assert result['user'] == USER
    assert result['context']['probe'] == 'x'
    assert result['pid'] == os.getpid()
    assert items(database, name) == [(name, 3)]
    for task_id in (handle.task_id, created.task_id):
        task = row(database, task_id)
        assert (task['state'], task['attempts']) == ('done', 1)
        assert task['worker'].startswith('eager ')


def test_eager_errors(database, prefix, no_sqs):
    "A UserError comes back as such, other errors as TaskFailed; rows failed"
    with eager():
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            user_error = Item.fail_user.defer('refused here')
            failure = Item.fail.defer('broken here')
            quiet = Item.fail_quietly.defer('quietly broken')
    with pytest.raises(UserError, match='refused here'):
        user_error.wait(0)
    with pytest.raises(TaskFailed) as info:
        failure.wait(0)
    assert info.value.exc_type == 'builtins.ValueError'
    assert 'broken here' in info.value.traceback
    task = row(database, user_error.task_id)
    assert (task['state'], task['error']) == ('failed', 'refused here')
    task = row(database, failure.task_id)
    assert (task['state'], task['error']) == ('failed', 'broken here')
    with Transaction().start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        task, = Task.search([('uuid', '=', failure.task_id)])
        assert 'ValueError: broken here' in task.traceback
    assert row(database, quiet.task_id)['state'] == 'failed'


def test_eager_retries(database, prefix, no_sqs, tmp_path):
    "Retries run at once, each attempt counted"
    path = str(tmp_path / 'flaky')
    with eager():
        with Transaction().start(database, USER):
            handle = Pool().get('async_sqs.test.item').flaky.defer(path, 2)
    assert handle.wait(0) == 3
    task = row(database, handle.task_id)
    assert (task['state'], task['attempts']) == ('done', 3)


def test_eager_rollback_runs_nothing(database, prefix, no_sqs):
    "A rollback drops the calls: no row, no effect"
    name = 'eager-rollback-%s' % uuid.uuid4()
    with eager():
        with pytest.raises(ZeroDivisionError):
            with Transaction().start(database, USER):
                Item = Pool().get('async_sqs.test.item')
                handle = Item.create_named.defer(name)
                1 / 0
    assert handle.state == 'dropped'
    assert row(database, handle.task_id) is None
    assert items(database, name) == []


def test_eager_readonly(database, prefix, no_sqs):
    "A read-only transaction that ends cleanly runs its calls"
    name = 'eager-readonly-%s' % uuid.uuid4()
    with eager():
        with Transaction().start(database, USER, readonly=True):
            Item = Pool().get('async_sqs.test.item')
            handle = Item.create_named.defer(name)
            Touch = Pool().get('async_sqs.test.touch', type='wizard')
            count = Touch.count_items.defer(name)
    assert items(database, name) == [(name, 0)]
    assert row(database, handle.task_id)['state'] == 'done'
    # run in the order deferred, each after the one before committed
    assert count.wait(0) == 1


def test_eager_instance_method(database, prefix, no_sqs):
    "A call of a record's method gets the record, browsed again"
    name = 'eager-record-%s' % uuid.uuid4()
    with eager():
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            item, = Item.create([{'name': name, 'value': 1}])
            handle = item.bump.defer(2)
    assert handle.wait(0) == 3
    assert items(database, name) == [(name, 3)]


def test_local_sqs(prefix):
    "local_sqs() serves SQS for its block and points the options at it"
    with local_sqs() as url:
        assert settings.endpoint_url() == url != ENDPOINT
        transport = sqs.client()
        name = sqs.task_queue_name('db', 'local')
        queue_url = transport.url(name)
        assert queue_url.startswith(url)
        transport.send(queue_url, 'hello')
        bodies = [m['Body'] for m in transport.receive(queue_url, wait_time=1)]
        assert bodies == ['hello']
    assert settings.endpoint_url() == ENDPOINT
    with pytest.raises(OSError):
        import urllib.request
        urllib.request.urlopen(url + '/moto-api/', timeout=1)


def test_eager_retry(database, prefix, no_sqs):
    "A task retried in eager mode runs again here"
    name, flag = 'eager-retry-%s' % uuid.uuid4(), 'flag-%s' % uuid.uuid4()
    with eager():
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            handle = Item.fail_until_item.defer(flag, name)
        assert row(database, handle.task_id)['state'] == 'failed'
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            Item.create([{'name': flag}])
            Task = Pool().get('async_sqs.task')
            Task.retry(Task.search([('uuid', '=', handle.task_id)]))
    assert row(database, handle.task_id)['state'] == 'done'
    assert items(database, name) == [(name, None)]
