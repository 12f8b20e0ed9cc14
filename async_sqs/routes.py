# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The HTTP routes: defer a call the way trytond's REST API makes it, and
read the state and outcome of a task.

POST /<database>/async_sqs/model/<model>[/<id>]/<method> takes what
POST /<database>/rest/model/<model>[/<id>]/<method> takes (keyword
arguments as the JSON body, the context in X-Tryton-Context, the language
in Accept-Language), defers the call and answers 202 with the task; with
?wait=SECONDS it commits, then waits for the outcome.
GET /<database>/async_sqs/task/<uuid>[?wait=SECONDS] tells the state and,
once the call ended, its result or error.
GET /<database>/async_sqs/metrics[?since=MINUTES] gives the statistics of
the calls in the Prometheus text format, to the task administrators.

All need a key of the async_sqs user application, sent as
Authorization: bearer KEY; the calls run as the key's user. Only methods
that are both decorated and exposed in the model's __rpc__ can be called,
and the call runs in the worker with the access checks of an RPC call."""
import inspect
import json
import logging
import math
import time
import urllib.parse
from base64 import urlsafe_b64decode
from functools import wraps

from botocore.exceptions import BotoCoreError, ClientError
from werkzeug.exceptions import HTTPException

from trytond import backend
from trytond.config import config
from trytond.exceptions import UserError
from trytond.model import ModelStorage
from trytond.model.exceptions import AccessError
from trytond.pool import Pool
from trytond.protocols.jsonrpc import JSONDecoder, JSONEncoder
from trytond.protocols.wrappers import (
    HTTPStatus, Response, abort, user_application, with_pool, with_transaction)
from trytond.tools import is_instance_method
from trytond.transaction import Transaction
from trytond.wsgi import app

from . import metrics, stats
from .exceptions import ResultTimeout, TaskCancelled, TaskFailed, TaskNotSent
from .message import CHECK_ACCESS, walk
from .result import TaskHandle, task_status
from .user import APPLICATION

logger = logging.getLogger(__name__)

#: Longest wait a request may ask for, in seconds.
MAX_WAIT = 300
#: Seconds between two reads of the row of a task that sends no reply.
POLL_INTERVAL = 0.5
#: States of a task whose call has ended.
FINISHED = ('done', 'failed', 'cancelled')
#: The state of its row that the state of a handle tells, after the commit.
HANDLE_STATES = {
    'sent': 'queued',
    # SQS failed at commit: the row is pending, the relay sends it
    'unsent': 'pending',
    'done': 'done',
    }

_application = user_application(APPLICATION, json=False)
_json_decoder = JSONDecoder()
_MESSAGES = {
    HTTPStatus.UNAUTHORIZED: "a validated key of the async_sqs user "
    "application is needed, as Authorization: bearer KEY",
    HTTPStatus.NOT_FOUND: "unknown database",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "the request body is too large",
    }


def json_response(data, status=HTTPStatus.OK, headers=None):
    "Return a JSON response, written with Tryton's encoder."
    return Response(json.dumps(data, cls=JSONEncoder), status=status,
        headers=headers, content_type='application/json')


def json_errors(func):
    "Answer an HTTP error of the route as a JSON object: status, message."
    @wraps(func)
    def wrapper(request, *args, **kwargs):
        try:
            return func(request, *args, **kwargs)
        except HTTPException as exc:
            return error_response(exc)
    return wrapper


def error_response(exc):
    "Return the JSON response of an HTTP exception."
    # trytond's JSONBadRequest carries the UserError's message
    message = getattr(exc, 'message', None) or exc.description
    if isinstance(message, Exception):
        message = getattr(message, 'message', None) or str(message)
    if message == type(exc).description:
        # werkzeug's own text: ours says what is missing
        message = _MESSAGES.get(exc.code, message)
    body = {'status': exc.code, 'message': message}
    description = getattr(exc, 'message', None) and exc.description
    if description:
        body['description'] = description
    headers = {}
    if exc.code == HTTPStatus.UNAUTHORIZED:
        headers['WWW-Authenticate'] = 'Bearer realm="Tryton"'
    return json_response(body, status=exc.code, headers=headers)


def wait_time(request):
    "Return the seconds of ?wait=, None without it, or abort with 400."
    value = request.args.get('wait')
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_WAIT):
        abort(HTTPStatus.BAD_REQUEST,
            "wait must be a number of seconds from 0 to %s, not %r"
            % (MAX_WAIT, value))
    return seconds


def request_context(request):
    """Return the context of X-Tryton-Context and Accept-Language, read as
    trytond's REST API reads them."""
    context = {}
    header = request.headers.get('X-Tryton-Context')
    if header:
        try:
            context = json.loads(
                urlsafe_b64decode(header), object_hook=_json_decoder)
        except Exception:
            # Tryton's decoder raises what its types raise on bad input
            context = None
        if not isinstance(context, dict):
            abort(HTTPStatus.BAD_REQUEST,
                "X-Tryton-Context must be a JSON object in URL-safe base64")
        # private keys are the server's own, as trytond's RPC layer says
        context = {k: v for k, v in context.items()
            if not k.startswith('_')}
    language = request.accept_languages.best
    if language and language != '*':
        context['language'] = language.replace('-', '_')
    return context


