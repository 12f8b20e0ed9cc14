# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The botocore data a process keeps, and the clients a forked process takes."
import subprocess
import sys
import uuid

from trytond.modules.async_sqs import clients, sqs


def test_endpoints_of_the_services_used_only():
    "Of botocore's endpoints file, the partitions keep the services used"
    endpoints = clients.data_loader().load_data('endpoints')
    assert len(endpoints['partitions']) > 1
    for partition in endpoints['partitions']:
        assert set(partition['services']) <= set(clients.ENDPOINT_SERVICES)
        # what the resolver also reads is kept
        assert partition['regions'] and partition['dnsSuffix']
    aws, = [p for p in endpoints['partitions'] if p['partition'] == 'aws']
    assert {'sqs', 's3', 'sts'} <= set(aws['services'])
    assert type(aws) is dict and type(aws['services']['sqs']) is dict


def test_service_model_without_documentation():
    "The SQS model keeps every operation and shape, not their documentation"
    model = clients.data_loader().load_service_model('sqs', 'service-2')
    assert 'SendMessageBatch' in model['operations']
    assert 'SendMessageBatchRequestEntry' in model['shapes']
    for section in ('operations', 'shapes'):
        for definition in model[section].values():
            assert 'documentation' not in definition
            for member in definition.get('members', {}).values():
                assert 'documentation' not in member


def test_lean_client_talks_to_sqs():
    "A client made from the lean data sends, receives and reports errors"
    transport = sqs.client()
    url = transport.url('clients-%s' % uuid.uuid4().hex[:12])
    transport.sqs.send_message(QueueUrl=url, MessageBody='lean')
    received = transport.sqs.receive_message(QueueUrl=url,
        WaitTimeSeconds=1)['Messages']
    assert [m['Body'] for m in received] == ['lean']
    try:
        transport.sqs.get_queue_url(QueueName='missing-%s' % uuid.uuid4().hex)
    except Exception as exc:
        assert sqs.is_missing_queue(exc)
    else:
        raise AssertionError("a missing queue was found")


FORK_SCRIPT = r'''
import os, sys, uuid
from trytond.modules.async_sqs import clients, sqs

transport = sqs.client()
url = transport.url('clients-%s' % uuid.uuid4().hex[:12])
# a connection of the parent's, open when it forks
transport.sqs.get_queue_attributes(QueueUrl=url)


def in_child(function):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = function()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def inherit():
    clients.inherit_from_parent()
    inherited = sqs.client()
    # its connections were closed: it opens its own
    inherited.sqs.send_message(QueueUrl=url, MessageBody='child')
    return 0 if inherited is transport else 3


def own():
    return 0 if sqs.client() is not transport else 4


print('inherit', in_child(inherit))
print('own', in_child(own))
# the parent's client goes on over its own connections
received = transport.sqs.receive_message(QueueUrl=url,
    WaitTimeSeconds=1).get('Messages', [])
print('received', [m['Body'] for m in received])
print('same', sqs.client() is transport)
'''


def test_forked_process_takes_over_the_client():
    "A process forked takes its parent's client only when it asks to"
    # a process of its own: one with other threads may fork with a lock
    # held, which the worker's supervisor never does
    process = subprocess.run([sys.executable, '-c', FORK_SCRIPT],
        capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == [
        'inherit 0', 'own 0', "received ['child']", 'same True'], (
        process.stdout + process.stderr)
