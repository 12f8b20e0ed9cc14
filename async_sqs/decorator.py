# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The async_task decorator: a method that runs here, or later on a worker.

A decorated method called as usual runs at once, as before. Called with
_defer_=True, or through .defer(), it is described, encoded and kept by the
transaction's outbox, and a TaskHandle is returned at once."""
import datetime as dt
import inspect
import logging
import math
import uuid
from collections import namedtuple

import wrapt

from . import sqs
from .message import (
    MAX_CALLS_PER_MESSAGE, Call, check_signing, encode_call, is_group_id,
    is_plain)

logger = logging.getLogger(__name__)

TaskOptions = namedtuple('TaskOptions', [
        'ignore_result', 'queue', 'visibility_timeout', 'delay', 'retries',
        'retry_backoff', 'calls_per_message', 'time_limit',
        'soft_time_limit', 'tenant', 'unique'],
    defaults=[None, None, None, False])
TaskOptions.__doc__ = "The options a method is decorated with."

#: Longest postponement, in seconds: SQS keeps a message 14 days at most.
MAX_POSTPONE = 14 * 24 * 60 * 60
#: Longest time limit, in seconds: SQS keeps a message hidden 12 hours.
MAX_TIME_LIMIT = 43200


def check_delay(delay, name='delay'):
    "Return the delay as a number of seconds, or raise ValueError."
    if isinstance(delay, dt.timedelta):
        delay = delay.total_seconds()
    if not 0 <= delay <= MAX_POSTPONE:
        raise ValueError(
            "async_task %s must be within 0 to %s seconds, not %s"
            % (name, MAX_POSTPONE, delay))
    return delay


def check_time_limits(time_limit, soft_time_limit):
    "Raise ValueError unless the limits are within SQS's and soft < hard."
    for name, value in [('time_limit', time_limit),
            ('soft_time_limit', soft_time_limit)]:
        if value is not None and not 0 <= value <= MAX_TIME_LIMIT:
            raise ValueError(
                "async_task %s must be within 0 to %s seconds, not %s"
                % (name, MAX_TIME_LIMIT, value))
    if time_limit and soft_time_limit and soft_time_limit >= time_limit:
        raise ValueError(
            "async_task soft_time_limit (%s s) must be below time_limit "
            "(%s s)" % (soft_time_limit, time_limit))


def async_task(ignore_result=True, queue=None, visibility_timeout=None,
        delay=0, retries=0, retry_backoff=10, calls_per_message=None,
        time_limit=None, soft_time_limit=None, tenant=None, unique=False):
    """Mark a method of a model, wizard or report as deferrable.

    ignore_result: False to send the return value back to the caller.
    queue: the queue (of the database) the calls go to; the default queue
    of the configuration if None.
    visibility_timeout: seconds a worker keeps a call hidden from the others
    (0 to 43200); the queue's own if None.
    delay: seconds (or a timedelta) before a worker runs each call; up to
    900 SQS holds the message back, beyond the worker does (14 days at most).
    retries: how many times a call that raised is run again (UserError and
    refused calls never are).
    retry_backoff: seconds before the first retry, doubled at each one.
    calls_per_message: how many calls deferred in one transaction may share
    one SQS message (1 to 100): fewer requests for many small calls, but the
    calls of a message run one after the other on one worker; the
    configuration's calls_per_message if None.
    time_limit: seconds a call may run before the worker process running it
    is ended and the call failed (0 for none); the configuration's
    time_limit if None.
    soft_time_limit: seconds after which TaskTimeLimit is raised inside the
    call, so that it may clean up; below time_limit.
    tenant: what the calls are grouped by in SQS's fair queues, so that one
    tenant's burst does not hold back the others': 'company' (of the
    caller's context), 'user', 'database', or a callable given the call's
    records and context that returns a string; the configuration's tenant
    if None.
    unique: True for one pending call per method, records, arguments, user
    and context: a defer while an identical call is pending or queued
    returns its handle; or a callable that returns the key (unique.py)."""
    if callable(ignore_result):
        # used bare, as @async_task
        return async_task()(ignore_result)
    delay = check_delay(delay)
    if visibility_timeout is not None and not (
            0 <= visibility_timeout <= 43200):
        raise ValueError(
            "async_task visibility_timeout must be within 0 to 43200 "
            "seconds, not %s" % visibility_timeout)
    if not 0 <= retries <= 100:
        raise ValueError(
            "async_task retries must be within 0 to 100, not %s" % retries)
    if not 0 <= retry_backoff <= 43200:
        raise ValueError(
            "async_task retry_backoff must be within 0 to 43200 seconds, "
            "not %s" % retry_backoff)
    if calls_per_message is not None and not (
            1 <= calls_per_message <= MAX_CALLS_PER_MESSAGE):
        raise ValueError(
            "async_task calls_per_message must be within 1 to %s, not %s"
            % (MAX_CALLS_PER_MESSAGE, calls_per_message))
    check_time_limits(time_limit, soft_time_limit)
    if not (tenant is None or tenant in sqs.settings.TENANTS
            or callable(tenant)):
        raise ValueError("async_task tenant must be one of %s or a "
            "callable, not %r" % (', '.join(sqs.settings.TENANTS), tenant))
    from .unique import check_option
    check_option(unique)
    options = TaskOptions(
        ignore_result=ignore_result, queue=queue,
        visibility_timeout=visibility_timeout, delay=delay, retries=retries,
        retry_backoff=retry_backoff, calls_per_message=calls_per_message,
        time_limit=time_limit, soft_time_limit=soft_time_limit,
        tenant=tenant, unique=unique)

    def decorator(wrapped):
        return AsyncTask(wrapped, options)
    return decorator