def request_arguments(request):
    "Return the keyword arguments of the JSON body, or abort with 400."
    data = request.get_data(cache=True)
    if not data.strip():
        return {}
    try:
        arguments = json.loads(data, object_hook=_json_decoder)
    except Exception as exc:
        abort(HTTPStatus.BAD_REQUEST, "the body is not valid JSON: %s" % exc)
    if not isinstance(arguments, dict):
        abort(HTTPStatus.BAD_REQUEST,
            "the body must be a JSON object of keyword arguments")
    for name in arguments:
        # _delay_, _queue_ and such are the server's, not the client's
        if not name.isidentifier() or name.startswith('_'):
            abort(HTTPStatus.BAD_REQUEST,
                "%r is not a keyword argument a call may take" % name)
    return arguments


def task_url(request, database_name, task_id):
    "Return the URL of the task route of the task."
    return '%s%s/async_sqs/task/%s' % (
        request.root_url, urllib.parse.quote(database_name, safe=''),
        task_id)


def is_administrator():
    "Tell whether the user of the transaction sees the tasks of all users."
    pool = Pool()
    User = pool.get('res.user')
    ModelData = pool.get('ir.model.data')
    groups = {ModelData.get_id('async_sqs', 'group_task_admin')}
    # trytond 8.2 flags its administrators, 8.0 has a group of them
    if hasattr(User, 'is_administrator'):
        if User.is_administrator():
            return True
    else:
        groups.add(ModelData.get_id('res', 'group_admin'))
    return bool(groups & set(User.get_groups()))


@app.route('/<database_name>/async_sqs/model/<name>/<int:id>/<method>',
    methods={'POST'})
@app.route('/<database_name>/async_sqs/model/<name>/<method>',
    methods={'POST'})
@json_errors
@with_pool
def defer_call(request, pool, name, method, id=None):
    """Defer the call of the method and answer 202 with the task; with
    ?wait=SECONDS, answer 200 with its outcome if it ends in time."""
    timeout = wait_time(request)
    handle = _defer_retrying(request, pool, name, method, id)
    url = task_url(request, pool.database_name, handle.task_id)
    headers = {'Location': url}
    if timeout is None:
        return json_response({
                'task': handle.task_id,
                'state': HANDLE_STATES.get(handle.state, handle.state),
                'url': url,
                }, status=HTTPStatus.ACCEPTED, headers=headers)
    # the transaction has committed and the outbox has sent the call: the
    # wait holds no transaction, so that the worker can write the row
    status = wait_for(pool.database_name, handle.task_id, timeout,
        reply=not handle.ignore_result)
    status['url'] = url
    return status_response(status, headers=headers)


def _defer_retrying(request, pool, name, method, id):
    """Defer the call; try again when its commit fails on the database.

    trytond's with_transaction tries again what fails in the call, not in
    its commit, and the outbox writes the rows at the commit (tpc_vote):
    there SQLite, under many writers at once, times out on its lock. A
    failed commit sent nothing, so that trying again defers the call once."""
    retry = config.getint('database', 'retry')
    count = 0
    while True:
        try:
            return _defer(request, pool, name, method, id)
        except backend.DatabaseOperationalError:
            if count >= retry:
                raise
            count += 1
            logger.debug("the commit of a deferred call failed, try %i",
                count, exc_info=True)
            time.sleep(0.02 * count)


@with_transaction(readonly=False)
@_application
def _defer(request, pool, name, method, id):
    ModelAccess = pool.get('ir.model.access')
    transaction = Transaction()
    arguments = request_arguments(request)
    context = request_context(request)
    try:
        Model = pool.get(name)
    except KeyError:
        abort(HTTPStatus.NOT_FOUND, "unknown model %s" % name)
    options = getattr(Model, '__async_tasks__', {}).get(method)
    rpc = Model.__rpc__.get(method)
    if (options is None and rpc is None
            and not callable(getattr(Model, method, None))):
        abort(HTTPStatus.NOT_FOUND, "%s has no method %s" % (name, method))
    if options is None or rpc is None or method.startswith('_'):
        # a route is no back door around what the Tryton client may call
        abort(HTTPStatus.FORBIDDEN,
            "%s.%s is not a method both deferrable and exposed to RPC"
            % (name, method))
    if not ModelAccess.check(name, mode='read', raise_exception=False):
        abort(HTTPStatus.FORBIDDEN, "no access to %s" % name)
    instance_method = is_instance_method(Model, method)
    # the worker runs the call with the access checks of an RPC call
    with transaction.set_context(context, **{CHECK_ACCESS: True}):
        if id is not None:
            if not issubclass(Model, ModelStorage):
                abort(HTTPStatus.NOT_FOUND,
                    "%s stores no records" % name)
            try:
                record, = Model.search([('id', '=', id)])
            except ValueError:
                abort(HTTPStatus.NOT_FOUND,
                    "no record %s of %s" % (id, name))
            except AccessError:
                abort(HTTPStatus.FORBIDDEN,
                    "no access to record %s of %s" % (id, name))
            if instance_method:
                function, args = getattr(record, method), ()
            else:
                # as trytond's REST route: the classmethod gets [record]
                function, args = getattr(Model, method), ([record],)
        elif instance_method:
            abort(HTTPStatus.BAD_REQUEST,
                "%s.%s is a method of a record: the path needs its id"
                % (name, method))
        else:
            function, args = getattr(Model, method), ()
        try:
            # refused here rather than failed in the worker
            inspect.signature(function).bind(*args, **arguments)
        except TypeError as exc:
            abort(HTTPStatus.BAD_REQUEST, "%s.%s: %s" % (name, method, exc))
        try:
            handle = function.defer(*args, **arguments)
        except ValueError as exc:
            if 'SQS limit' in str(exc):
                abort(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc))
            abort(HTTPStatus.BAD_REQUEST, str(exc))
        except TypeError as exc:
            abort(HTTPStatus.BAD_REQUEST, str(exc))
    return handle


