# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The handle of a deferred call: its id, and its result once it is there."
import asyncio
import logging
import time

from trytond.exceptions import UserError

from . import settings, sqs
from .exceptions import (
    MessageError, ResultIgnored, ResultTimeout, TaskCancelled, TaskFailed,
    TaskNotSent)
from .message import decode_reply, verify, walk

logger = logging.getLogger(__name__)

#: Longest long poll SQS allows, in seconds.
MAX_WAIT_TIME = 20
#: Error type of the reply that tells a waiter its task was cancelled.
CANCELLED = 'TaskCancelled'


def reply_queue_attributes():
    "Return the attributes every reply queue is created with."
    # worker and waiter may each create it: SQS wants the same attributes
    return {'MessageRetentionPeriod': str(settings.reply_ttl())}


class TaskHandle:
    """A deferred call: wait() returns its result, ready() tells if it is in.

    A handle can be made again from a task id, in any process, to wait for a
    result there."""

    def __init__(self, task_id, database=None, model=None, method=None,
            ignore_result=False, state='sent'):
        self.task_id = task_id
        self.database = database
        self.model = model
        self.method = method
        self.ignore_result = ignore_result
        self._state = state
        self._reply = None

    def __repr__(self):
        return '<TaskHandle %s %s.%s@%s %s>' % (
            self.task_id, self.model, self.method, self.database, self.state)

    @property
    def state(self):
        "pending, sent, unsent (SQS failed at commit), dropped or done."
        return 'done' if self._reply is not None else self._state

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
            self._reply = self._receive(0)
        return self._reply is not None

    def wait(self, timeout=None):
        """Return the result of the call, waiting up to timeout seconds.

        Raise ResultTimeout if it is not in by then (the handle can wait
        again), the UserError the call raised, TaskCancelled if the task was
        cancelled before it ran, or TaskFailed for any other error."""
        self._check_waitable()
        if self._reply is None:
            self._reply = self._receive(timeout)
            if self._reply is None:
                raise ResultTimeout(self.task_id, timeout)
        return self._outcome()

    def __await__(self):
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.wait).__await__()

    def _receive(self, timeout):
        transport = sqs.client()
        name = self.reply_queue
        url = transport.open(name, reply_queue_attributes())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                wait_time = MAX_WAIT_TIME
            else:
                remaining = deadline - time.monotonic()
                wait_time = max(0, min(MAX_WAIT_TIME, int(remaining)))
            for message in transport.receive(
                    url, max_number=1, wait_time=wait_time):
                reply = self._accept(message)
                if reply is not None:
                    transport.delete_queue(name)
                    return reply
                transport.delete_batch(url, [message['ReceiptHandle']])
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _accept(self, message):
        try:
            # a reply anyone could have written must not pass for a result
            verify(message)
            reply = decode_reply(message['Body'], message.get('MessageId'))
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
