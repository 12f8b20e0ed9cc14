# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The botocore data a process keeps, and the clients a forked process takes."
import os
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


def _in_child(function):
    "Run function in a forked process; return its exit code."
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = function()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_forked_process_takes_over_the_client():
    "A process forked takes its parent's client only when it asks to"
    transport = sqs.client()
    name = 'clients-%s' % uuid.uuid4().hex[:12]
    url = transport.url(name)

    def inherit():
        clients.inherit_from_parent()
        inherited = sqs.client()
        # its connections were closed: it opens its own
        inherited.sqs.send_message(QueueUrl=url, MessageBody='child')
        return 0 if inherited is transport else 3

    def own():
        return 0 if sqs.client() is not transport else 4

    assert _in_child(inherit) == 0
    assert _in_child(own) == 0
    # the parent's client goes on over its own connections
    received = transport.sqs.receive_message(QueueUrl=url,
        WaitTimeSeconds=1)['Messages']
    assert [m['Body'] for m in received] == ['child']
    assert sqs.client() is transport