@app.route('/<database_name>/async_sqs/task/<task_id>', methods={'GET'})
@json_errors
@with_pool
def task_state(request, pool, task_id):
    """Answer the state of the task, and its outcome once it ended: 200
    when it ended, 202 otherwise; with ?wait=SECONDS, once it ended or the
    seconds passed."""
    timeout = wait_time(request)
    status = _readable_status(request, pool, task_id)
    if timeout is not None and status['state'] not in FINISHED:
        status = wait_for(pool.database_name, status['task'], timeout,
            reply=wants_reply(pool, status))
    return status_response(status)


@with_transaction(readonly=True)
@_application
def _readable_status(request, pool, task_id):
    status = task_status(pool.database_name, task_id)
    # a task of another user is as unknown as no task at all
    if status is None or (status['user'] != Transaction().user
            and not is_administrator()):
        abort(HTTPStatus.NOT_FOUND, "unknown task %s" % task_id)
    return status


@app.route('/<database_name>/async_sqs/metrics', methods={'GET'})
@json_errors
@with_pool
@with_transaction(readonly=True)
@_application
def task_metrics(request, pool):
    """Answer the statistics of the calls of the last hour, or of the last
    ?since=MINUTES, in the Prometheus text exposition format."""
    if not is_administrator():
        # the figures of every user's calls
        abort(HTTPStatus.FORBIDDEN, "the metrics are for the members of "
            "the Deferred Task Administration group")
    since = request.args.get('since')
    if since is not None and not (since.isdigit() and int(since) >= 1):
        abort(HTTPStatus.BAD_REQUEST,
            "since must be a positive number of minutes, not %r" % since)
    return Response(metrics.prometheus(stats.report(since and int(since))),
        content_type=metrics.PROMETHEUS_TYPE)


def wants_reply(pool, status):
    "Tell whether the call of a task's status sends a reply."
    try:
        Model = pool.get(status['model'])
    except KeyError:
        return False
    options = getattr(Model, '__async_tasks__', {}).get(status['method'])
    return options is not None and not options.ignore_result


def wait_for(database_name, task_id, timeout, reply):
    """Wait up to timeout seconds for the call to end; return its status.

    A call that sends a reply is waited for on its reply queue (a long
    poll), which reads the row too; the row of one that sends none is read
    every POLL_INTERVAL, lest a reply queue be made that nobody fills."""
    deadline = time.monotonic() + timeout
    if reply:
        handle = TaskHandle(task_id, database=database_name)
        try:
            handle.wait(timeout)
        except (ResultTimeout, TaskNotSent, UserError, TaskFailed,
                TaskCancelled):
            # the outcome, if any, is on the row: the status tells it
            pass
        except (BotoCoreError, ClientError):
            # the call is deferred, only its reply queue failed: its row
            # tells the outcome, read for the rest of the wait
            logger.warning("the reply queue of task %s failed, its row is "
                "read instead", task_id, exc_info=True)
            reply = False
    while True:
        status = task_status(database_name, task_id)
        if (status is None or status['state'] in FINISHED or reply
                or time.monotonic() >= deadline):
            break
        time.sleep(min(POLL_INTERVAL,
                max(0, deadline - time.monotonic())))
    if status is None:
        # deleted meanwhile, by the cleaning
        abort(HTTPStatus.NOT_FOUND, "unknown task %s" % task_id)
    return status


def _plain(value):
    "Return value with the records of a result as REST gives them."
    return walk(value, lambda ref: {'__name__': ref.model, 'id': ref.id})


def status_response(status, headers=None):
    "Return the response of a task's status: 200 if it ended, 202 if not."
    body = {k: status.get(k) for k in (
            'task', 'state', 'enqueued_at', 'started_at', 'finished_at')}
    if 'url' in status:
        body['url'] = status['url']
    if status['state'] == 'done':
        body['result'] = _plain(status.get('result'))
    elif status['state'] in ('failed', 'cancelled'):
        body['error'] = status.get('error')
    code = (HTTPStatus.OK if status['state'] in FINISHED
        else HTTPStatus.ACCEPTED)
    return json_response(body, status=code, headers=headers)
