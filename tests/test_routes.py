# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The HTTP routes, called over HTTP: a running trytond server, a real worker.

The server is started once for the module, with a queue prefix of its own
that the workers of the tests share."""
import base64
import json
import re
import urllib.error
import urllib.request
import uuid
from decimal import Decimal

import pytest
from conftest import Server, items, wait_until

from trytond.pool import Pool
from trytond.protocols.jsonrpc import JSONDecoder, JSONEncoder
from trytond.transaction import Transaction

ITEM = 'async_sqs.test.item'


@pytest.fixture(scope='module')
def keys():
    """Return the keys of the tests: admin and user of the async_sqs
    application, rest (a REST key only), requested (not validated), and
    user_id, the user of the user key."""
    from trytond.tests.test_tryton import DB_NAME, activate_module
    activate_module(['async_sqs', 'async_sqs_test'])
    with Transaction().start(DB_NAME, 0):
        pool = Pool()
        User = pool.get('res.user')
        Application = pool.get('res.user.application')
        Secret = pool.get('async_sqs.test.secret')
        ModelData = pool.get('ir.model.data')
        user, = User.create([{
                    'name': "Routes",
                    'login': 'routes-%s' % uuid.uuid4().hex,
                    }])
        # the administrator of the tests may read the secrets
        User.write([User(1)], {'groups': [('add', [
                            ModelData.get_id('async_sqs', 'group_task_admin')
                            ])]})
        admin, user_key, rest, requested = Application.create([
                {'user': 1, 'application': 'async_sqs'},
                {'user': user.id, 'application': 'async_sqs'},
                {'user': 1, 'application': 'rest'},
                {'user': 1, 'application': 'async_sqs',
                    'state': 'requested'},
                ])
        Secret.create([{'name': 'hidden'}])
        return {'admin': admin.key, 'user': user_key.key, 'rest': rest.key,
            'requested': requested.key, 'user_id': user.id,
            'database': DB_NAME}


@pytest.fixture(scope='module')
def server(keys):
    "Start a trytond server on the test database; stop it at the end."
    server = Server('test%s' % uuid.uuid4().hex[:10])
    try:
        server.ready()
        yield server
    finally:
        server.stop()
        print("--- server log %s\n%s" % (server.log_path, server.output()))


@pytest.fixture
def worker(server, start_worker):
    """Start a worker on the queues of the server; stop it gracefully.

    The queues outlive the test: a worker killed in a long poll could take
    the next test's message with it, hidden until its visibility ends."""
    worker = start_worker(queue_prefix=server.prefix)
    yield worker
    worker.terminate()


