# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Weighted queues: how they are written, picked from, and shared by a worker."
import queue as queue_module
import re
import uuid

import pytest
from conftest import wait_until

from trytond import config
from trytond.modules.async_sqs import settings
from trytond.modules.async_sqs.weights import (
    SmoothWeighted, WeightedBuffer, parse_queue, parse_weights)
from trytond.pool import Pool
from trytond.transaction import Transaction

USER = 1
#: Calls deferred to each queue: moto's cost grows with the depth.
COUNT = 30


def picks(picker, count, eligible=('a', 'b')):
    return ''.join(picker.pick(eligible) for _ in range(count))


def test_smooth_weighted_spreads_the_picks():
    "Smooth weighted round robin gives each its weight, spread out"
    assert picks(SmoothWeighted({'a': 3, 'b': 1}), 8) == 'aabaaaba'
    # the sequence nginx documents for weights 5, 1 and 1
    assert picks(SmoothWeighted({'a': 5, 'b': 1, 'c': 1}), 7,
        eligible=('a', 'b', 'c')) == 'aabacaa'
    assert picks(SmoothWeighted({'a': 1, 'b': 1}), 4) == 'abab'


def test_smooth_weighted_never_starves_weight_one():
    "A key of weight 1 is picked once in every round of the weights' sum"
    sequence = picks(SmoothWeighted({'a': 100, 'b': 1}), 101 * 5)
    assert sequence.count('b') == 5
    for start in range(len(sequence) - 101):
        assert 'b' in sequence[start:start + 101]


def test_smooth_weighted_only_eligible():
    "Only the keys that hold something are picked; none gives None"
    picker = SmoothWeighted({'a': 3, 'b': 1})
    assert picks(picker, 3, eligible=('b',)) == 'bbb'
    assert picker.pick(()) is None
    # a waits without gaining: back, it takes its share again at once
    assert picks(picker, 4) == 'aaba'


