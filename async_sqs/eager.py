# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Eager mode: deferred calls run in the caller's process, without SQS.

With [async_sqs] eager = True, the outbox hands the calls of a transaction
that committed to run() instead of sending them. Each call runs as a worker
runs it (the same claim, checks and transaction, as the recorded user with
the recorded context) and its row ends done or failed; the outcome is kept
on the handle, so that wait() needs no reply queue."""
import logging
import os
import socket
from contextlib import contextmanager

from trytond.exceptions import UserError, UserWarning
from trytond.status import processing
from trytond.transaction import Transaction

from .exceptions import MessageError
from .message import decode_call, decode_reply, encode_reply
from .receiver import Received
from .runner import (
    NO_ROW, SKIPPED, Attempt, Runner, error_payload, refusal_payload,
    task_name)

logger = logging.getLogger(__name__)


class _NoHeartbeat:
    "Nothing to keep hidden: no message was received."

    def hold(self, received, timeout):
        pass

    def extend(self, received, timeout):
        pass

    def release(self, received):
        pass


@contextmanager
def _no_transaction():
    """Run the block as if no transaction were open in this thread.

    The outbox calls run() from the end of the caller's transaction, which
    is still on this thread's stack; the worker's code starts transactions
    of its own, as it does in a process of its own. A thread would not do:
    an SQLite database in memory is one per thread."""
    local = Transaction._local
    saved, local.transactions = local.transactions, []
    try:
        yield
    finally:
        local.transactions = saved


class EagerRunner(Runner):
    "The worker's way of running a call, in the caller's process."

    def __init__(self, database_name):
        super().__init__('eager %s:%s' % (socket.gethostname(), os.getpid()),
            _NoHeartbeat())
        self.database_name = database_name

    def run_entries(self, entries):
        "Run the calls of the outbox entries, one after the other."
        for row, handle, *_ in entries:
            try:
                reply = self.run_one(row)
            except Exception:
                logger.critical("%s could not be run eagerly", row['uuid'],
                    exc_info=True)
                continue
            if handle is None:
                continue
            handle._set_state('sent')
            if reply is not None and not handle.ignore_result:
                handle._reply = decode_reply(reply)

    def run_one(self, row):
        """Run the call of the row until it is done or failed for good.

        Return the reply body: the result or the error. Retries run at
        once, without the backoff."""
        call = decode_call(row['body'])
        name = task_name(call)
        received = Received(call.database, row['queue'], None, {}, None)
        while True:
            attempt = Attempt(call, received)
            logger.info("%s starts eagerly", name)
            try:
                with processing(name):
                    reply = self.run_call(attempt)
            except MessageError as exc:
                logger.error("%s refused: %s", name, exc.reason)
                payload = refusal_payload(exc)
                if attempt.number is not None or exc.reason != NO_ROW:
                    self.record(call, 'failed', attempt, payload)
                return encode_reply(call.task, error=payload)
            except (UserError, UserWarning) as exc:
                logger.info("%s failed after %i ms: %s", name,
                    attempt.duration(), exc)
                return self._failed(call, attempt, exc)
            except Exception as exc:
                retries = attempt.options.retries if attempt.options else 0
                number = attempt.number or 1
                logger.error("%s failed after %i ms (attempt %s of %s)",
                    name, attempt.duration(), number, retries + 1,
                    exc_info=True)
                if number > retries:
                    return self._failed(call, attempt, exc)
                self.record(call, 'queued', attempt, error_payload(exc))
                continue
            if reply is SKIPPED:
                logger.info("%s skipped: %s already", name, attempt.state)
                return None
            logger.info("%s done in %i ms", name, attempt.duration())
            return reply

    def _failed(self, call, attempt, exc):
        payload = error_payload(exc)
        self.record(call, 'failed', attempt, payload)
        return encode_reply(call.task, error=payload)


def run(database_name, entries):
    "Run the calls of outbox entries whose rows are committed."
    if not entries:
        return
    with _no_transaction():
        EagerRunner(database_name).run_entries(entries)


def run_rows(database_name, rows):
    """Run the calls of committed rows, (uuid, queue name, body): a retry.

    No handle waits for them here: a waiter reads the outcome from the
    row."""
    entries = [({'uuid': uuid, 'queue': queue, 'body': body}, None, 0, 1)
        for uuid, queue, body in rows]
    run(database_name, entries)
