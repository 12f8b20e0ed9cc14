# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The data manager that holds deferred calls until their transaction ends.

It has the shape of trytond's SMTP data manager: calls are put during the
transaction; just before it commits, one pending row per call is written to
the task table in that same transaction; once it has committed, the messages
go to SQS and their rows are marked queued. A rollback drops everything. A
row left pending (the process died, SQS was unreachable) is sent again by the
worker's relay, so no committed call is lost."""
import logging
import sys
import threading
from collections import defaultdict

from trytond.pool import Pool
from trytond.transaction import Transaction

from . import payload, settings, sqs, unique
from .datamanager import JoinedDataManager
from .message import message_entry, pack_bodies
from .rows import mark_queued

logger = logging.getLogger(__name__)


class Outbox(JoinedDataManager):
    "The deferred calls of one transaction."
    sort_key = 'async_sqs'

    def __init__(self):
        self.entries = []
        # the handles of the unique calls put, by key
        self.keys = {}

    def put(self, row, handle, delay=0, calls_per_message=1):
        """Keep the call until the transaction commits.

        row holds the task row's values, its body and queue among them;
        calls_per_message is how many calls the message it goes in may
        carry."""
        self.entries.append((row, handle, delay, calls_per_message))
        if row.get('unique_key'):
            self.keys[row['unique_key']] = handle

    def unique_handle(self, key):
        "Return the handle of the call of that unique key put, or None."
        return self.keys.get(key)

    def tpc_vote(self, trans):
        if self.entries and not trans.readonly:
            Task = Pool().get('async_sqs.task')
            held = Task.insert_pending([row for row, *_ in self.entries])
            # the calls whose key an identical call holds are not sent
            self.entries = unique.settle(self.entries, held)

    def tpc_finish(self, trans):
        if trans.readonly:
            self._after_readonly(trans)
        else:
            entries, self.entries, self.keys = self.entries, [], {}
            if entries and not settings.eager():
                # once the connection is back in the pool: marking the rows
                # queued takes one, and commits waiting for a shared send
                # must not hold every connection of the pool meanwhile
                trans.atexit(dispatch, trans.database.name, entries)
            else:
                dispatch(trans.database.name, entries)

    def tpc_abort(self, trans):
        # trytond ends every read-only transaction with a rollback, even one
        # whose work succeeded: there the calls go, unless an exception is
        # being handled, which is how an error ends such a transaction.
        if trans.readonly and sys.exc_info()[1] is None:
            self._after_readonly(trans)
        else:
            self._drop()

    def _drop(self):
        for _, handle, *_ in self.entries:
            handle._set_state('dropped')
        self.entries.clear()
        self.keys.clear()

    def _after_readonly(self, trans):
        # a read-only transaction cannot write the rows: a transaction of
        # their own does, once this one has let go of its connection
        entries, self.entries, self.keys = self.entries, [], {}
        if entries:
            trans.atexit(
                write_and_send, trans.database.name, trans.user, entries)


def write_and_send(database_name, user, entries):
    "Write the pending rows in a transaction of their own, then send."
    try:
        with Transaction(new=True).start(database_name, user):
            Task = Pool().get('async_sqs.task')
            held = Task.insert_pending([row for row, *_ in entries])
    except Exception:
        logger.critical("%s deferred call(s) of a read-only transaction "
            "could not be recorded", len(entries), exc_info=True)
        for _, handle, *_ in entries:
            handle._set_state('dropped')
        raise
    dispatch(database_name, unique.settle(entries, held))


def dispatch(database_name, entries):
    "Send the calls of committed rows, or run them here in eager mode."
    # a call that waits for others is deferred by the last of them done
    waiting = [e for e in entries if e[0].get('state') == 'waiting']
    if waiting:
        for _, handle, *_ in waiting:
            handle._set_state('waiting')
        entries = [e for e in entries if e[0].get('state') != 'waiting']
    if settings.eager():
        from . import eager
        eager.run(database_name, entries)
    elif entries:
        _sender.send(database_name, entries)


class _Round:
    "The calls of one committed transaction, waiting for a round."

    def __init__(self, database_name, entries):
        self.database_name = database_name
        self.entries = entries
        self.event = threading.Event()
        self.sent = False