def request(server, method, path, body=None, key=None, headers=None,
        data=None):
    "Return the status, headers and decoded JSON body of an HTTP request."
    headers = dict(headers or {})
    if key is not None:
        headers['Authorization'] = 'bearer %s' % key
    if body is not None:
        data = json.dumps(body, cls=JSONEncoder).encode('utf-8')
    if data is not None:
        headers.setdefault('Content-Type', 'application/json')
    http_request = urllib.request.Request(
        server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(http_request, timeout=330) as response:
            status, headers, text = (
                response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        status, headers, text = error.code, error.headers, error.read()
    assert headers.get('Content-Type') == 'application/json', text
    return status, headers, json.loads(text, object_hook=JSONDecoder())


def post(server, keys, path, body=None, key='admin', **kwargs):
    return request(server, 'POST',
        '/%s/async_sqs/model/%s' % (keys['database'], path), body=body,
        key=keys.get(key, key), **kwargs)


def get(server, keys, url, key='admin'):
    path = url[len(server.url):] if url.startswith(server.url) else url
    return request(server, 'GET', path, key=keys.get(key, key))


def task_rows(database):
    "Return how many task rows there are."
    with Transaction(new=True).start(database, 0, readonly=True):
        return Pool().get('async_sqs.task').search([], count=True)


def test_fire_and_forget(server, keys, worker):
    "POST answers 202 with the task at once; it runs as the key's user"
    name = 'route-%s' % uuid.uuid4()
    status, headers, body = post(server, keys, '%s/create_named' % ITEM,
        {'name': name, 'value': 3}, key='user')
    assert status == 202
    assert re.fullmatch(r'[0-9a-f]{32}', body['task'])
    assert body['state'] == 'queued'
    assert body['url'] == headers['Location']
    assert body['url'] == '%s/%s/async_sqs/task/%s' % (
        server.url, keys['database'], body['task'])
    assert wait_until(lambda: items(keys['database'], name)) == [(name, 3)]
    status, _, task = wait_until(lambda: (
            lambda r: r if r[0] == 200 else None)(
            get(server, keys, body['url'], key='user')))
    assert task['state'] == 'done'
    assert task['result'] is None
    assert task['enqueued_at'] <= task['started_at'] <= task['finished_at']
    with Transaction().start(keys['database'], 0, readonly=True):
        row, = Pool().get('async_sqs.task').search(
            [('uuid', '=', body['task'])])
        assert row.user.id == keys['user_id']


def test_wait_for_the_result(server, keys, worker):
    "?wait= answers 200 with the result; context and language travel"
    context = base64.urlsafe_b64encode(json.dumps(
            {'probe': 'yes', '_check_access': False}).encode()).decode()
    status, headers, body = post(server, keys, '%s/echo?wait=60' % ITEM,
        {'amount': Decimal('1.25'), 'text': "héllo"}, key='user',
        headers={'X-Tryton-Context': context,
            'Accept-Language': 'fr-FR;q=0.9, de;q=0.5'})
    assert status == 200, body
    assert body['state'] == 'done'
    assert body['url'] == headers['Location']
    result = body['result']
    assert result['args'] == []
    assert result['kwargs'] == {'amount': Decimal('1.25'), 'text': "héllo"}
    assert type(result['kwargs']['amount']) is Decimal
    assert result['user'] == keys['user_id']
    assert result['context'] == {'probe': 'yes', 'language': 'fr_FR'}
    # a second read, after the first one took the reply
    status, _, again = get(server, keys, body['url'], key='user')
    assert status == 200
    assert again['state'] == 'done'
    assert again['task'] == body['task']
    assert again['result'] == result
    # and with ?wait=, which has nothing left to wait for
    status, _, again = get(server, keys, body['url'] + '?wait=5', key='user')
    assert status == 200
    assert again['result'] == result


def test_record_routes(server, keys, worker):
    "The record's method, or the classmethod given [record], as REST does"
    name = 'record-%s' % uuid.uuid4()
    with Transaction().start(keys['database'], 0):
        item, = Pool().get(ITEM).create([{'name': name, 'value': 1}])
        item_id = item.id
    status, _, body = post(server, keys,
        '%s/%s/bump?wait=60' % (ITEM, item_id), {'amount': 5})
    assert status == 200, body
    assert body['result'] == 6
    assert items(keys['database'], name) == [(name, 6)]
    status, _, body = post(server, keys,
        '%s/%s/describe?wait=60' % (ITEM, item_id))
    assert status == 200, body
    assert body['result'] == [
        [item_id, name, {'__name__': ITEM, 'id': item_id}]]


def test_failed_call(server, keys, worker):
    "A call that raised answers 200 with its error's type and message"
    status, _, body = post(server, keys, '%s/fail?wait=60' % ITEM,
        {'text': 'boom'})
    assert status == 200, body
    assert body['state'] == 'failed'
    assert body['error'] == {'type': 'builtins.ValueError', 'message': 'boom'}
    assert 'result' not in body


def test_not_finished_in_time(server, keys, start_worker):
    "202 while the call has not ended, 200 once it has"
    status, _, body = post(server, keys, '%s/echo?wait=1' % ITEM,
        {'text': 'later'}, key='user')
    assert status == 202, body
    assert body['state'] == 'queued'
    url = body['url']
    status, _, task = get(server, keys, url, key='user')
    assert status == 202
    assert task['state'] == 'queued'
    assert task['started_at'] is None
    assert 'result' not in task
    worker = start_worker(queue_prefix=server.prefix)
    status, _, task = get(server, keys, url + '?wait=60', key='user')
    assert status == 200, task
    assert task['result']['kwargs'] == {'text': 'later'}
    status, _, task = get(server, keys, url, key='user')
    assert status == 200
    assert task['result']['kwargs'] == {'text': 'later'}
    # a call that sends no reply is waited for on its row
    name = 'poll-%s' % uuid.uuid4()
    status, _, body = post(server, keys, '%s/create_named?wait=60' % ITEM,
        {'name': name})
    assert status == 200, body
    assert body['state'] == 'done'
    assert items(keys['database'], name) == [(name, 0)]
    worker.terminate()


def test_access_travels_to_the_worker(server, keys, worker):
    "The call runs in the worker with the access checks of an RPC call"
    status, _, body = post(server, keys, '%s/count_secrets?wait=60' % ITEM)
    assert status == 200, body
    assert body['result'] == 1
    status, _, body = post(server, keys,
        '%s/count_secrets?wait=60' % ITEM, key='user')
    assert status == 200, body
    assert body['state'] == 'failed'
    # AccessError is a UserError: it travels as one
    assert body['error']['type'] == 'UserError'
    assert 'not allowed to access' in body['error']['message']


def test_tasks_of_other_users(server, keys):
    "A key's user sees only the tasks it deferred; administrators see all"
    _, _, mine = post(server, keys, '%s/echo' % ITEM, key='user')
    _, _, theirs = post(server, keys, '%s/echo' % ITEM, key='admin')
    assert get(server, keys, mine['url'], key='user')[0] == 202
    assert get(server, keys, mine['url'], key='admin')[0] == 202
    status, _, body = get(server, keys, theirs['url'], key='user')
    assert status == 404
    assert body == {
        'status': 404, 'message': "unknown task %s" % theirs['task']}


def test_errors_change_nothing(server, keys):
    "Each bad request gets its status and a JSON error, and defers nothing"
    database = keys['database']
    before = task_rows(database)
    path = '%s/create_named' % ITEM
    cases = [
        # 401: no key, an unknown key, a key of another application, a key
        # not validated
        (401, dict(path=path, body={'name': 'x'}, key=None)),
        (401, dict(path=path, body={'name': 'x'}, key='no-such-key')),
        (401, dict(path=path, body={'name': 'x'}, key='rest')),
        (401, dict(path=path, body={'name': 'x'}, key='requested')),
        # 400: malformed body, arguments, context, wait
        (400, dict(path=path, data=b'{"name": ')),
        (400, dict(path=path, body=['x'])),
        (400, dict(path=path, body={'nom': 'x'})),
        (400, dict(path=path, body={'name': 'x', '_queue_': 'other'})),
        (400, dict(path=path, data=b'{"name": NaN}')),
        (400, dict(path=path, body={'name': 'x'},
                headers={'X-Tryton-Context': 'not base64 JSON'})),
        (400, dict(path=path + '?wait=301', body={'name': 'x'})),
        (400, dict(path=path + '?wait=soon', body={'name': 'x'})),
        (400, dict(path='%s/bump' % ITEM, body={'amount': 1})),
        # 403: not deferrable, not exposed, no access to the model
        (403, dict(path='%s/not_deferrable' % ITEM, body={'value': 1})),
        (403, dict(path='%s/sleep_then_pid' % ITEM, body={'seconds': 0})),
        (403, dict(path='%s/__setup__' % ITEM)),
        (403, dict(path='async_sqs.test.secret/reveal', key='user')),
        # 404: unknown model, method, record
        (404, dict(path='no.such.model/create_named', body={'name': 'x'})),
        (404, dict(path='%s/no_such_method' % ITEM)),
        (404, dict(path='%s/999999999/bump' % ITEM, body={'amount': 1})),
        # 413: over the SQS limit
        (413, dict(path=path, body={'name': 'x' * (1024 * 1024)})),
        ]
    for expected, kwargs in cases:
        status, _, body = post(server, keys, **kwargs)
        assert (status, body['status']) == (expected, expected), (
            kwargs, body)
        assert body['message'], body
    # unknown database, unknown task, malformed task id
    status, _, body = request(server, 'POST',
        '/no_such_database/async_sqs/model/%s' % path, body={'name': 'x'},
        key=keys['admin'])
    assert (status, body['status']) == (404, 404)
    for task_id in [uuid.uuid4().hex, 'not-a-task']:
        status, _, body = get(server, keys,
            '/%s/async_sqs/task/%s' % (database, task_id))
        assert (status, body['status']) == (404, 404)
    status, _, body = get(server, keys,
        '/%s/async_sqs/task/%s' % (database, uuid.uuid4().hex), key=None)
    assert status == 401
    assert items(database, 'x') == []
    assert task_rows(database) == before
    # the administrator may call what the user may not
    status, _, body = post(server, keys, 'async_sqs.test.secret/reveal')
    assert status == 202, body
