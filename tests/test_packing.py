# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Several calls in one message: calls_per_message, and batches by size."
import json
import tempfile
import uuid

import pytest
from conftest import dead_letters, items, wait_until
from test_reliability import queue_depth, row

from trytond import config
from trytond.exceptions import UserError
from trytond.modules.async_sqs import MessageError, sqs
from trytond.modules.async_sqs.message import (
    MAX_PACKED_SIZE, decode_call, decode_calls, pack_bodies,
    signature_attributes)
from trytond.modules.async_sqs.outbox import pack
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1


class SentEntries:
    "The entries of every SendMessageBatch call of the process's client."

    def __init__(self):
        self.calls = []
        self.events = sqs.client().sqs.meta.events

    def __enter__(self):
        self.events.register(
            'provide-client-params.sqs.SendMessageBatch', self.count)
        return self

    def __exit__(self, *exc):
        self.events.unregister(
            'provide-client-params.sqs.SendMessageBatch', self.count)

    def count(self, params, **kwargs):
        self.calls.append([e['MessageBody'] for e in params['Entries']])

    def calls_per_body(self):
        "Return the number of calls of each message, per batch call."
        return [[len(json.loads(b)) if b.startswith('[') else 1
                for b in bodies] for bodies in self.calls]


def test_calls_share_messages(database, prefix, start_worker):
    "Calls of one transaction share messages as far as they allow"
    name = 'packed-%s' % uuid.uuid4()
    plain = 'plain-%s' % uuid.uuid4()
    config.set('async_sqs', 'calls_per_message', '4')
    try:
        with SentEntries() as sent:
            with Transaction().start(database, USER):
                Item = Pool().get('async_sqs.test.item')
                handles = [Item.packed.defer(name, i) for i in range(25)]
                # not packed: a delay of its own
                delayed = Item.packed.defer(name, 25, _delay_=1)
                # the configuration's calls_per_message, for undecided ones
                for i in range(6):
                    Item.create_named.defer(plain, i)
    finally:
        config.set('async_sqs', 'calls_per_message', '1')
    # one queue: one batch call, the delayed call on its own
    assert sent.calls_per_body() == [[10, 10, 1, 5, 4, 2]]
    assert {h.state for h in handles + [delayed]} == {'sent'}
    start_worker()
    assert [h.wait(60) for h in handles + [delayed]] == list(range(26))
    assert sorted(v for _, v in items(database, name)) == list(range(26))
    wait_until(lambda: len(items(database, plain)) == 6)
    assert {row(database, h.task_id)['state'] for h in handles} == {'done'}
    wait_until(lambda: queue_depth(sqs.task_queue_name(database))
        == (0, 0, 0))


def test_failures_settled_alone(database, prefix, start_worker):
    "A call of a message that fails, or is refused, does not hold the others"
    name = 'settled-%s' % uuid.uuid4()
    path = tempfile.mktemp(prefix='packed-flaky-')
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [
            Item.packed.defer(name, 0),
            Item.packed.defer(name, 1, path),
            Item.packed.defer(name, 2, 'user'),
            Item.packed.defer(name, 3),
            Item.packed.defer(name, 4),
            ]
    # a call whose row is gone is refused: it never was committed
    refused = handles[3]
    with Transaction().start(database, 0):
        Task = Pool().get('async_sqs.task')
        Task.delete(Task.search([('uuid', '=', refused.task_id)]))
    worker = start_worker()
    assert handles[0].wait(60) == 0
    assert handles[4].wait(60) == 4
    assert handles[1].wait(60) == 1
    with pytest.raises(UserError, match='packed 2 refused'):
        handles[2].wait(60)
    dead, = dead_letters(sqs.task_queue_name(database), 1)
    assert decode_call(dead).task == refused.task_id
    assert sorted(v for _, v in items(database, name)) == [0, 1, 4]
    task = row(database, handles[1].task_id)
    assert (task['state'], task['attempts']) == ('done', 2)
    assert row(database, handles[2].task_id)['state'] == 'failed'
    assert worker.output().count('retries in') == 1
    wait_until(lambda: queue_depth(sqs.task_queue_name(database))
        == (0, 0, 0))


