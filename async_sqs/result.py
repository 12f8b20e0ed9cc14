# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The handle of a deferred call: its id, and its result once it is there."
import asyncio
import logging
import time
import uuid

from trytond.exceptions import UserError

from . import settings, sqs
from .exceptions import (
    MessageError, PayloadUnavailable, ResultIgnored, ResultTimeout,
    TaskCancelled, TaskFailed, TaskNotSent)
from .message import CANCELLED, Reply, decode_reply, walk
from .payload import read_reply
from .rows import read_rows, wants_reply

logger = logging.getLogger(__name__)

#: Longest long poll SQS allows, in seconds.
MAX_WAIT_TIME = 20
#: Seconds a waiter long-polls the reply queue between two reads of the
#: task row.
ROW_INTERVAL = 1


def row_reply(row):
    """Return the Reply that the row of a finished call holds, or None if
    the call has not ended.

    A call done without a stored result (ignore_result=True) gives None as
    its result."""
    task_id, state = row['uuid'], row['state']
    if state == 'done':
        if row['result']:
            return decode_reply(row['result'])
        return Reply(task=task_id, ok=True, result=None, error=None)
    if state == 'cancelled':
        return Reply(task=task_id, ok=False, result=None, error={
                'type': CANCELLED,
                'message': row['error'] or "the task was cancelled"})
    if state == 'failed':
        error = {
            # rows failed before the error type was kept
            'type': row['error_type'] or 'unknown',
            'message': row['error'] or '',
            }
        if row['error_description']:
            error['description'] = row['error_description']
        if row['traceback']:
            error['traceback'] = row['traceback']
        return Reply(task=task_id, ok=False, result=None, error=error)
    return None


def task_status(database, task_id):
    """Return how the task stands, read from its row; None without a row.

    The dict has the keys task (the id as 32 hex digits), model, method,
    user (the id of the user who deferred it), state (waiting, pending,
    queued, running, done, failed or cancelled), attempts, enqueued_at,
    started_at, finished_at (naive datetimes or None), result and error.
    result is the return value of a call done, with records as
    RecordRef(model, id), and None otherwise or when the method ignores its
    result. error is None, or
    {'type', 'message'} for a call failed or cancelled, or whose result
    could not be encoded. Any UUID spelling is accepted; one that is not a
    UUID has no row. The row is read in a transaction of its own."""
    try:
        task_id = uuid.UUID(str(task_id)).hex
    except ValueError:
        return None
    row = read_rows(database, [task_id]).get(task_id)
    if row is None:
        return None
    reply = row_reply(row)
    result = error = None
    if reply is not None:
        if reply.ok:
            result = reply.result
        else:
            error = {'type': reply.error['type'],
                'message': reply.error['message']}
    return {
        'task': task_id,
        'model': row['model'],
        'method': row['method'],
        'user': row['user'],
        'state': row['state'],
        'attempts': row['attempts'],
        'enqueued_at': row['enqueued_at'],
        'started_at': row['started_at'],
        'finished_at': row['finished_at'],
        'result': result,
        'error': error,
        }


