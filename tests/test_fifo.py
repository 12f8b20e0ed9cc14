# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"FIFO queues: the calls of one tenant run in the order they were committed."
import os
import tempfile
import uuid

from conftest import wait_until
from test_reliability import USER, queue_depth, row

from trytond.modules.async_sqs import sqs
from trytond.pool import Pool
from trytond.transaction import Transaction

STEPS = 6


def run_order(database, name):
    "Return the steps of the items of name, in the order they were created."
    with Transaction(new=True).start(database, 0, readonly=True):
        Item = Pool().get('async_sqs.test.item')
        return [i.value for i in Item.search(
                [('name', '=', name)], order=[('id', 'ASC')])]


def test_fifo_queue_names(prefix):
    "The .fifo suffix stays last, on the dead-letter queue too"
    name = sqs.task_queue_name('db', 'ordered.fifo')
    assert name == '%s-db-ordered.fifo' % prefix
    assert sqs.dead_letter_name(name) == '%s-db-ordered-dead.fifo' % prefix
    long_name = sqs.task_queue_name('d' * 100, 'ordered.fifo')
    assert long_name.endswith('.fifo')
    assert len(sqs.dead_letter_name(long_name)) <= sqs.MAX_QUEUE_NAME
    assert sqs.task_queue_name('db', 'plain') == '%s-db-plain' % prefix


def test_fifo_queues_created(database, prefix):
    "A queue named .fifo is created as a FIFO queue, its dead letters too"
    transport = sqs.client()
    name = sqs.task_queue_name(database, 'ordered.fifo')
    transport.create(name)
    for queue in (name, sqs.dead_letter_name(name)):
        attributes = transport.sqs.get_queue_attributes(
            QueueUrl=transport.url(queue), AttributeNames=['All'],
            )['Attributes']
        assert attributes['FifoQueue'] == 'true'


def test_fifo_order(database, prefix, start_worker):
    "Each tenant's calls run in commit order, a retried one in its place"
    names = {company: 'fifo%s-%s' % (company, uuid.uuid4())
        for company in (1, 2)}
    marker = os.path.join(tempfile.mkdtemp(), 'failed-once')
    handles = []
    with Transaction().start(database, USER) as transaction:
        Item = Pool().get('async_sqs.test.item')
        for step in range(STEPS):
            for company, name in names.items():
                with transaction.set_context(company=company):
                    # the third call of tenant 1 fails once, then is retried
                    fail = marker if (company, step) == (1, 2) else None
                    handles.append(Item.in_order.defer(name, step, fail))
    # the calls of tenant 2 go on while tenant 1 waits for its retry
    start_worker(processes=2, queues=['ordered.fifo'])
    for company, name in names.items():
        wait_until(lambda: len(run_order(database, name)) == STEPS,
            timeout=120)
        assert run_order(database, name) == list(range(STEPS))
    assert os.path.exists(marker)
    for handle in handles:
        assert row(database, handle.task_id)['state'] == 'done'
    queue_name = sqs.task_queue_name(database, 'ordered.fifo')
    wait_until(lambda: queue_depth(queue_name) == (0, 0, 0))


def test_fifo_delay_held_by_worker(database, prefix, start_worker):
    "A delay, which FIFO queues refuse per message, is held by the worker"
    name = 'fifo-delay-%s' % uuid.uuid4()
    worker = start_worker(queues=['ordered.fifo'])
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').in_order.defer(
            name, 0, _delay_=3)
    worker.wait_for_log('<Task %s async_sqs.test.item.in_order@%s> '
        'postponed' % (handle.task_id, database))
    wait_until(lambda: run_order(database, name) == [0], timeout=60)
    assert row(database, handle.task_id)['state'] == 'done'


def test_fifo_send_deduplicated(database, prefix):
    "The same call sent twice within SQS's window arrives once"
    from trytond.modules.async_sqs.outbox import send
    with Transaction().start(database, USER) as transaction:
        Item = Pool().get('async_sqs.test.item')
        with transaction.set_context(company=1):
            handle = Item.in_order.defer('dedup', 0)
    task = row(database, handle.task_id)
    entry = ({'uuid': handle.task_id, 'queue': task['queue'],
            'body': task['body'], 'tenant': '1'}, handle, 0, 1)
    # what the relay does when the first send's outcome was lost
    send(database, [entry])
    transport = sqs.client()
    url = transport.url(task['queue'])
    received = []
    for _ in range(3):
        received += transport.sqs.receive_message(QueueUrl=url,
            MaxNumberOfMessages=10, WaitTimeSeconds=1,
            VisibilityTimeout=30).get('Messages', [])
    assert len(received) == 1
