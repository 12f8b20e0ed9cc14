# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"trytond-async-admin, run as a shell runs it, against moto and the database."
import json
import os
import re
import socket
import subprocess
import tempfile
import uuid

import pytest
from conftest import BIN, items, wait_until, write_config
from test_reliability import queue_depth, row

from trytond.modules.async_sqs import TaskFailed, TaskHandle, sqs
from trytond.modules.async_sqs.message import signature_attributes
from trytond.modules.async_sqs.rows import task_queues
from trytond.modules.async_sqs.sqs import reply_queue_attributes
from trytond.modules.async_sqs.testing import worker
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def admin(database, prefix, *args, options=None):
    "Run trytond-async-admin with a configuration of the test's queues."
    with tempfile.TemporaryDirectory(prefix='async-admin-') as directory:
        path = os.path.join(directory, 'trytond.conf')
        write_config(path, prefix, options)
        command = [os.path.join(BIN, 'trytond-async-admin'), '-c', path]
        if database:
            command += ['-d', database]
        return subprocess.run(command + list(args), capture_output=True,
            text=True, timeout=120)


def queue_names(database):
    "Return the default queue, the other queue, then the rest of the queues."
    queues = ['trytond-async', 'other'] + sorted(
        set(task_queues(database)) - {'trytond-async', 'other'})
    return [sqs.task_queue_name(database, q) for q in queues]


def test_status_and_create_queues(database, prefix):
    "status shows missing queues, then the real depths; create-queues twice"
    names = queue_names(database)
    default, other = names[:2]
    result = admin(database, prefix, 'status', '--json')
    assert result.returncode == 0, result.stderr
    before = json.loads(result.stdout)
    assert sorted(q['name'] for q in before['queues']) == sorted(names)
    assert {q['exists'] for q in before['queues']} == {False}
    assert {q['visible'] for q in before['queues']} == {None}
    assert set(before['tasks']) == {'waiting',
        'pending', 'queued', 'running', 'done', 'failed', 'cancelled'}
    result = admin(database, prefix, 'status')
    assert result.returncode == 0, result.stderr
    assert '%s  does not exist yet' % default in result.stdout
    # status creates nothing
    transport = sqs.client()
    listed = transport.sqs.list_queues(QueueNamePrefix=prefix)
    assert listed.get('QueueUrls', []) == []

    outputs = []
    for _ in range(2):
        result = admin(database, prefix, 'create-queues')
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
        listed = transport.sqs.list_queues(QueueNamePrefix=prefix)
        assert sorted(u.rsplit('/', 1)[1] for u in listed['QueueUrls']) == (
            sorted(names + [sqs.dead_letter_name(n) for n in names]))
    assert outputs[0] == outputs[1]
    assert '%s ready, dead letters to %s-dead' % (other, other) in outputs[0]
    attributes = transport.sqs.get_queue_attributes(
        QueueUrl=transport.url(other), AttributeNames=['RedrivePolicy'],
        )['Attributes']
    policy = json.loads(attributes['RedrivePolicy'])
    assert policy['deadLetterTargetArn'].endswith(':%s-dead' % other)

    name = 'status-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        for i in range(3):
            Item.create_named.defer(name, value=i)
        Item.create_named.defer(name, _delay_=600)
        Item.on_other_queue.defer(1)
    transport.send(transport.url(default + '-dead'), 'a dead letter')
    result = admin(database, prefix, 'status', '--json')
    assert result.returncode == 0, result.stderr
    after = json.loads(result.stdout)
    queues = {q['name']: q for q in after['queues']}
    assert queues[default] == {'name': default, 'queue': 'trytond-async',
        'exists': True, 'visible': 3, 'in_flight': 0, 'delayed': 1,
        'dead': 1}
    assert (queues[other]['visible'], queues[other]['dead']) == (1, 0)
    assert after['tasks']['queued'] == before['tasks']['queued'] + 5
    assert isinstance(after['oldest']['queued'], int)
    assert after['oldest']['queued'] >= 0

    result = admin(database, prefix, 'status')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        'QUEUE', 'VISIBLE', 'IN', 'FLIGHT', 'DELAYED', 'DEAD']
    assert [default, '3', '0', '1', '1'] in [line.split() for line in lines]
    assert [other, '1', '0', '0', '0'] in [line.split() for line in lines]
    tasks, = [line for line in lines if line.startswith('TASKS')]
    assert 'queued %s' % after['tasks']['queued'] in tasks
    oldest, = [line for line in lines if line.startswith('OLDEST')]
    assert re.search(r'queued \d+ s', oldest), oldest