class TaskHandle:
    """A deferred call: wait() returns its result, ready() tells if it is in.

    A handle can be made again from a task id, in any process, to wait for a
    result there: with the database, the outcome is read from the task row
    when the reply queue no longer holds it, as often as asked."""

    def __init__(self, task_id, database=None, model=None, method=None,
            ignore_result=False, state=None):
        self.task_id = task_id
        self.database = database
        self.model = model
        self.method = method
        self.ignore_result = ignore_result
        # None: made from a task id, the row knows the state
        self._state = state
        self._reply = None
        # whether a row done without a stored result is one of before the
        # result was stored, whose reply only the reply queue holds
        self._legacy = None

    def __repr__(self):
        return '<TaskHandle %s %s.%s@%s %s>' % (
            self.task_id, self.model, self.method, self.database,
            self._state or 'sent')

    @property
    def state(self):
        """pending, sent, unsent (SQS failed at commit), waiting (a call
        that then() deferred, once committed), dropped or done for the
        handle deferring returned; for one made from a task id with the
        database, the state of the row (waiting, pending, queued, running,
        done, failed or cancelled, unknown without a row), otherwise
        sent."""
        if self._state is None:
            if self.database is None:
                return 'done' if self._reply is not None else 'sent'
            status = self.status()
            return status['state'] if status else 'unknown'
        return 'done' if self._reply is not None else self._state

    def status(self):
        "Return task_status() of the task: its row read now, or None."
        if self.database is None:
            raise ValueError(
                "the handle of task %s has no database to read its row from"
                % self.task_id)
        return task_status(self.database, self.task_id)

    def _set_state(self, state):
        self._state = state

    @property
    def reply_queue(self):
        "Name of the queue the result comes back on."
        return sqs.reply_queue_name(self.task_id)

    def _check_waitable(self):
        if self.ignore_result:
            raise ResultIgnored(self.task_id)
        if self._reply is None and self._state in {'pending', 'dropped'}:
            raise TaskNotSent(self.task_id, self._state)

    def ready(self):
        "Tell whether the result is in, without waiting."
        self._check_waitable()
        if self._reply is None:
            self._reply = self._from_row()
        if self._reply is None:
            if settings.reply_queue() == 'process':
                from .listener import listener
                self._reply = listener().ready(self)
            else:
                self._reply = self._receive(0)
        return self._reply is not None

    def wait(self, timeout=None):
        """Return the result of the call, waiting up to timeout seconds.

        Raise ResultTimeout if it is not in by then (the handle can wait
        again), the UserError the call raised, TaskCancelled if the task was
        cancelled before it ran, or TaskFailed for any other error. The
        outcome comes from the reply queue, or from the task row once the
        reply was read by another handle; a call of a method that ignores
        its result ends with None."""
        self._check_waitable()
        if self._reply is None and settings.reply_queue() == 'process':
            from .listener import listener

            # the first wait makes the queue that later replies come to
            listener().open_queue()
        if self._reply is None:
            self._reply = self._from_row()
        if self._reply is None:
            if settings.reply_queue() == 'process':
                self._reply = listener().wait(self, timeout)
            else:
                self._reply = self._receive(timeout)
            if self._reply is None:
                raise ResultTimeout(self.task_id, timeout)
        return self._outcome()

    async def wait_async(self, timeout=None):
        """Return the result of the call, as wait() does, without blocking
        the event loop.

        The handle is handed to the listener of the process, whose few
        threads wait for every handle of the process: a waiter holds no
        thread, and results come in the order they arrive."""
        from .listener import listener
        self._check_waitable()
        if self._reply is None:
            waiting = listener()
            future = waiting.watch(self)
            try:
                self._reply = await asyncio.wait_for(
                    asyncio.wrap_future(future), timeout)
            except TimeoutError:
                raise ResultTimeout(self.task_id, timeout) from None
            finally:
                if not future.done() or future.cancelled():
                    waiting.forget(self, future)
        return self._outcome()

    def _from_row(self):
        "Return the Reply the task row holds, or None; None without database."
        if self.database is None:
            return None
        row = read_rows(self.database, [self.task_id]).get(self.task_id)
        if row is None:
            return None
        return self._row_reply(row)

    def _row_reply(self, row):
        reply = row_reply(row)
        if (reply is not None and reply.ok and not row['result']
                and not self.ignore_result):
            if self._legacy is None:
                body = read_rows(self.database, [self.task_id],
                    columns=('uuid', 'body')).get(self.task_id)
                self._legacy = bool(body and wants_reply(body['body']))
            if self._legacy:
                return None
        return reply

    def __await__(self):
        return self.wait_async().__await__()

    def then(self, method, *args, **kwargs):
        """Defer method once this call is done, with its result as first
        argument, and return the handle of that call.

        Called in the transaction that deferred this call, before it
        commits; method is a deferrable method, as Model.method. The call
        is written waiting and deferred by the worker, in the transaction
        that marks this one done. If this call fails for good, or is
        cancelled, so is that one, and those that follow it: its waiter
        gets TaskFailed, or TaskCancelled."""
        from .chain import then
        return then([self], method, args, kwargs)

    def _receive(self, timeout):
        """Return the Reply from the reply queue, or from the row once it
        is finished and the reply did not come; None after timeout."""
        transport = sqs.client()
        name = self.reply_queue
        url = transport.open(name, sqs.reply_queue_attributes())
        deadline = None if timeout is None else time.monotonic() + timeout
        longest = MAX_WAIT_TIME if self.database is None else ROW_INTERVAL
        finished = False
        while True:
            if deadline is None:
                wait_time = longest
            else:
                remaining = deadline - time.monotonic()
                wait_time = max(0, min(longest, int(remaining)))
            for message in transport.receive(
                    url, max_number=1, wait_time=wait_time):
                try:
                    reply = self._accept(message)
                except PayloadUnavailable as exc:
                    # kept: it comes back once hidden no more, and the row
                    # may answer meanwhile
                    logger.warning("reply for %s not read: %s",
                        self.task_id, exc)
                    continue
                if reply is not None:
                    transport.delete_queue(name)
                    return reply
                transport.delete_batch(url, [message['ReceiptHandle']])
            reply = self._from_row()
            if reply is not None:
                # the reply leaves after the row commits: a reply queue
                # still empty one poll later was read by another handle
                if finished:
                    transport.delete_queue(name)
                    return reply
                finished = True
            if deadline is not None and time.monotonic() >= deadline:
                # the row is authoritative: what it holds is the outcome
                return reply

    def _accept(self, message):
        try:
            reply = read_reply(message)
        except MessageError as exc:
            logger.warning("reply for %s refused: %s", self.task_id, exc)
            return None
        if reply.task != self.task_id:
            logger.warning(
                "reply for %s refused: it answers %s", self.task_id,
                reply.task)
            return None
        return reply

    def _outcome(self):
        reply = self._reply
        if reply.ok:
            return walk(reply.result, self._record)
        error = reply.error
        if error['type'] == 'UserError':
            raise UserError(error['message'], error.get('description') or '')
        if error['type'] == CANCELLED:
            raise TaskCancelled(self.task_id)
        raise TaskFailed(self.task_id, error['type'], error['message'],
            error.get('traceback') or '')

    def _record(self, ref):
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        if self.database and Transaction().database is not None:
            try:
                return Pool(self.database).get(ref.model)(ref.id)
            except KeyError:
                pass
        return ref