def _call(options, wrapped, instance, args, kwargs):
    if not kwargs.pop('_defer_', False):
        return wrapped(*args, **kwargs)
    return defer(options, wrapped, instance, args, kwargs)


class BoundAsyncTask(wrapt.BoundFunctionWrapper):
    "A deferrable method bound to its class or record."

    def defer(self, *args, **kwargs):
        "Defer the call: same as calling with _defer_=True."
        return self(*args, _defer_=True, **kwargs)


class AsyncTask(wrapt.FunctionWrapper):
    "A deferrable method."

    __bound_function_wrapper__ = BoundAsyncTask

    def __init__(self, wrapped, options):
        def wrapper(wrapped, instance, args, kwargs):
            return _call(options, wrapped, instance, args, kwargs)
        super().__init__(wrapped, wrapper)
        self._self_async_options = options

    def defer(self, *args, **kwargs):
        "Defer the call: same as calling with _defer_=True."
        return self(*args, _defer_=True, **kwargs)


def task_options(value):
    "Return the TaskOptions of a class attribute, or None if not deferrable."
    # type(), not isinstance(): a wrapt proxy passes for what it wraps
    if type(value) in (classmethod, staticmethod):
        value = value.__func__
    if issubclass(type(value), AsyncTask):
        return value._self_async_options
    return None


def deferrable_methods(cls):
    """Return {name: TaskOptions} of the deferrable methods of a pool class.

    A method a later module overrides without the decorator stays
    deferrable, with the options of its nearest decorated definition."""
    methods = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            options = task_options(value)
            if options is not None:
                methods[name] = options
    return methods


def _pool_class_deferrable(cls):
    "Wrap again the methods of cls that an override left undecorated."
    methods = deferrable_methods(cls)
    for name, options in methods.items():
        for klass in cls.__mro__:
            if name in vars(klass):
                value = vars(klass)[name]
                break
        if task_options(value) is None:
            setattr(cls, name, AsyncTask(value, options))
    cls.__async_tasks__ = methods


@wrapt.patch_function_wrapper('trytond.pool', 'Pool.setup_mixin')
def _setup_mixin(wrapped, instance, args, kwargs):
    # setup_mixin closes every pool initialisation, once all classes of all
    # modules are built: the last moment an override can hide the decorator
    result = wrapped(*args, **kwargs)
    for type_ in ('model', 'wizard', 'report'):
        for _, cls in instance.iterobject(type=type_):
            if '__async_tasks__' not in vars(cls):
                _pool_class_deferrable(cls)
    return result


def pool_kind(cls):
    "Return the pool type of a class: model, wizard or report."
    from trytond.model import Model
    from trytond.report import Report
    from trytond.wizard import Wizard
    if issubclass(cls, Model):
        return 'model'
    elif issubclass(cls, Wizard):
        return 'wizard'
    elif issubclass(cls, Report):
        return 'report'
    raise TypeError(
        "async_task defers methods of Tryton models, wizards and reports, "
        "not of %s" % cls)


def call_context(context):
    "Return the part of a transaction context that travels with a call."
    # private keys are the server's own, as trytond's RPC layer says
    return {k: v for k, v in context.items() if not k.startswith('_')}


def _name_offending(wrapped, instance, args, kwargs, context):
    "Return the name of the first argument that cannot be encoded."
    from .message import dumps
    try:
        signature = inspect.signature(wrapped)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {}
    named = dict(bound)
    for i, value in enumerate(args):
        if not any(v is value for v in named.values()):
            named['#%s' % i] = value
    named.update((k, v) for k, v in kwargs.items() if k not in named)
    named.update(('context[%r]' % k, v) for k, v in context.items())
    for name, value in named.items():
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            return name, exc
    return None, None


#: Keyword arguments of a deferred call that are options, not arguments.
CALL_OPTIONS = ('_delay_', '_eta_', '_queue_')


def call_records(instance, args):
    "Return the records a call names: its instance, or its first list."
    from trytond.model import Model
    if isinstance(instance, Model):
        return [instance]
    for arg in args:
        if isinstance(arg, Model):
            arg = [arg]
        if (isinstance(arg, (list, tuple)) and arg
                and all(isinstance(r, Model) for r in arg)):
            return list(arg)
    return []