def test_unreachable_endpoint(database, prefix):
    "An endpoint that does not answer: exit 1 and one line, no traceback"
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        closed_port = sock.getsockname()[1]
    for command in (['status'], ['status', '--json'], ['create-queues'],
            ['requeue-dead']):
        result = admin(database, prefix, *command, options={
                'endpoint_url': 'http://127.0.0.1:%s' % closed_port,
                'max_attempts': '1'})
        assert result.returncode == 1, result
        assert result.stdout == ''
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith('trytond-async-admin: ')
        assert '127.0.0.1:%s' % closed_port in result.stderr


def test_usage_errors(database, prefix):
    "A usage error exits with 2"
    for args in ([], ['frobnicate'], ['requeue-dead', '--limit', '0'],
            ['retry'], ['sweep-replies', '--older-than', 'soon']):
        result = admin(database, prefix, *args)
        assert result.returncode == 2, (args, result)
        assert 'usage: trytond-async-admin' in result.stderr
    result = admin(None, prefix, 'status')
    assert result.returncode == 2
    assert '-d' in result.stderr


def test_requeue_dead(database, prefix):
    "Dead letters of failed calls run again; refused ones stay, counted"
    default, other = queue_names(database)[:2]
    name, flag = 'requeue-%s' % uuid.uuid4(), 'flag-%s' % uuid.uuid4()
    transport = sqs.client()
    with worker(database):
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            failing = Item.fail_until_item.defer(flag, name)
            kept = Item.echo.defer('kept')
        with pytest.raises(TaskFailed, match='no %s yet' % flag):
            failing.wait(60)
        assert kept.wait(60)['args'] == ['kept']
        assert row(database, failing.task_id)['state'] == 'failed'
        dead_url = transport.url(default + '-dead')
        wait_until(lambda: queue_depth(default + '-dead')[0] == 1)

        # refused by the worker: malformed, and a call without a row
        body = row(database, kept.task_id)['body']
        no_row = body.replace(kept.task_id, uuid.uuid4().hex)
        for text in ['not json', no_row]:
            transport.send(transport.url(default), text,
                attributes=signature_attributes(text))
        wait_until(lambda: queue_depth(default + '-dead')[0] == 3)
        # written straight into the dead-letter queue: unsigned; a signature
        # that does not match; a call that differs from its row
        forged = body.replace('"kept"', '"forged"')
        transport.send(dead_url, body)
        transport.send(dead_url, forged, attributes={
                k: dict(v, StringValue='0' * 64) if 'signature' in k else v
                for k, v in signature_attributes(forged).items()})
        transport.send(dead_url, forged, attributes={'refused': {
                    'DataType': 'String', 'StringValue': 'a pretence'}})
        assert queue_depth(default + '-dead')[0] == 6

        with Transaction().start(database, USER):
            Pool().get('async_sqs.test.item').create([{'name': flag}])
        result = admin(database, prefix, 'requeue-dead')
        assert result.returncode == 0, result.stderr
        assert ('%s-dead: 1 dead letter(s) requeued, 0 obsolete deleted, '
            '5 refused left' % default) in result.stdout, result.stdout
        assert ('%s-dead: 0 dead letter(s) requeued, 0 obsolete deleted, '
            '0 refused left' % other) in result.stdout, result.stdout
        assert "1 call(s) requeued" in result.stdout
        for reason in ["body is not valid JSON",
                "no task row, refused: no task row",
                "message is not signed",
                "signature does not match the body",
                "the call differs from its task row"]:
            assert reason in result.stdout, result.stdout
        # the same call runs again, and a waiter gets its new outcome
        assert TaskHandle(failing.task_id).wait(60) == name
        assert items(database, name) == [(name, None)]
        wait_until(lambda: row(database, failing.task_id)['state'] == 'done')
        assert row(database, failing.task_id)['attempts'] == 2
        assert queue_depth(default + '-dead')[0] == 5

        # nothing left to requeue, the refused ones stay
        result = admin(database, prefix, 'requeue-dead', '--limit', '5')
        assert result.returncode == 0, result.stderr
        assert ('%s-dead: 0 dead letter(s) requeued, 0 obsolete deleted, '
            '5 refused left' % default) in result.stdout, result.stdout
        result = admin(database, prefix, 'requeue-dead', '--queue', 'other')
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            '%s-dead: 0 dead letter(s) requeued, 0 obsolete deleted, '
            '0 refused left\n0 call(s) requeued\n' % other)
        assert queue_depth(default + '-dead')[0] == 5


