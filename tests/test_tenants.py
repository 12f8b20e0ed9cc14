# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Tenants: the MessageGroupId that SQS's fair queues share workers by."
import uuid

import pytest
from conftest import items, wait_until
from test_reliability import USER, row

from trytond import config
from trytond.modules.async_sqs import async_task, sqs
from trytond.modules.async_sqs.message import decode_calls
from trytond.pool import Pool
from trytond.transaction import Transaction


def receive_all(database, count):
    """Receive count calls from the default queue; return {task id: (group,
    calls of its message)}."""
    transport = sqs.client()
    url = transport.url(sqs.task_queue_name(database))
    found = {}

    def receive():
        for message in transport.sqs.receive_message(QueueUrl=url,
                AttributeNames=['All'], MaxNumberOfMessages=10,
                WaitTimeSeconds=1).get('Messages', []):
            calls, _ = decode_calls(message['Body'])
            group = message['Attributes'].get('MessageGroupId')
            for call in calls:
                found[call.task] = (group, len(calls))
        return len(found) >= count
    wait_until(receive, timeout=30)
    return found


def test_group_id_on_messages(database, prefix):
    "Each call's message carries its tenant; packing keeps tenants apart"
    with Transaction().start(database, USER) as transaction:
        Item = Pool().get('async_sqs.test.item')
        with transaction.set_context(company=1):
            first = [Item.by_company.defer('a%s' % i) for i in range(3)]
        with transaction.set_context(company=2):
            second = Item.by_company.defer('b')
        alone = Item.by_company.defer('none')
        plain = Item.echo.defer('plain')
        with transaction.set_context(shop='north'):
            shop = Item.by_shop.defer('north')
    found = receive_all(database, 7)
    for handle in first:
        assert found[handle.task_id] == ('1', 3)
    assert found[second.task_id] == ('2', 1)
    # no company in the context, no group; nor without the option
    assert found[alone.task_id] == (None, 1)
    assert found[plain.task_id] == (None, 1)
    assert found[shop.task_id] == ('north', 1)
    assert row(database, second.task_id)['tenant'] == '2'
    assert row(database, plain.task_id)['tenant'] is None


def test_tenant_of_configuration(database, prefix):
    "[async_sqs] tenant groups the methods that do not say"
    config.set('async_sqs', 'tenant', 'user')
    try:
        with Transaction().start(database, USER):
            Item = Pool().get('async_sqs.test.item')
            plain = Item.echo.defer('plain')
            with Transaction().set_context(company=7):
                own = Item.by_company.defer('own')
    finally:
        config.set('async_sqs', 'tenant', '')
    found = receive_all(database, 2)
    assert found[plain.task_id][0] == str(USER)
    # the method's own option comes first
    assert found[own.task_id][0] == '7'


def test_calls_of_tenants_run(database, prefix, start_worker):
    "Calls of several tenants run as any other"
    names = ['t%s-%s' % (i, uuid.uuid4()) for i in range(4)]
    start_worker()
    handles = []
    with Transaction().start(database, USER) as transaction:
        Item = Pool().get('async_sqs.test.item')
        for i, name in enumerate(names):
            with transaction.set_context(company=i % 2 + 1):
                handles.append(Item.by_company.defer(name))
    assert [h.wait(60) for h in handles] == names
    for name in names:
        assert items(database, name) == [(name, None)]


def test_tenant_checked(database, prefix):
    "A tenant option or value that cannot be a group id is refused"
    with pytest.raises(ValueError, match="tenant must be one of"):
        async_task(tenant='shop')
    with Transaction().start(database, USER) as transaction:
        Item = Pool().get('async_sqs.test.item')
        with transaction.set_context(shop='two words'):
            with pytest.raises(ValueError, match="is not a MessageGroupId"):
                Item.by_shop.defer('refused')
        transaction.rollback()
    config.set('async_sqs', 'tenant', 'shop')
    try:
        with pytest.raises(ValueError, match=r"\[async_sqs\] tenant"):
            sqs.settings.tenant()
    finally:
        config.set('async_sqs', 'tenant', '')
