# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The decorator and the outbox, against the moto server, without a worker."
import datetime as dt
import inspect
import json
from decimal import Decimal

import pytest
from conftest import newest_series_only

from trytond.modules.async_sqs import async_task, sqs
from trytond.modules.async_sqs.message import (
    MessageError, decode_call, dumps, loads)
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


def drain(queue, database):
    "Return the bodies waiting in the database's queue, deleting them."
    transport = sqs.client()
    url = transport.url(sqs.task_queue_name(database, queue))
    bodies = []
    while True:
        messages = transport.receive(url, wait_time=0)
        if not messages:
            return bodies
        bodies.extend(m['Body'] for m in messages)
        transport.delete_batch(url, [m['ReceiptHandle'] for m in messages])


def test_metadata_kept(database):
    "The wrapped method keeps its name, docstring and signature"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        assert Item.echo.__name__ == 'echo'
        assert Item.create_named.__doc__ == (
            "Create an item: the effect a test looks for.")
        assert str(inspect.signature(Item.create_named)) == '(name, value=0)'
        assert str(inspect.signature(Item.echo)) == '(*args, **kwargs)'
        item = Item(1)
        assert str(inspect.signature(item.bump)) == '(amount)'
        assert item.bump.__doc__.startswith("Add amount")


def test_options_validated():
    "Options out of SQS's ranges are refused with the option named"
    with pytest.raises(ValueError, match='delay'):
        async_task(delay=15 * 24 * 3600)
    with pytest.raises(ValueError, match='visibility_timeout'):
        async_task(visibility_timeout=43201)
    for calls in (0, 101):
        with pytest.raises(ValueError, match='calls_per_message'):
            async_task(calls_per_message=calls)


def test_not_deferrable_outside_transaction(database):
    "Deferring needs a transaction to commit with"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
    with pytest.raises(RuntimeError, match='transaction'):
        Item.echo.defer('x')


def test_unencodable_argument_named(database, prefix):
    "A value that cannot be encoded raises TypeError naming the argument"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        with pytest.raises(TypeError, match=r"argument value of "
                r"async_sqs.test.item.create_named"):
            Item.create_named.defer('x', value=object())
        with pytest.raises(TypeError, match=r"argument name "):
            Item.create_named.defer({1, object()})
        with pytest.raises(TypeError, match='not saved'):
            Item.describe.defer([Item(name='unsaved')])
        Transaction().rollback()


def test_too_large_for_sqs(database, prefix):
    "A call over the SQS message size fails at defer time with the sizes"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        with pytest.raises(ValueError, match=r'over the SQS limit of 1048576'):
            Item.echo.defer('x' * (1024 * 1024))
        Transaction().rollback()


@newest_series_only
def test_thousand_calls_in_batches_of_ten(database, prefix):
    "1,000 calls of one transaction leave in 100 SendMessageBatch calls"
    transport = sqs.client()
    calls = []

    def count(params, **kwargs):
        calls.append(len(params['Entries']))
    transport.sqs.meta.events.register(
        'provide-client-params.sqs.SendMessageBatch', count)
    try:
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            handles = [Item.create_named.defer('batch', value=i)
                for i in range(1000)]
            assert not calls, "nothing leaves before the commit"
    finally:
        transport.sqs.meta.events.unregister(
            'provide-client-params.sqs.SendMessageBatch', count)
    assert calls == [10] * 100
    assert {h.state for h in handles} == {'sent'}
    # draining 1,000 messages from one moto queue is slow: count them
    transport = sqs.client()
    attributes = transport.sqs.get_queue_attributes(
        QueueUrl=transport.url(sqs.task_queue_name(database)),
        AttributeNames=['ApproximateNumberOfMessages'])['Attributes']
    assert int(attributes['ApproximateNumberOfMessages']) == 1000
    first = decode_call(transport.receive(
            transport.url(sqs.task_queue_name(database)), wait_time=0,
            max_number=1)[0]['Body'])
    assert first.method == 'create_named' and first.args == ['batch']


def test_message_content(database, prefix):
    "A message carries database, user, context, call and records by reference"
    with Transaction().start(database, USER, context={
                'probe': dt.date(2026, 1, 1), '_private': 1}):
        Item = Pool().get('async_sqs.test.item')
        item, = Item.create([{'name': 'ref'}])
        handle = item.bump.defer(Decimal('2'))
        Item.describe.defer([item])
    first, second = sorted(
        (decode_call(b) for b in drain('trytond-async', database)),
        key=lambda c: c.method)
    assert first.task == handle.task_id
    assert (first.database, first.user, first.model, first.kind) == (
        database, USER, 'async_sqs.test.item', 'model')
    assert first.method == 'bump' and first.instance == item.id
    assert first.args == [Decimal('2')]
    assert first.context == {'probe': dt.date(2026, 1, 1)}
    assert first.reply is True
    assert second.args == [[(item.__name__, item.id)]]


@pytest.mark.parametrize('value', [
        dt.datetime(2026, 11, 23, 1, 2, 3, 4), dt.date(2026, 11, 23),
        dt.time(1, 2, 3, 4), dt.timedelta(days=2, seconds=3),
        Decimal('-1.000'), b'\x00bytes\xff', [1, [2, {'a': None}]],
        ])
def test_tryton_types_round_trip(value):
    "Tryton's JSON types come back with their type"
    assert loads(dumps(value)) == value
    assert type(loads(dumps(value))) is type(value)


@pytest.mark.parametrize('body', [
        'not json', '[]', '{}', json.dumps({'v': 1}), 'NaN',
        '{"v": 1, "task": "%s"}' % ('0' * 32),
        ])
def test_malformed_refused(body):
    "Malformed bodies raise MessageError"
    with pytest.raises(MessageError):
        decode_call(body)
