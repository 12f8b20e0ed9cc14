# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Only signed calls to decorated methods run; hostile input changes nothing."
import json
import subprocess
import uuid

import pytest
from conftest import SECRET, Worker, dead_letters, items, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trytond import config
from trytond.modules.async_sqs import ResultTimeout, sqs
from trytond.modules.async_sqs.exceptions import MessageError
from trytond.modules.async_sqs.message import (
    decode_call, encode_reply, signature_attributes, verify)
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def task_body(database, handle):
    with Transaction().start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        task, = Task.search([('uuid', '=', handle.task_id)])
        return task.queue, task.body


def with_secret(value):
    config.set('async_sqs', 'secret', value)


def test_signature_checked():
    "A body altered after signing, or signed with another key, is refused"
    body = '{"v": 1}'
    message = {'Body': body, 'MessageAttributes': signature_attributes(body)}
    verify(message)
    with pytest.raises(MessageError, match='does not match'):
        verify(dict(message, Body='{"v": 2}'))
    with pytest.raises(MessageError, match='not signed'):
        verify({'Body': body})
    with_secret('another key')
    try:
        with pytest.raises(MessageError, match='unknown key'):
            verify(message)
        # rotation: the old key stays accepted among the previous ones
        config.set('async_sqs', 'previous_secrets', 'older\n' + SECRET)
        verify(message)
    finally:
        with_secret(SECRET)
        config.set('async_sqs', 'previous_secrets', '')


def test_forged_messages_refused(database, prefix, start_worker):
    "Unsigned, re-signed with a wrong key or replayed messages never run"
    name = 'forged-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        genuine = Item.create_named.defer(name, value=1)
    queue_name, body = task_body(database, genuine)
    wait_until(lambda: items(database, name) == [(name, 1)])
    transport = sqs.client()
    url = transport.url(queue_name)
    # a new task id: a forger cannot write the task row
    forged = body.replace(genuine.task_id, uuid.uuid4().hex)
    transport.send(url, forged)
    with_secret('not the key')
    try:
        transport.send(url, forged, attributes=signature_attributes(forged))
    finally:
        with_secret(SECRET)
    transport.send(url, forged, attributes=signature_attributes(forged))
    # a replay of the genuine message, signed and all
    transport.send(url, body, attributes=signature_attributes(body))
    assert len(dead_letters(queue_name, 3)) == 3
    worker.wait_for_log('skipped: done already')
    output = worker.output()
    assert 'message is not signed' in output
    assert 'signed with unknown key' in output
    assert 'no task row' in output
    assert items(database, name) == [(name, 1)]


def test_forged_reply_ignored(database, prefix):
    "A waiter ignores a reply that is not signed with a known key"
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').echo.defer('x')
    transport = sqs.client()
    name = handle.reply_queue
    url = transport.create(name, {'MessageRetentionPeriod': '3600'})
    transport.send(url, encode_reply(handle.task_id, 'forged'))
    with pytest.raises(ResultTimeout):
        handle.wait(2)
    body = encode_reply(handle.task_id, 'genuine')
    transport.send(url, body, attributes=signature_attributes(body))
    assert handle.wait(10) == 'genuine'


def test_inactive_user_refused(database, prefix, start_worker):
    "A call recorded for an inactive user is refused; root (0) runs"
    with Transaction().start(database, 0) as transaction:
        User = Pool().get('res.user')
        user, = User.create([{
                    'name': 'Gone', 'login': 'gone-%s' % uuid.uuid4()}])
        transaction.commit()
    with Transaction().start(database, user.id):
        gone = Pool().get('async_sqs.test.item').echo.defer('gone')
    with Transaction().start(database, 0) as transaction:
        User = Pool().get('res.user')
        User.write([User(user.id)], {'active': False})
    with Transaction().start(database, 0):
        root = Pool().get('async_sqs.test.item').echo.defer('root')
    worker = start_worker()
    assert root.wait(60)['user'] == 0
    with pytest.raises(Exception, match='inactive'):
        gone.wait(60)
    assert 'user %s does not exist or is inactive' % user.id in worker.output()


def test_worker_refuses_to_start_without_secret(database, prefix):
    "No secret: the worker does not start unless insecure, which warns"
    worker = Worker(database, prefix, options={'secret': ''})
    try:
        assert worker.process.wait(60) == 2
        assert 'secret is not set' in worker.output()
    finally:
        worker.kill()
    worker = Worker(database, prefix, options={
            'secret': '', 'insecure': 'True'})
    try:
        worker.ready()
        assert 'insecure: no [async_sqs] secret' in worker.output()
    finally:
        worker.kill()


def test_defer_without_secret_refused(database, prefix):
    "A caller without a secret cannot send unsigned calls by mistake"
    with_secret('')
    try:
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            with pytest.raises(RuntimeError, match='secret is not set'):
                Item.echo.defer('x')
    finally:
        with_secret(SECRET)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
call_keys = ['v', 'task', 'database', 'user', 'context', 'model', 'kind',
    'method', 'instance', 'args', 'kwargs', 'reply', 'queue', 'eta']
hostile_bodies = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(call_keys), json_values).map(json.dumps),
    st.integers(min_value=0, max_value=300).map(
        lambda depth: '[' * depth + ']' * depth),
    st.sampled_from([
            '{"__class__": "datetime"}', '{"__class__": "Decimal", '
            '"decimal": "x"}', '1e99999', '-Infinity', 'NaN',
            '{"__class__": "async_sqs.Record", "model": "ir.model", '
            '"id": -1}', '9' * 5000, '{"v": 1, "task": "%s"' % ('a' * 32),
            ]),
    )


@settings(max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bodies)
def test_decoder_fuzzed(body):
    "Hostile bodies give MessageError and nothing else"
    try:
        decode_call(body)
    except MessageError:
        pass


@settings(max_examples=1, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow])
@given(st.lists(hostile_bodies, min_size=40, max_size=40))
def test_worker_fuzzed(database, prefix, start_worker, bodies):
    "The worker survives hostile signed messages, refusing each in one line"
    worker = start_worker()
    queue_name = sqs.task_queue_name(database, 'trytond-async')
    transport = sqs.client()
    url = transport.url(queue_name)
    for body in bodies:
        transport.send(url, body or ' ',
            attributes=signature_attributes(body or ' '))
    assert len(dead_letters(queue_name, len(bodies))) == len(bodies)
    assert worker.process.poll() is None
    assert worker.output().count(' refused') == len(bodies)
    assert 'Traceback' not in worker.output()


def test_no_secret_in_logs_rows_or_replies(database, prefix, start_worker):
    "Neither the AWS secret key nor the signing key shows up anywhere"
    worker = start_worker(args=['-vvv'])
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        ok = Item.echo.defer('fine')
        failing = Item.fail.defer('failure')
    reply = ok.wait(60)
    with pytest.raises(Exception) as info:
        failing.wait(60)
    with Transaction().start(database, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        rows = [(t.body, t.error, t.traceback) for t in Task.search([
                    ('uuid', 'in', [ok.task_id, failing.task_id])])]
    worker.terminate()
    haystack = '\n'.join([worker.output(), json.dumps(reply),
            str(info.value), repr(rows)])
    assert 'testing-secret' not in haystack
    assert SECRET not in haystack
    assert ok.task_id in haystack


def test_cli_help():
    "The console script documents itself"
    import os
    import sys
    output = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable),
                'trytond-async-worker'), '--help'],
        capture_output=True, text=True, check=True).stdout
    assert '--queue' in output
