# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The async_sqs.task model: one row per deferred call.

The deferring transaction writes the rows (state pending) with one
multi-row insert just before it commits; the worker claims a row in the
transaction that runs the call and marks it done in that same transaction,
so that a call's effects happen once however often SQS delivers it."""
import datetime as dt

from trytond.model import Index, ModelSQL, ModelView, Unique, fields
from trytond.tools import grouped_slice
from trytond.transaction import Transaction

STATES = [
    ('pending', "Pending"),
    ('queued', "Queued"),
    ('running', "Running"),
    ('done', "Done"),
    ('failed', "Failed"),
    ('cancelled', "Cancelled"),
    ]
#: States from which a delivered message still runs.
RUNNABLE = ('pending', 'queued', 'running')
#: Rows of one INSERT: SQLite takes at most 500 rows in one VALUES.
INSERT_ROWS = 500


class Task(ModelSQL, ModelView):
    __name__ = 'async_sqs.task'
    __string__ = "Deferred Task"

    uuid = fields.Char("UUID", required=True, readonly=True)
    queue = fields.Char("Queue", readonly=True)
    model = fields.Char("Model", readonly=True)
    method = fields.Char("Method", readonly=True)
    records = fields.Char("Records", readonly=True)
    user = fields.Many2One(
        'res.user', "User", readonly=True, ondelete='SET NULL')
    state = fields.Selection(STATES, "State", required=True, readonly=True)
    attempts = fields.Integer("Attempts", readonly=True)
    enqueued_at = fields.Timestamp("Enqueued At", readonly=True)
    eta = fields.Timestamp("Due At", readonly=True)
    started_at = fields.Timestamp("Started At", readonly=True)
    finished_at = fields.Timestamp("Finished At", readonly=True)
    duration = fields.TimeDelta("Duration", readonly=True)
    error = fields.Text("Error", readonly=True)
    traceback = fields.Text("Traceback", readonly=True)
    worker = fields.Char("Worker", readonly=True,
        help="The host and process that ran the call.")
    body = fields.Text("Message", readonly=True,
        help="The message as sent, kept to send it again.")

    @classmethod
    def __setup__(cls):
        super().__setup__()
        t = cls.__table__()
        cls._sql_constraints = [
            ('uuid_unique', Unique(t, t.uuid),
                'async_sqs.msg_task_uuid_unique'),
            ]
        cls._sql_indexes.update({
                Index(t, (t.state, Index.Equality()),
                    (t.enqueued_at, Index.Range())),
                })
        cls._order = [('enqueued_at', 'DESC'), ('id', 'DESC')]

    @classmethod
    def default_state(cls):
        return 'pending'

    @classmethod
    def default_attempts(cls):
        return 0

    def get_rec_name(self, name):
        return '%s.%s %s' % (self.model, self.method, self.uuid)

    @classmethod
    def insert_pending(cls, rows):
        """Write one pending row per call with multi-row inserts.

        rows are dicts with uuid, queue, model, method, records, user, eta
        and body."""
        transaction = Transaction()
        cursor = transaction.connection.cursor()
        table = cls.__table__()
        now = dt.datetime.now()
        columns = [table.uuid, table.queue, table.model, table.method,
            table.records, table.user, table.eta, table.body, table.state,
            table.attempts, table.enqueued_at, table.create_uid,
            table.create_date]
        for sub_rows in grouped_slice(rows, INSERT_ROWS):
            cursor.execute(*table.insert(columns, [[
                            r['uuid'], r['queue'], r['model'], r['method'],
                            r['records'], r['user'], r['eta'], r['body'],
                            'pending', 0, now, transaction.user, now]
                        for r in sub_rows]))

    @classmethod
    def mark_queued(cls, uuids):
        "Mark the pending rows of the uuids as queued."
        from trytond import backend
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        now = dt.datetime.now()
        for sub_uuids in grouped_slice(
                uuids, backend.MAX_QUERY_PARAMS):
            cursor.execute(*table.update(
                    [table.state, table.write_date], ['queued', now],
                    where=table.uuid.in_(list(sub_uuids))
                    & (table.state == 'pending')))

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
            query.for_ = _for_update()
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
        # delivery back before it runs the call
        cursor.execute(*table.update(
                [table.state, table.attempts, table.started_at,
                    table.worker, table.error, table.traceback],
                ['running', attempt, dt.datetime.now(), worker, None, None],
                where=table.id == id_))
        return state, attempt

    @classmethod
    def finish(cls, uuid, state, started_at=None, error=None,
            traceback=None, attempts=None, worker=None):
        "Record the end of an attempt: done, failed, or queued to retry."
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        now = dt.datetime.now()
        columns = [table.state, table.finished_at, table.error,
            table.traceback, table.write_date]
        values = [state, now, error, traceback, now]
        if started_at is not None:
            columns += [table.started_at, table.duration]
            values += [started_at, now - started_at]
        if attempts is not None:
            columns.append(table.attempts)
            values.append(attempts)
        if worker is not None:
            columns.append(table.worker)
            values.append(worker)
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


def task_queues(database_name):
    """Return the names of the task queues of the database: the configured
    queue, then every queue a decorated method names.

    The pool of the database must be initialised."""
    from trytond.pool import Pool

    from . import settings
    names = [settings.queue()]
    pool = Pool(database_name)
    for type_ in ('model', 'wizard', 'report'):
        for _, cls in pool.iterobject(type=type_):
            for options in getattr(cls, '__async_tasks__', {}).values():
                if options.queue and options.queue not in names:
                    names.append(options.queue)
    return names


def _for_update():
    from sql import For
    return For('UPDATE')
