# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The links of chains and groups, kept on the task rows.

A call deferred with then() is written, with the calls it waits for, as a
row in state waiting: its body is the call as described then, without the
results it waits for, and waiting_for counts the calls it waits for; the
row of each of those names it in its then column. The transaction that
marks a call done gathers its result on the rows that wait for it, under
their lock, and the one that leaves nothing to wait for defers the call, in
that same transaction, through its outbox: the done and the next call's
pending row commit together, or not at all. A call that fails for good, or
is cancelled, ends the rows that wait for it, and those after them, so that
their waiters are told."""
import datetime as dt
import json
import logging
import math

from trytond.pool import Pool
from trytond.tools import grouped_slice
from trytond.transaction import Transaction

from . import settings, sqs
from .exceptions import TaskStateError
from .message import CANCELLED, decode_call, dumps, encode_call, loads

logger = logging.getLogger(__name__)

#: The states a call that waits for others ends in when one of them does.
ENDS = ('failed', 'cancelled')


def _slices(values):
    # trytond.backend picks the backend at import: not before the console
    # scripts read their configuration
    from trytond import backend
    return grouped_slice(values, backend.MAX_QUERY_PARAMS)


class Unwatched:
    "The handle of a call a worker defers: nobody waits on it here."
    ignore_result = True

    def __init__(self):
        self.state = 'pending'

    def _set_state(self, state):
        self.state = state


def add_link(row, link_id, index=None):
    """Name on the row of a call, not written yet, the call link_id that
    waits for it; index is its place among the results of a group, None
    when its result is the first argument."""
    then = json.loads(row.get('then') or '[]')
    then.append([link_id, index])
    row['then'] = json.dumps(then)


def _table():
    # the table of async_sqs.task, as ModelSQL names it: the supervisor,
    # which ends calls past their time limit, has no pool
    from sql import Table
    return Table('async_sqs_task')


def _select(table, where, *columns, lock=False):
    "Return the rows of columns of the task table, locked with lock."
    from sql import For

    from trytond import backend
    cursor = Transaction().connection.cursor()
    query = table.select(*columns, where=where)
    if lock and backend.name == 'postgresql':
        # SQLite has no row lock: the claim took the write lock already
        query.for_ = For('UPDATE')
    cursor.execute(*query)
    return cursor.fetchall()


def links_of(task_ids):
    "Return [(task_id, link_id, index)] that the rows of task_ids name."
    table = _table()
    found = []
    for sub_ids in _slices(task_ids):
        for task_id, then in _select(table,
                table.uuid.in_(list(sub_ids)) & (table.then != None),  # noqa
                table.uuid, table.then):
            for link_id, index in json.loads(then):
                found.append((task_id, link_id, index))
    return found


def advance(task_id, result):
    """Gather the result of the call done on the calls waiting for it; defer
    those that wait for nothing more.

    Called in the transaction that marks the call done."""
    for _, link_id, index in links_of([task_id]):
        gather(link_id, index, result)


def gather(link_id, index, result):
    "Gather a result on the waiting row of link_id, under its lock."
    table = _table()
    rows = _select(table, table.uuid == link_id, table.id, table.state,
        table.waiting_for, table.gathered, lock=True)
    if not rows or rows[0][2] is None:
        # deferred already: the done of a call commits once
        logger.warning("task %s waits for nothing", link_id)
        return
    id_, state, waiting_for, gathered = rows[0]
    left = waiting_for - 1
    values = loads(gathered) if gathered else {}
    if index is not None:
        values[str(index)] = result
    try:
        text = dumps(values)
    except (TypeError, ValueError) as exc:
        end([link_id], 'failed', _error(exc))
        return
    if left or state != 'waiting':
        # a link ended already still counts: a retry may reopen it
        cursor = Transaction().connection.cursor()
        cursor.execute(*table.update([table.waiting_for, table.gathered],
                [left, text], where=table.id == id_))
        logger.debug("task %s waits for %i more call(s)", link_id, left)
        return
    if index is not None:
        result = [values[k] for k in sorted(values, key=int)]
    defer(link_id, result)


def defer(link_id, first):
    """Defer the call of a waiting row with first as its first argument,
    through the outbox of the transaction: the row is written again,
    pending."""
    from .outbox import Outbox
    pool = Pool()
    table = _table()
    (id_, queue_name, records, tenant, user, body, then), = _select(
        table, table.uuid == link_id, table.id, table.queue, table.records,
        table.tenant, table.user, table.body, table.then)
    try:
        # its own problem, not the one of the call done: it fails alone
        call = decode_call(body)
        cls = pool.get(call.model, type=call.kind)
        options = getattr(cls, '__async_tasks__', {}).get(call.method)
        delay = options.delay if options else 0
        eta = (dt.datetime.now() + dt.timedelta(seconds=delay)
            if delay else None)
        body = encode_call(call._replace(args=[first] + list(call.args),
                # FIFO queues take no delay per message: the worker holds it
                eta=eta if delay > sqs.MAX_DELAY or (
                    delay and sqs.is_fifo(call.queue)) else None))
    except (KeyError, TypeError, ValueError) as exc:
        # MessageError is a ValueError
        end([link_id], 'failed', _error(exc))
        return
    cursor = Transaction().connection.cursor()
    cursor.execute(*table.delete(where=table.id == id_))
    calls_per_message = (options.calls_per_message if options else None)
    if calls_per_message is None:
        calls_per_message = settings.calls_per_message()
    Outbox.of().put({
            'uuid': link_id, 'queue': queue_name, 'model': call.model,
            'method': call.method, 'records': records, 'tenant': tenant,
            'user': user, 'eta': eta, 'body': body, 'then': then,
            }, Unwatched(), delay=min(math.ceil(delay), sqs.MAX_DELAY),
        calls_per_message=calls_per_message)
    logger.info("<Task %s %s.%s@%s> deferred: the calls it waits for are "
        "done", link_id, call.model, call.method, call.database)


def _error(exc):
    "Return the error payload of a call that cannot be deferred."
    return {'type': '%s.%s' % (type(exc).__module__, type(exc).__qualname__),
        'message': "it cannot be deferred: %s" % exc}


def _failure(state, payload):
    "Return the error columns of a call that waits for one that ended."
    if state == 'cancelled':
        return [CANCELLED, "a call it waits for was cancelled", None]
    error_type = payload.get('type') or 'unknown'
    if error_type == 'UserError':
        # not the waiter's own call: TaskFailed tells it, not a UserError
        error_type = 'trytond.exceptions.UserError'
    return [error_type, "a call it waits for failed: %s"
        % (payload.get('message') or ''), payload.get('traceback')]


def abandon(task_ids, state, payload):
    """End the calls waiting for the tasks, and those after them: failed,
    or cancelled if state is, with payload, the error of the tasks.

    Called in the transaction that records the end of the tasks."""
    linked = {link_id for _, link_id, _ in links_of(task_ids)}
    if linked:
        end(linked, state, payload)


def end(link_ids, state, payload):
    "Mark the waiting rows of link_ids ended, and those that wait for them."
    table = _table()
    cursor = Transaction().connection.cursor()
    columns = [table.state, table.finished_at, table.error_type,
        table.error, table.traceback, table.write_date]
    now = dt.datetime.now()
    todo = set(link_ids)
    while todo:
        ended = []
        for sub_ids in _slices(todo):
            ended += [r[0] for r in _select(table,
                    table.uuid.in_(list(sub_ids))
                    & (table.state == 'waiting'), table.uuid, lock=True)]
        for sub_ids in _slices(ended):
            cursor.execute(*table.update(columns,
                    [state, now] + _failure(state, payload) + [now],
                    where=table.uuid.in_(list(sub_ids))))
        for link_id in ended:
            logger.info("task %s %s: a call it waits for ended %s",
                link_id, state, state)
        todo = {link_id for _, link_id, _ in links_of(ended)}


def reopen(task_ids):
    """Let the calls that waited for the tasks retried wait again, with
    those after them.

    Refuse the retry of a call never deferred: its row holds its call
    without the results it waited for."""
    from trytond.i18n import gettext
    table = _table()
    for sub_ids in _slices(task_ids):
        for uuid, model, method in _select(table,
                table.uuid.in_(list(sub_ids))
                & (table.waiting_for != None),  # noqa: E711
                table.uuid, table.model, table.method):
            raise TaskStateError(gettext('async_sqs.msg_task_retry_link',
                    task='%s.%s %s' % (model, method, uuid)))
    cursor = Transaction().connection.cursor()
    todo = {link_id for _, link_id, _ in links_of(task_ids)}
    while todo:
        reopened = []
        for sub_ids in _slices(todo):
            reopened += [r[0] for r in _select(table,
                    table.uuid.in_(list(sub_ids))
                    & table.state.in_(list(ENDS))
                    & (table.waiting_for > 0), table.uuid, lock=True)]
        for sub_ids in _slices(reopened):
            cursor.execute(*table.update(
                    [table.state, table.finished_at, table.error_type,
                        table.error, table.traceback],
                    ['waiting', None, None, None, None],
                    where=table.uuid.in_(list(sub_ids))))
        todo = {link_id for _, link_id, _ in links_of(reopened)}
