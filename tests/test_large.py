# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Bodies past large_message_threshold go through S3: moto's S3, on the
same server as its SQS."""
import hashlib
import io
import json
import socket
import uuid

import pytest
from conftest import dead_letters, wait_until
from test_admin import admin
from test_reliability import USER, queue_depth, row

from trytond import config
from trytond.modules.async_sqs import TaskFailed, TaskHandle, payload, sqs
from trytond.modules.async_sqs.admin import requeue_dead
from trytond.modules.async_sqs.message import message_entry, payload_attributes
from trytond.pool import Pool
from trytond.transaction import Transaction

#: Five MiB: past the threshold, and past what SQS takes.
SIZE = 5 * 1024 * 1024


@pytest.fixture
def bucket(prefix):
    "Give the test a bucket of its own, and s3_prefix, in the configuration."
    name = 'test-%s' % uuid.uuid4().hex[:16]
    payload.client().create_bucket(Bucket=name)
    config.set('async_sqs', 's3_bucket', name)
    config.set('async_sqs', 's3_prefix', prefix + '/')
    yield name
    config.set('async_sqs', 's3_bucket', '')
    config.set('async_sqs', 's3_prefix', '')


@pytest.fixture
def s3_options(bucket, prefix):
    "Return the options of a worker that shares the test's bucket."
    return {'s3_bucket': bucket, 's3_prefix': prefix + '/'}


def keys(bucket, under=''):
    "Return the keys of the bucket under the test's prefix."
    response = payload.client().list_objects_v2(
        Bucket=bucket, Prefix=config.get('async_sqs', 's3_prefix') + under)
    return sorted(o['Key'] for o in response.get('Contents', []))


def peek(database, count=1):
    "Return count messages of the task queue, left visible for a worker."
    transport = sqs.client()
    url = transport.url(sqs.task_queue_name(database))
    messages = []

    def receive():
        messages.extend(transport.receive(
                url, wait_time=1, visibility_timeout=30))
        return len(messages) >= count
    wait_until(receive)
    transport.change_visibility_batch(
        url, [m['ReceiptHandle'] for m in messages], 0)
    return messages


def pointed_key(message):
    "Return the key of the object a message points to, checking its layout."
    kind, location = json.loads(message['Body'])
    assert kind == 'software.amazon.payloadoffloading.PayloadS3Pointer'
    assert set(location) == {'s3BucketName', 's3Key'}
    assert location['s3BucketName'] == config.get('async_sqs', 's3_bucket')
    return location['s3Key']


def test_large_argument(database, bucket, s3_options, start_worker):
    "A call of 5 MiB goes through S3 and its object goes once it is done"
    text = 'é' + 'x' * SIZE
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').measure.defer(text)
    message, = peek(database)
    attributes = message['MessageAttributes']
    size = int(attributes['ExtendedPayloadSize']['StringValue'])
    assert size == len(row(database, handle.task_id)['body'].encode())
    assert size > SIZE
    assert keys(bucket) == [pointed_key(message)]
    assert keys(bucket, 'call/%s/%s/' % (database, handle.task_id))
    worker = start_worker(options=s3_options)
    assert handle.wait(90) == [
        len(text), hashlib.sha256(text.encode('utf-8')).hexdigest()]
    wait_until(lambda: keys(bucket) == [])

    # a copy of the message, delivered again once its object is gone
    transport = sqs.client()
    transport.send_batch(transport.url(sqs.task_queue_name(database)), [
            message_entry('0', message['Body'],
                attributes=payload_attributes(message))])
    worker.wait_for_log('<Task %s async_sqs.test.item.measure@%s> skipped: '
        'done already' % (handle.task_id, database))
    assert 'refused' not in worker.output()


def test_large_result(database, bucket, s3_options, start_worker):
    "A result of 5 MiB comes back through S3; its object goes once read"
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').big_text.defer(SIZE)
    start_worker(options=s3_options)
    # without the database, only the reply queue can answer
    result = TaskHandle(handle.task_id).wait(90)
    assert len(result) == SIZE
    assert result[:64] == ''.join(chr(0x41 + i) for i in range(26)) * 2 + (
        ''.join(chr(0x41 + i) for i in range(11)) + '\n')
    assert keys(bucket) == []
    # and the row keeps it for the handle of the caller
    assert handle.wait(10) == result


def test_altered_object(database, bucket, s3_options, start_worker):
    "An object changed after the send is refused, dead-lettered, row failed"
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').measure.defer('y' * SIZE)
    message, = peek(database)
    key = pointed_key(message)
    payload.client().put_object(Bucket=bucket, Key=key,
        Body=json.dumps({'forged': True}).encode())
    start_worker(options=s3_options)
    with pytest.raises(TaskFailed) as info:
        handle.wait(90)
    assert info.value.exc_type == 'MessageError'
    assert 'is not the one signed' in info.value.message
    task = row(database, handle.task_id)
    assert task['state'] == 'failed'
    dead, = dead_letters(sqs.task_queue_name(database), 1)
    assert json.loads(dead)[1]['s3Key'] == key
    # the altered object goes with the refusal
    wait_until(lambda: keys(bucket) == [])


def test_requeue_refused(database, bucket, s3_options, start_worker):
    "A call refused for its missing object is requeued from its row"
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').measure.defer('z' * SIZE)
    message, = peek(database)
    payload.client().delete_object(Bucket=bucket, Key=pointed_key(message))
    worker = start_worker(options=s3_options)
    with pytest.raises(TaskFailed) as info:
        handle.wait(90)
    assert 'is missing' in info.value.message
    assert row(database, handle.task_id)['state'] == 'failed'
    worker.wait_for_log('refused: the body in s3://%s/' % bucket)
    # the dead letter points to the object gone: the row's body goes again
    out = io.StringIO()
    wait_until(lambda: requeue_dead(database, out=out) == 0
        and '1 call(s) requeued' in out.getvalue(), timeout=60)
    wait_until(lambda: row(database, handle.task_id)['state'] == 'done')
    assert TaskHandle(handle.task_id, database=database).wait(30) == [
        SIZE, hashlib.sha256(b'z' * SIZE).hexdigest()]
    wait_until(lambda: keys(bucket) == [])


def test_s3_unreachable(database, bucket, s3_options, start_worker):
    "A worker that cannot reach S3 gives the call back, not fail it"
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').measure.defer('v' * SIZE)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        closed = 'http://127.0.0.1:%s' % sock.getsockname()[1]
    worker = start_worker(options=dict(
            s3_options, s3_endpoint_url=closed, max_attempts='1'))
    worker.wait_for_log('read a body (S3 GetObject) failed')
    # released, and received again
    wait_until(lambda: worker.output().count(
            'released: its body is not read') >= 2)
    worker.terminate()
    assert row(database, handle.task_id)['state'] == 'queued'
    assert queue_depth(sqs.task_queue_name(database) + '-dead') == (0, 0, 0)
    assert 'refused' not in worker.output()
    start_worker(options=s3_options)
    assert handle.wait(90) == [SIZE, hashlib.sha256(b'v' * SIZE).hexdigest()]


def test_packed_with_a_large_call(database, bucket, s3_options, start_worker):
    "A large call is sent alone, the small ones of its transaction packed"
    texts = ['a', 'b' * (400 * 1024), 'c']
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.measure.defer(t) for t in texts]
    pointers, packed = [], []
    for message in peek(database, 2):
        if 'ExtendedPayloadSize' in message.get('MessageAttributes', {}):
            pointers.append(message)
        else:
            packed.append(json.loads(message['Body']))
    assert [pointed_key(m) for m in pointers] == keys(bucket)
    assert [[c['args'] for c in p] for p in packed] == [[['a'], ['c']]]
    start_worker(options=s3_options)
    for text, handle in zip(texts, handles):
        assert handle.wait(90)[0] == len(text)
    wait_until(lambda: keys(bucket) == [])


def test_no_bucket(database, prefix):
    "Without a bucket, a call over the SQS limit fails at defer time"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        with pytest.raises(ValueError,
                match=r'over the SQS limit of 1048576 .*s3_bucket'):
            Item.measure.defer('x' * (1024 * 1024))


def test_sweep_orphans(database, bucket, prefix):
    "sweep-replies deletes the objects no message needs, old enough"
    client = payload.client()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').measure.defer('w' * SIZE)
    kept, = keys(bucket)
    orphans = [
        payload.call_prefix(database) + '%s/%s' % (
            uuid.uuid4().hex, uuid.uuid4().hex),
        '%sreply/%s/%s' % (prefix + '/', uuid.uuid4().hex, uuid.uuid4().hex),
        ]
    for key in orphans:
        client.put_object(Bucket=bucket, Key=key, Body=b'{}')
    # the cron sweeps those older than reply_ttl: none yet
    with Transaction().start(database, 0):
        Pool().get('async_sqs.task').clean()
    assert keys(bucket) == sorted(orphans + [kept])
    options = {'s3_bucket': bucket, 's3_prefix': prefix + '/'}
    result = admin(database, prefix, 'sweep-replies', '--older-than', '0',
        options=options)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "0 reply queue(s) deleted\n"
        "2 object(s) deleted from s3://%s/%s/\n" % (bucket, prefix))
    # the call not run yet keeps its object
    assert keys(bucket) == [kept]
    assert row(database, handle.task_id)['state'] == 'queued'
