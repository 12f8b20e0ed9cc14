# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The async_task decorator: a method that runs here, or later on a worker.

A decorated method called as usual runs at once, as before. Called with
_defer_=True, or through .defer(), it is described, encoded and kept by the
transaction's outbox, and a TaskHandle is returned at once."""
import inspect
import logging
import uuid
from collections import namedtuple

import wrapt

from . import sqs
from .message import Call, encode_call

logger = logging.getLogger(__name__)

TaskOptions = namedtuple('TaskOptions', [
        'ignore_result', 'queue', 'visibility_timeout', 'delay'])
TaskOptions.__doc__ = "The options a method is decorated with."


def async_task(ignore_result=True, queue=None, visibility_timeout=None,
        delay=0):
    """Mark a method of a model, wizard or report as deferrable.

    ignore_result: False to send the return value back to the caller.
    queue: the queue (of the database) the calls go to; the default queue
    of the configuration if None.
    visibility_timeout: seconds a worker keeps a call hidden from the others
    (0 to 43200); the queue's own if None.
    delay: seconds SQS holds each call back before a worker sees it
    (0 to 900)."""
    if callable(ignore_result):
        # used bare, as @async_task
        return async_task()(ignore_result)
    if not 0 <= delay <= sqs.MAX_DELAY:
        raise ValueError(
            "async_task delay must be within 0 to %s seconds, not %s"
            % (sqs.MAX_DELAY, delay))
    if visibility_timeout is not None and not (
            0 <= visibility_timeout <= 43200):
        raise ValueError(
            "async_task visibility_timeout must be within 0 to 43200 "
            "seconds, not %s" % visibility_timeout)
    options = TaskOptions(
        ignore_result=ignore_result, queue=queue,
        visibility_timeout=visibility_timeout, delay=delay)

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


def defer(options, wrapped, instance, args, kwargs):
    "Describe the call, keep it in the transaction's outbox, return a handle."
    from trytond.model import Model
    from trytond.transaction import Transaction

    from .outbox import Outbox
    from .result import TaskHandle

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
    transaction = Transaction()
    if transaction.database is None:
        raise RuntimeError(
            "%s.%s can be deferred only inside a Tryton transaction"
            % (cls.__name__, wrapped.__name__))
    method = wrapped.__name__
    queue = options.queue or sqs.settings.queue()
    context = call_context(transaction.context)
    call = Call(
        task=uuid.uuid4().hex, database=transaction.database.name,
        user=transaction.user, context=context, model=cls.__name__,
        kind=kind, method=method, instance=record_id, args=list(args),
        kwargs=kwargs, reply=not options.ignore_result, queue=queue)
    try:
        body = encode_call(call)
    except TypeError as exc:
        name, error = _name_offending(
            wrapped, instance, args, kwargs, context)
        raise TypeError(
            "argument %s of %s.%s cannot be deferred: %s" % (
                name, cls.__name__, method, error or exc)) from exc
    handle = TaskHandle(
        call.task, database=call.database, model=call.model, method=method,
        ignore_result=options.ignore_result, state='pending')
    Outbox.of(transaction).put(
        sqs.task_queue_name(call.database, queue), body, handle,
        delay=options.delay)
    logger.debug("%s.%s deferred as %s", cls.__name__, method, call.task)
    return handle