def describe_records(records):
    "Return the records a call names, for the task row."
    if not records:
        return None
    ids = ','.join(str(r.id) for r in records[:20])
    more = ',...' if len(records) > 20 else ''
    return '%s,%s%s' % (records[0].__name__, ids, more)


def tenant_of(options, records, transaction, context):
    """Return the MessageGroupId of a call, or None.

    A call without a company in its context has none."""
    tenant = options.tenant or sqs.settings.tenant()
    if tenant is None:
        return None
    if tenant == 'company':
        value = context.get('company')
    elif tenant == 'user':
        value = transaction.user
    elif tenant == 'database':
        value = transaction.database.name
    else:
        value = tenant(records, context)
    if value is None:
        return None
    value = str(value)
    if not is_group_id(value):
        raise ValueError("tenant %r is not a MessageGroupId: 1 to 128 "
            "printable ASCII characters" % value)
    return value


def defer(options, wrapped, instance, args, kwargs):
    """Describe the call, keep it in the transaction's outbox, return a handle.

    _delay_ (seconds or timedelta), _eta_ (naive UTC datetime) and _queue_
    among kwargs set the call's own delay, due time and queue."""
    from trytond.model import Model
    from trytond.transaction import Transaction

    from . import unique
    from .outbox import Outbox
    from .result import TaskHandle

    delay = check_delay(kwargs.pop('_delay_', options.delay), '_delay_')
    eta = kwargs.pop('_eta_', None)
    queue = (kwargs.pop('_queue_', None) or options.queue
        or sqs.settings.queue())
    now = dt.datetime.now()
    if eta is not None:
        if not isinstance(eta, dt.datetime) or eta.tzinfo is not None:
            raise TypeError("_eta_ must be a naive UTC datetime")
        delay = check_delay(max(0, (eta - now).total_seconds()), '_eta_')
    elif delay:
        eta = now + dt.timedelta(seconds=delay)
    if isinstance(instance, type):
        cls, record_id = instance, None
    elif isinstance(instance, Model):
        cls, record_id = type(instance), instance.id
        if record_id is None or record_id < 0:
            raise TypeError(
                "%s is not saved: only stored records can defer a call"
                % instance)
    else:
        raise TypeError(
            "async_task defers methods of Tryton classes and records, "
            "not %r" % (instance,))
    kind = pool_kind(cls)
    if not sqs.settings.eager():
        # eager mode sends nothing: nothing to sign
        check_signing()
    transaction = Transaction()
    if transaction.database is None:
        raise RuntimeError(
            "%s.%s can be deferred only inside a Tryton transaction"
            % (cls.__name__, wrapped.__name__))
    method = wrapped.__name__
    context = call_context(transaction.context)
    if not is_plain(context):
        raise TypeError("the context of %s.%s holds records or nests too "
            "deep: only plain data travels" % (cls.__name__, method))
    reply_to = None
    if (not options.ignore_result and not sqs.settings.eager()
            and sqs.settings.reply_queue() == 'process'):
        from .listener import process_queue_name
        reply_to = process_queue_name()
    records = call_records(instance, args)
    call = Call(
        task=uuid.uuid4().hex, database=transaction.database.name,
        user=transaction.user, context=context, model=cls.__name__,
        kind=kind, method=method, instance=record_id, args=list(args),
        kwargs=kwargs, reply=not options.ignore_result, queue=queue,
        # FIFO queues take no delay per message: the worker holds it back
        eta=eta if delay > sqs.MAX_DELAY or (
            delay and sqs.is_fifo(queue)) else None, reply_to=reply_to,
        tenant=tenant_of(options, records, transaction, context))
    try:
        body = encode_call(call)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and 'SQS limit' in str(exc):
            raise ValueError("%s.%s cannot be deferred: %s" % (
                    cls.__name__, method, exc)) from exc
        name, error = _name_offending(
            wrapped, instance, args, kwargs, context)
        raise type(exc)(
            "argument %s of %s.%s cannot be deferred: %s" % (
                name, cls.__name__, method, error or exc)) from exc
    handle = TaskHandle(
        call.task, database=call.database, model=call.model, method=method,
        ignore_result=options.ignore_result, state='pending')
    row = {
        'uuid': call.task,
        'queue': sqs.task_queue_name(call.database, queue),
        'model': call.model,
        'method': method,
        'records': describe_records(records),
        'tenant': call.tenant,
        'user': call.user,
        'eta': eta,
        'body': body,
        }
    outbox = Outbox.of(transaction)
    earlier = unique.join(outbox, options, call, records, row, handle)
    if earlier is not None:
        return earlier
    calls_per_message = options.calls_per_message
    if calls_per_message is None:
        calls_per_message = sqs.settings.calls_per_message()
    outbox.put(
        row, handle, delay=min(math.ceil(delay), sqs.MAX_DELAY),
        calls_per_message=calls_per_message)
    logger.debug("%s.%s deferred as %s", cls.__name__, method, call.task)
    return handle