class Sender:
    """Send the calls that transactions of this process commit at the same
    moment in shared SendMessageBatch calls.

    The first commit sends at once; those that commit while it sends
    wait, and the first of them sends all of theirs in the next round:
    a lone commit waits for nobody, and many requests at once share
    batches of ten and the statement that marks them queued. Each returns
    once its calls went (or were left pending for the relay, as before)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = []
        self._sending = False

    def send(self, database_name, entries):
        "Send the entries of a committed transaction, with any others."
        waiter = _Round(database_name, entries)
        with self._lock:
            self._waiting.append(waiter)
            lead, self._sending = not self._sending, True
        if not lead:
            waiter.event.wait()
            if waiter.sent:
                return
            # the last round handed the next one over to this commit
        self._round()

    def _round(self):
        with self._lock:
            waiters, self._waiting = self._waiting, []
        try:
            by_database = defaultdict(list)
            for waiter in waiters:
                by_database[waiter.database_name].extend(waiter.entries)
            if len(waiters) > 1:
                logger.debug("%i commits share a round of %i call(s)",
                    len(waiters), sum(map(len, by_database.values())))
            for database_name, entries in by_database.items():
                send(database_name, entries)
        finally:
            for waiter in waiters:
                waiter.sent = True
                waiter.event.set()
            with self._lock:
                if self._waiting:
                    self._waiting[0].event.set()
                else:
                    self._sending = False


_sender = Sender()


def send(database_name, entries):
    """Send the messages of committed rows in as few SendMessageBatch calls
    as SQS allows, and mark their rows queued, one statement per batch.

    A failure is logged, not raised: the rows stay pending for the relay."""
    if not entries:
        return
    transport = sqs.client()
    by_queue = defaultdict(list)
    for entry in entries:
        by_queue[entry[0]['queue']].append(entry)
    sent = []
    for queue_name, items in by_queue.items():
        try:
            url = transport.url(queue_name)
            messages, message_entries = {}, []
            # a call of a FIFO queue goes alone, to keep its place when it
            # is retried
            fifo = sqs.is_fifo(queue_name)
            for i, members in enumerate(
                    [[item] for item in items] if fifo else pack(items)):
                row, _, delay, _ = members[0]
                if len(members) == 1:
                    entry = payload.call_entry(str(i), row['body'], delay,
                        database_name, row['uuid'], row.get('tenant'))
                else:
                    entry = message_entry(str(i), pack_bodies(
                            [row['body'] for row, *_ in members]),
                        group=row.get('tenant'))
                if fifo:
                    # a second send of the same commit is dropped by SQS
                    entry['MessageDeduplicationId'] = row['uuid']
                message_entries.append(entry)
                messages[str(i)] = members
            for batch in sqs.batches(message_entries):
                transport.send_batch(url, batch)
                uuids = []
                for entry in batch:
                    for row, handle, *_ in messages[entry['Id']]:
                        handle._set_state('sent')
                        uuids.append(row['uuid'])
                sent.append(uuids)
        except Exception:
            logger.critical(
                "deferred calls to %s could not be sent, "
                "the relay will send them", queue_name, exc_info=True)
            for _, handle, *_ in items:
                if handle.state == 'pending':
                    handle._set_state('unsent')
    if sent:
        mark_queued(database_name, sent)


def pack(items):
    """Return the items of one queue grouped into the messages they go in.

    items are (row, handle, delay, calls_per_message). A call goes with
    others of its tenant when it allows it, is not delayed and stays in
    SQS, as long as the message stays within what every call in it allows
    and within MAX_PACKED_SIZE (and large_message_threshold with an S3
    bucket)."""
    messages, members, limit, size = [], [], 0, 2
    packed_limit = payload.packed_limit()
    for item in items:
        row, _, delay, calls_per_message = item
        if calls_per_message <= 1 or delay or payload.is_large(row['body']):
            messages.append([item])
            continue
        body_size = len(row['body'].encode('utf-8')) + 1
        limit = min(limit, calls_per_message) if members else (
            calls_per_message)
        if members and (len(members) >= limit
                or size + body_size > packed_limit
                or row.get('tenant') != members[0][0].get('tenant')):
            messages.append(members)
            members, limit, size = [], calls_per_message, 2
        members.append(item)
        size += body_size
    if members:
        messages.append(members)
    return messages