def test_message_delivered_again(database, prefix, start_worker):
    "A message of several calls delivered three times: each effect once"
    name = 'again-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.packed.defer(name, i) for i in range(3)]
    body = pack_bodies([row(database, h.task_id)['body'] for h in handles])
    transport = sqs.client()
    url = transport.url(sqs.task_queue_name(database))
    for _ in range(2):
        transport.send(url, body, attributes=signature_attributes(body))
    worker = start_worker()
    wait_until(lambda: worker.output().count('skipped: done already') >= 6)
    wait_until(lambda: queue_depth(sqs.task_queue_name(database))
        == (0, 0, 0))
    assert sorted(v for _, v in items(database, name)) == [0, 1, 2]


def test_stopped_in_the_middle(database, prefix, start_worker):
    "A worker stopped between two calls of a message: the rest runs later"
    name = 'middle-%s' % uuid.uuid4()
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.packed.defer(name, i, 'sleep') for i in range(4)]
    worker = start_worker()
    worker.wait_for_log('<Task %s async_sqs.test.item.packed@%s> starts'
        % (handles[0].task_id, database))
    assert worker.terminate() == 0
    assert 'released part done' in worker.output()
    ran = len(items(database, name))
    assert 1 <= ran < 4
    start_worker()
    assert [h.wait(60) for h in handles] == [0, 1, 2, 3]
    assert sorted(v for _, v in items(database, name)) == [0, 1, 2, 3]


def test_batches_split_by_size(database, prefix):
    "Large messages leave in batch calls of at most 1 MiB"
    with SentEntries() as sent:
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            handles = [Item.echo.defer('x' * 400_000) for _ in range(5)]
    assert [len(bodies) for bodies in sent.calls] == [2, 2, 1]
    assert {h.state for h in handles} == {'sent'}
    assert queue_depth(sqs.task_queue_name(database))[0] == 5


def entry(size, calls_per_message, delay=0):
    "Return an outbox item whose body has size bytes."
    return ({'body': 'x' * size}, None, delay, calls_per_message)


def test_pack_limits():
    "A message holds what each of its calls allows, within 64 KiB"
    def shape(items):
        return [len(members) for members in pack(items)]
    assert shape([entry(100, 1)] * 3) == [1, 1, 1]
    assert shape([entry(100, 10)] * 25) == [10, 10, 5]
    assert shape([entry(100, 10)] * 5 + [entry(100, 3)] * 4) == [5, 3, 1]
    assert shape([entry(100, 3)] * 2 + [entry(100, 10)] * 4) == [3, 3]
    assert shape([entry(100, 10), entry(100, 10, delay=5),
            entry(100, 10)]) == [1, 2]
    per_message = MAX_PACKED_SIZE // 20_001
    assert shape([entry(20_000, 100)] * 7) == [per_message] * (
        7 // per_message) + [7 % per_message]
    for members in pack([entry(3_000, 100)] * 60):
        body = pack_bodies([row['body'] for row, *_ in members])
        assert len(body) <= MAX_PACKED_SIZE


@pytest.mark.parametrize('body', [
        '[]',
        '[1]',
        '[{"v": 1}]',
        '[%s]' % ','.join(['{}'] * 101),
        ])
def test_malformed_packs_refused(body):
    "A list that is not a list of calls is refused whole"
    with pytest.raises(MessageError):
        decode_calls(body)


def test_decoded_in_order_and_same_task_twice_refused(database, prefix):
    "A packed body gives its calls in order; naming a task twice is refused"
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handles = [Item.packed.defer('order', i) for i in range(2)]
    bodies = [row(database, h.task_id)['body'] for h in handles]
    calls, packed = decode_calls(pack_bodies(bodies))
    assert packed
    assert [c.task for c in calls] == [h.task_id for h in handles]
    assert decode_calls(bodies[0]) == ([decode_call(bodies[0])], False)
    with pytest.raises(MessageError, match='names a task twice'):
        decode_calls(pack_bodies([bodies[0], bodies[0]]))