def test_requeue_dead_limit_and_obsolete(database, prefix):
    "--limit requeues that many; a dead letter of a call done is deleted"
    default = queue_names(database)[0]
    transport = sqs.client()
    flag = 'flag-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.fail_until_item.defer(flag, 'limit-%s' % i)
            for i in range(3)]
        done = Item.echo.defer('done')
    dead_url = transport.url(default + '-dead')
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        for handle in handles:
            Task.finish(handle.task_id, 'failed', error="by hand")
        Task.finish(done.task_id, 'done')
    # what the redrive policy leaves there: the messages as sent
    received = []

    def receive():
        received.extend(transport.receive(transport.url(default), wait_time=1))
        return len(received) >= 4
    wait_until(receive)
    for message in received:
        transport.send(dead_url, message['Body'],
            attributes=message['MessageAttributes'])
    assert queue_depth(default + '-dead')[0] == 4
    outputs = []
    for args in (['--limit', '2'], []):
        result = admin(database, prefix, 'requeue-dead', *args)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
        if args:
            assert sorted(row(database, h.task_id)['state']
                for h in handles) == ['failed', 'queued', 'queued']
    counts = [[int(n) for n in re.search(
                    r'-dead: (\d+) dead letter\(s\) requeued, (\d+) '
                    r'obsolete deleted, (\d+) refused left',
                    output).groups()]
        for output in outputs]
    assert counts[0][0] == 2 and counts[1][0] == 1, outputs
    assert counts[0][1] + counts[1][1] == 1, outputs
    assert '2 call(s) requeued' in outputs[0]
    assert {row(database, h.task_id)['state'] for h in handles} == {'queued'}
    assert row(database, done.task_id)['state'] == 'done'
    assert queue_depth(default + '-dead') == (0, 0, 0)
    assert queue_depth(default)[0] == 3


def test_retry_cancel_unknown(database, prefix):
    "retry and cancel of an unknown task: exit 1, one line"
    unknown = uuid.uuid4().hex
    for command in ('retry', 'cancel'):
        result = admin(database, prefix, command, unknown)
        assert result.returncode == 1, result
        assert result.stderr == (
            'trytond-async-admin: unknown task(s) in %s: %s\n'
            % (database, unknown))


def test_retry_cancel_sweep(database, prefix, start_worker):
    "retry, cancel and sweep-replies from the shell"
    name, flag = 'retry-%s' % uuid.uuid4(), 'flag-%s' % uuid.uuid4()
    start_worker()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        failing = Item.fail_until_item.defer(flag, name)
        later = Item.create_named.defer(name, _delay_=600)
    with pytest.raises(TaskFailed):
        failing.wait(60)
    with Transaction().start(database, USER):
        Pool().get('async_sqs.test.item').create([{'name': flag}])
    result = admin(database, prefix, 'retry', failing.task_id)
    assert (result.returncode, result.stdout) == (0, "1 task(s) retried\n"), (
        result.stderr)
    assert TaskHandle(failing.task_id).wait(60) == name
    wait_until(lambda: row(database, failing.task_id)['state'] == 'done')
    result = admin(database, prefix, 'cancel', later.task_id)
    assert (result.returncode, result.stdout) == (
        0, "1 task(s) cancelled\n"), result.stderr
    assert row(database, later.task_id)['state'] == 'cancelled'
    # the wrong state: refused, with one line
    for command, task_id in [('cancel', later.task_id),
            ('retry', failing.task_id), ('cancel', failing.task_id)]:
        result = admin(database, prefix, command, task_id)
        assert result.returncode == 1, result
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith('trytond-async-admin: ')
        assert task_id in result.stderr
        assert 'Traceback' not in result.stderr
    assert items(database, name) == [(name, None)]

    transport = sqs.client()
    for _ in range(2):
        transport.create(sqs.reply_queue_name(uuid.uuid4().hex),
            reply_queue_attributes())
    result = admin(database, prefix, 'sweep-replies', '--older-than', '3600')
    assert (result.returncode, result.stdout) == (
        0, "0 reply queue(s) deleted\n"), result.stderr
    result = admin(database, prefix, 'sweep-replies', '--older-than', '0')
    assert (result.returncode, result.stdout) == (
        0, "2 reply queue(s) deleted\n"), result.stderr
    listed = transport.sqs.list_queues(
        QueueNamePrefix=sqs.reply_queue_prefix())
    assert listed.get('QueueUrls', []) == []