def test_buffer_without_weights_is_first_in_first_out():
    "With equal weights the buffer hands out in the order received"
    buffer = WeightedBuffer()
    a, b = buffer.lane('a'), buffer.lane('b')
    for item, lane in [(1, a), (2, a), (3, b), (4, a), (5, b)]:
        lane.put(item)
    assert not buffer.weighted
    assert [buffer.get(timeout=0) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert buffer.empty()
    with pytest.raises(queue_module.Empty):
        buffer.get(timeout=0)


def test_buffer_by_weight():
    "With weights the buffer takes from its lanes in proportion"
    buffer = WeightedBuffer()
    a, b = buffer.lane('a', 3), buffer.lane('b', 1)
    for i in range(6):
        a.put('a%s' % i)
    b.put('b0')
    assert buffer.weighted
    taken = [buffer.get(timeout=0) for _ in range(4)]
    assert taken == ['a0', 'a1', 'b0', 'a2']
    # b is empty: a alone, then all is taken
    assert buffer.get_nowait() == 'a3'
    b.put('b1')
    rest = []
    while True:
        try:
            rest.append(buffer.get_nowait())
        except queue_module.Empty:
            break
    assert sorted(rest) == ['a4', 'a5', 'b1']
    assert buffer.empty()


def test_buffer_take_out():
    "Messages taken out leave the others in their places"
    buffer = WeightedBuffer()
    a, b = buffer.lane('a', 3), buffer.lane('b', 1)
    for item in ['a0', 'a1', 'a2', 'a3']:
        a.put(item)
    for item in ['b0', 'b1']:
        b.put(item)
    assert buffer.take_out(lambda item: item in {'b1', 'a1', 'a3'}) == [
        'a1', 'a3', 'b1']
    assert [buffer.get_nowait() for _ in range(3)] == ['a0', 'a2', 'b0']
    assert buffer.empty()


@pytest.mark.parametrize('text, expected', [
        ('mail', ('mail', None)),
        ('mail:5', ('mail', 5)),
        (' mail : 5 ', ('mail', 5)),
        ('reports:1', ('reports', 1)),
        ('reports:100', ('reports', 100)),
        ])
def test_parse_queue(text, expected):
    "NAME[:WEIGHT] gives the name and the weight, None when not written"
    assert parse_queue(text) == expected


@pytest.mark.parametrize('text, error', [
        ('mail:0', "queue mail: the weight must be within 1 to 100, not 0"),
        ('mail:101', "within 1 to 100, not 101"),
        ('mail:x', "queue mail: the weight must be a whole number, not 'x'"),
        ('mail:2.5', "a whole number, not '2.5'"),
        ('mail:', "a whole number, not ''"),
        (':3', "':3' has no queue name"),
        ('', "'' has no queue name"),
        ])
def test_parse_queue_errors(text, error):
    "A bad weight or a missing name is refused with the reason"
    with pytest.raises(ValueError) as info:
        parse_queue(text)
    assert error in str(info.value)


def test_parse_weights():
    "queue_weights: NAME:WEIGHT separated by commas or lines"
    assert parse_weights('reports:1, mail:5') == {'reports': 1, 'mail': 5}
    assert parse_weights('\nreports: 1\nmail:5,\n') == {
        'reports': 1, 'mail': 5}
    assert parse_weights('') == {}
    assert parse_weights(None) == {}


@pytest.mark.parametrize('text, error', [
        ('reports', "'reports' has no weight (NAME:WEIGHT)"),
        ('reports:1, reports:2', "queue reports is named twice"),
        ('reports:0', "queue reports: the weight must be within 1 to 100"),
        ('mail:5, :2', "':2' has no queue name"),
        ])
def test_parse_weights_errors(text, error):
    "A bad entry of queue_weights is refused, naming the option"
    with pytest.raises(ValueError) as info:
        parse_weights(text)
    assert str(info.value).startswith('[async_sqs] queue_weights: ')
    assert error in str(info.value)


def test_setting_queue_weights():
    "The queue_weights option, unset or empty by default"
    assert settings.queue_weights() == {}
    try:
        config.set('async_sqs', 'queue_weights', 'reports:1, mail:5')
        assert settings.queue_weights() == {'reports': 1, 'mail': 5}
        config.set('async_sqs', 'queue_weights', '')
        assert settings.queue_weights() == {}
    finally:
        config.set('async_sqs', 'queue_weights', '')


@pytest.mark.parametrize('queues, options, error', [
        (('a:0',), None,
            "argument --queue: queue a: the weight must be within 1 to 100"),
        (('a:heavy',), None, "the weight must be a whole number"),
        (('a',), {'queue_weights': 'a:3, b'},
            "[async_sqs] queue_weights: 'b' has no weight"),
        ])
def test_bad_weight_is_a_usage_error(start_worker, queues, options, error):
    "A bad weight stops the worker at start, with the exit status 2"
    worker = start_worker(queues=queues, options=options, ready=False)
    assert worker.process.wait(60) == 2
    assert error in worker.output()


def ran(database, tag, count):
    """Return the queue and value of each call of the tag, in the order they
    ran, once count of them did."""
    with Transaction(new=True).start(database, 0, readonly=True):
        Item = Pool().get('async_sqs.test.item')
        # one process runs one call at a time: the ids follow the runs
        found = Item.search([('name', 'like', tag + '-%')],
            order=[('id', 'ASC')])
        if len(found) >= count:
            return [(i.name[-1], i.value) for i in found]


def test_weighted_queues_share_a_process(database, start_worker):
    "Two queues full: a process takes them 3 to 1, b from the start"
    tag = 'weights-%s' % uuid.uuid4().hex[:10]
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        for value in range(COUNT):
            for name in ['a', 'b']:
                Item.create_in_turn.defer(
                    '%s-%s' % (tag, name), value=value, _queue_=name)
    worker = start_worker(processes=1, queues=('a:3', 'b:1'))
    assert '-a (weight 3), ' in worker.output()
    assert '-b (weight 1)' in worker.output()
    runs = wait_until(lambda: ran(database, tag, 2 * COUNT),
        message="not every call ran")
    order = ''.join(q for q, _ in runs)
    # 15 of 20 by the weights; 3:1 cannot land there by chance
    assert 12 <= order[:20].count('a') <= 18, order
    assert 'b' in order[:5], order
    for name in ['a', 'b']:
        assert sorted(v for q, v in runs if q == name) == list(range(COUNT))


def test_queue_weights_option(start_worker):
    "The weights of queue_weights apply to the queues of --queue"
    worker = start_worker(queues=('a', 'b', 'c:2'),
        options={'queue_weights': 'a:5, c:9'})
    output = worker.output()
    assert '-a (weight 5), ' in output
    assert '-b (weight 1), ' in output
    assert '-c (weight 2)' in output


def test_weighted_lanes_given_back_on_stop(database, start_worker):
    "On SIGTERM the messages waiting in the lanes are made visible again"
    tag = 'weights-%s' % uuid.uuid4().hex[:10]
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        slow = Item.sleep_then_create.defer(tag + '-slow', 3, _queue_='a')
        for value in range(5):
            for name in ['a', 'b']:
                Item.create_in_turn.defer(
                    '%s-%s' % (tag, name), value=value, _queue_=name)
    worker = start_worker(queues=('a:3', 'b:1'))
    worker.wait_for_log('<Task %s async_sqs.test.item.sleep_then_create@%s> '
        'starts' % (slow.task_id, database))
    assert worker.terminate() == 0
    assert slow.wait(0) == tag + '-slow'
    assert re.search(r'release \d+ message\(s\) of ', worker.output())
    start_worker(queues=('a', 'b'))
    runs = wait_until(lambda: ran(database, tag, 11),
        message="not every call ran")
    for name in ['a', 'b']:
        assert sorted(v for q, v in runs if q == name) == list(range(5))
