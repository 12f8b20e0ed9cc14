# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The statements the outbox, the worker and the relay run on the task
table: many rows at a time, by UUID, without the per-record work of the
ORM."""
import datetime as dt
import functools

from sql import Conflict, For, Null

from trytond.tools import grouped_slice
from trytond.transaction import Transaction

from . import unique

#: States from which a delivered message still runs.
RUNNABLE = ('pending', 'queued', 'running')
#: States of a row whose message was sent and whose call has not ended.
UNSETTLED = ('queued', 'running')
#: Rows of one INSERT: SQLite takes at most 500 rows in one VALUES.
INSERT_ROWS = 500


class TaskStorage:
    "The statements of the async_sqs.task model that work by UUID."
    __slots__ = ()

    @classmethod
    def insert_pending(cls, rows):
        """Write one pending row per call with multi-row inserts.

        rows are dicts with uuid, queue, model, method, records, user, eta,
        body and, if they have one, tenant, unique_key, then, and the state
        waiting with waiting_for for a call that waits for others. Return
        {uuid: uuid of the holder} of the unique calls not written: an
        identical call pending or queued holds their key."""
        for sub_rows in grouped_slice(
                [r for r in rows if not r.get('unique_key')], INSERT_ROWS):
            cls._insert_rows(list(sub_rows))
        return unique.insert([r for r in rows if r.get('unique_key')],
            functools.partial(cls._insert_rows, skip_held=True), INSERT_ROWS)

    @classmethod
    def _insert_rows(cls, rows, skip_held=False):
        """Insert the rows; with skip_held, skip those whose key is held.
        Return the count inserted."""
        transaction = Transaction()
        cursor = transaction.connection.cursor()
        table = cls.__table__()
        now = dt.datetime.now()
        columns = [table.uuid, table.queue, table.model, table.method,
            table.records, table.user, table.eta, table.body, table.tenant,
            table.unique_key, table.then, table.waiting_for, table.state,
            table.attempts, table.enqueued_at, table.create_uid,
            table.create_date]
        cursor.execute(*table.insert(columns, [[
                        r['uuid'], r['queue'], r['model'], r['method'],
                        r['records'], r['user'], r['eta'], r['body'],
                        r.get('tenant'), r.get('unique_key'), r.get('then'),
                        r.get('waiting_for'), r.get('state', 'pending'), 0,
                        now, transaction.user, now]
                    for r in rows],
                on_conflict=Conflict(table) if skip_held else None))
        return cursor.rowcount

    @classmethod
    def mark_queued(cls, uuids):
        "Mark the pending rows of the uuids as queued."
        cls._write_rows(uuids, ('pending',), state='queued')

    @classmethod
    def touch(cls, uuids):
        "Note that the messages of the unsettled rows of uuids were sent."
        cls._write_rows(uuids, UNSETTLED)

    @classmethod
    def _write_rows(cls, uuids, states, **values):
        "Write values and the time on the rows of uuids in one of states."
        from trytond import backend
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        columns = [getattr(table, c) for c in values] + [table.write_date]
        values = list(values.values()) + [dt.datetime.now()]
        for sub_uuids in grouped_slice(
                uuids, backend.MAX_QUERY_PARAMS):
            cursor.execute(*table.update(columns, values,
                    where=table.uuid.in_(list(sub_uuids))
                    & table.state.in_(list(states))))

    @classmethod
    def claim(cls, uuid, attempt, worker):
        """Lock the row of the call: FOR UPDATE on PostgreSQL, by marking it
        running on SQLite.

        Return (state, attempt): the state the row had, and the number of
        this attempt, or None for the attempt when the call must not run
        (done, failed or cancelled already: a redelivery). The state is None
        when there is no row at all."""
        from trytond import backend
        transaction = Transaction()
        cursor = transaction.connection.cursor()
        table = cls.__table__()
        query = table.select(table.id, table.state, table.attempts,
            where=table.uuid == uuid)
        if backend.name == 'postgresql':
            # at-least-once delivery: a second delivery waits here for the
            # first to end, then fails to serialise and is retried
            query.for_ = for_update()
        cursor.execute(*query)
        row = cursor.fetchone()
        if row is None:
            return None, None
        id_, state, attempts = row
        if state not in RUNNABLE:
            return state, None
        # a worker killed mid-call counted nothing: SQS counted receives
        attempt = max((attempts or 0) + 1, attempt)
        if backend.name == 'postgresql':
            # the row lock holds a second delivery back; finish writes the
            # attempt, which no one sees before the commit anyway
            return state, attempt
        # SQLite has no row lock: the write lock taken here holds a second
        # delivery back before it runs the call. The state read above may
        # be stale by now (the read took no lock): the update checks it
        # again, and a delivery that changed nothing does not run.
        cursor.execute(*table.update(
                [table.state, table.attempts, table.started_at,
                    table.worker, table.error, table.traceback,
                    table.error_type, table.error_description],
                ['running', attempt, dt.datetime.now(), worker, None, None,
                    None, None],
                where=(table.id == id_) & table.state.in_(RUNNABLE)))
        if cursor.rowcount != 1:
            cursor.execute(*table.select(table.state,
                    where=table.id == id_))
            row = cursor.fetchone()
            return (row[0] if row else None), None
        return state, attempt

    @classmethod
    def finish(cls, uuid, state, started_at=None, error=None,
            traceback=None, attempts=None, worker=None, eta=None,
            error_type=None, error_description=None, result=None):
        """Record the end of an attempt: done, failed, or queued to retry
        (at eta).

        result is the reply body of a call that wants its result; the error
        columns describe the exception that ended the attempt. Each is
        written, empty when not given: a retried row keeps nothing of the
        attempt before."""
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        now = dt.datetime.now()
        columns = [table.state, table.finished_at, table.error,
            table.traceback, table.error_type, table.error_description,
            table.result, table.write_date]
        values = [state, now, error, traceback, error_type,
            error_description, result, now]
        if started_at is not None:
            columns += [table.started_at, table.duration]
            values += [started_at, now - started_at]
        if attempts is not None:
            columns.append(table.attempts)
            values.append(attempts)
        if worker is not None:
            columns.append(table.worker)
            values.append(worker)
        if eta is not None:
            columns.append(table.eta)
            values.append(eta)
        cursor.execute(*table.update(
                columns, values, where=table.uuid == uuid))

    @classmethod
    def pending_since(cls, before, limit=1000):
        "Return (uuid, queue, body, eta) of rows left pending since before."
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        cursor.execute(*table.select(
                table.uuid, table.queue, table.body, table.eta,
                where=(table.state == 'pending')
                & (table.enqueued_at < before),
                order_by=[table.enqueued_at.asc], limit=limit))
        return cursor.fetchall()

    @classmethod
    def stale_since(cls, before, limit=1000):
        """Return (uuid, queue, body, eta) of rows left queued or running,
        unchanged and not due since before: their message may be lost."""
        from sql.conditionals import Coalesce
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        changed = Coalesce(table.write_date, table.enqueued_at)
        cursor.execute(*table.select(
                table.uuid, table.queue, table.body, table.eta,
                where=table.state.in_(UNSETTLED)
                & (changed < before)
                & ((table.eta == Null) | (table.eta < before)),
                order_by=[changed.asc], limit=limit))
        return cursor.fetchall()


def for_update(skip_locked=False):
    "Return FOR UPDATE, with SKIP LOCKED if asked."
    class ForUpdate(For):
        __slots__ = ()

        def __str__(self):
            return super().__str__() + (' SKIP LOCKED' if skip_locked else '')
    return ForUpdate('UPDATE')
