# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The async_sqs.task model: one row per deferred call.

The deferring transaction writes the rows (state pending) with one
multi-row insert just before it commits; the worker claims a row in the
transaction that runs the call and marks it done in that same transaction,
so that a call's effects happen once however often SQS delivers it."""
import datetime as dt
import logging

from sql.operators import Equal

from trytond.i18n import gettext
from trytond.model import (
    Exclude, Index, ModelSQL, ModelStorage, ModelView, Unique, fields)
from trytond.pool import Pool
from trytond.pyson import Eval
from trytond.tools import grouped_slice
from trytond.transaction import Transaction

from . import links, payload, settings, sqs, unique
from .exceptions import TaskStateError
from .message import CANCELLED, encode_reply
from .rows import reply_target, wants_reply
from .stopping import request_stop
from .storage import TaskStorage, for_update

logger = logging.getLogger(__name__)

STATES = [
    ('waiting', "Waiting"),
    ('pending', "Pending"),
    ('queued', "Queued"),
    ('running', "Running"),
    ('done', "Done"),
    ('failed', "Failed"),
    ('cancelled', "Cancelled"),
    ]
#: States a task can be retried from.
RETRYABLE = ('failed', 'cancelled')
#: States a task can be cancelled from: it has not started.
CANCELLABLE = ('waiting', 'pending', 'queued')
#: States of the rows the cron deletes once old enough.
FINISHED = ('done', 'failed', 'cancelled')
#: Rows one DELETE of the cleaning removes at most.
CLEAN_SLICE = 1000


class Task(TaskStorage, ModelSQL, ModelView):
    __name__ = 'async_sqs.task'
    __string__ = "Deferred Task"

    uuid = fields.Char("UUID", required=True, readonly=True)
    queue = fields.Char("Queue", readonly=True)
    tenant = fields.Char("Tenant", readonly=True,
        help="The group SQS's fair queues share the workers between.")
    model = fields.Char("Model", readonly=True)
    method = fields.Char("Method", readonly=True)
    records = fields.Char("Records", readonly=True,
        help="The records the call names: the model, then their ids.")
    record = fields.Function(fields.Reference("Record",
            selection='get_record_models',
            help="The first record the call names."),
        'get_record')
    user = fields.Many2One(
        'res.user', "User", readonly=True, ondelete='SET NULL')
    state = fields.Selection(STATES, "State", required=True, readonly=True)
    attempts = fields.Integer("Attempts", readonly=True)
    enqueued_at = fields.Timestamp("Enqueued At", readonly=True)
    eta = fields.Timestamp("Due At", readonly=True)
    started_at = fields.Timestamp("Started At", readonly=True)
    finished_at = fields.Timestamp("Finished At", readonly=True)
    duration = fields.TimeDelta("Duration", readonly=True)
    error_type = fields.Char("Error Type", readonly=True,
        help="The class of the exception that failed the call.")
    error = fields.Text("Error", readonly=True)
    error_description = fields.Text("Error Description", readonly=True,
        help="The description of the user error that failed the call.")
    traceback = fields.Text("Traceback", readonly=True)
    result = fields.Text("Result", readonly=True,
        help="The reply sent to the caller, kept for those who read it "
        "later: empty for a call that returns no result.")
    worker = fields.Char("Worker", readonly=True,
        help="The host and process that ran the call.")
    body = fields.Text("Message", readonly=True,
        help="The message as sent, kept to send it again.")
    unique_key = fields.Char("Unique Key", readonly=True,
        help="The SHA-256 of the key of a unique call, until it starts: "
        "no other call of that key may be pending or queued.")
    then = fields.Text("Then", readonly=True,
        help="The calls that wait for this one, deferred once it is done.")
    waiting_for = fields.Integer("Waiting For", readonly=True,
        help="How many calls this one still waits for, until it is due.")
    gathered = fields.Text("Gathered", readonly=True,
        help="The results of the calls it waited for, so far.")

    @classmethod
    def __setup__(cls):
        super().__setup__()
        t = cls.__table__()
        cls._sql_constraints = [
            ('uuid_unique', Unique(t, t.uuid),
                'async_sqs.msg_task_uuid_unique'),
            # one pending call per key: a partial unique index
            ('unique_key_holding',
                Exclude(t, (t.unique_key, Equal), where=unique.Holding()),
                'async_sqs.msg_task_unique_key_holding'),
            ]
        cls._sql_indexes.update({
                Index(t, (t.state, Index.Equality()),
                    (t.enqueued_at, Index.Range())),
                # the statistics read the calls of a period
                Index(t, (t.enqueued_at, Index.Range())),
                # the cleaning deletes the calls finished before a time
                Index(t, (t.finished_at, Index.Range()),
                    where=t.state.in_(list(FINISHED))),
                })
        cls._order = [('enqueued_at', 'DESC'), ('id', 'DESC')]
        cls._buttons.update({
                'retry': {
                    'invisible': ~Eval('state').in_(list(RETRYABLE)),
                    'depends': ['state'],
                    'icon': 'tryton-refresh',
                    },
                'cancel': {
                    'invisible': ~Eval('state').in_(list(CANCELLABLE)),
                    'depends': ['state'],
                    'icon': 'tryton-cancel',
                    },
                })

    @classmethod
    def default_state(cls):
        return 'pending'

    @classmethod
    def default_attempts(cls):
        return 0

    def get_rec_name(self, name):
        return '%s.%s %s' % (self.model, self.method, self.uuid)

    @classmethod
    def get_record_models(cls):
        pool = Pool()
        Model = pool.get('ir.model')
        return [(None, '')] + Model.get_name_items((ModelStorage, ModelView))

    def get_record(self, name):
        "Return the first record of records, as model,id."
        pool = Pool()
        # records is written as model,id[,id...][,...]
        model, _, ids = (self.records or '').partition(',')
        first = ids.split(',', 1)[0]
        if not first.isdigit():
            return None
        try:
            pool.get(model)
        except KeyError:
            return None
        return '%s,%s' % (model, first)

    @classmethod
    def _lock_rows(cls, tasks, states, message, running=False):
        """Return (id, uuid, queue, body) of the rows of tasks, locked, or
        raise TaskStateError if one is not in one of the states.

        With running, rows locked by a worker that runs their call are
        skipped, not waited for: they are returned apart, as their uuids."""
        from trytond import backend
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        rows, busy = [], []
        for sub_ids in grouped_slice(
                [t.id for t in tasks], backend.MAX_QUERY_PARAMS):
            sub_ids = list(sub_ids)
            query = table.select(table.id, table.uuid, table.queue,
                table.body, table.state, table.model, table.method,
                where=table.id.in_(sub_ids))
            if backend.name == 'postgresql':
                # a worker that runs the call holds this lock until it ends
                query.for_ = for_update(skip_locked=running)
            cursor.execute(*query)
            locked = cursor.fetchall()
            if running and len(locked) < len(sub_ids):
                done = {r[0] for r in locked}
                cursor.execute(*table.select(table.id, table.uuid,
                        table.queue, table.body, table.state, table.model,
                        table.method,
                        where=table.id.in_(
                            [i for i in sub_ids if i not in done])))
                busy.extend(cls._check_states(
                        cursor.fetchall(), states, message))
            rows.extend(cls._check_states(locked, states, message))
        if running:
            return rows, [r[1] for r in busy]
        return rows

    @classmethod
    def _check_states(cls, rows, states, message):
        selection = dict(STATES)
        for id_, uuid, queue, body, state, model, method in rows:
            if state not in states:
                raise TaskStateError(gettext(message,
                        task='%s.%s %s' % (model, method, uuid),
                        state=selection.get(state, state)))
            yield id_, uuid, queue, body

    @classmethod
    @ModelView.button
    def retry(cls, tasks):
        """Run the failed or cancelled tasks again, each as a new call.

        The row is pending until the stored signed message has been sent
        again, alone even if the call was packed, after the transaction
        commits; then it is queued. Its error stays until the next attempt
        ends. Its attempts count from zero again: the retried call has its
        whole retry budget, as a fresh call. Its enqueued_at becomes the
        time of the retry, so that the relay sends it only if the send
        fails. A reply of the previous attempt left in the reply queue is
        deleted before the message goes: a waiter that waits after the
        retry gets the new outcome."""
        from trytond import backend

        from .followup import Followup
        transaction = Transaction()
        cursor = transaction.connection.cursor()
        table = cls.__table__()
        rows = cls._lock_rows(
            tasks, RETRYABLE, 'async_sqs.msg_task_retry_state')
        unique.check_retry([r[0] for r in rows])
        links.reopen([r[1] for r in rows])
        now = dt.datetime.now()
        followup = Followup.of(transaction)
        for sub_rows in grouped_slice(rows, backend.MAX_QUERY_PARAMS):
            sub_rows = list(sub_rows)
            cursor.execute(*table.update(
                    [table.state, table.attempts, table.enqueued_at,
                        table.write_date, table.write_uid],
                    ['pending', 0, now, now, transaction.user],
                    where=table.id.in_([r[0] for r in sub_rows])))
            for _, uuid, queue, body in sub_rows:
                followup.resend(uuid, queue, body, wants_reply(body))
        for _, uuid, _, _ in rows:
            logger.info("task %s retried", uuid)

    @classmethod
    @ModelView.button
    def cancel(cls, tasks):
        """Cancel the pending or queued tasks: their calls will not run.

        A worker that receives the message of a cancelled task deletes it
        without running the call. A call that wants a result gets, once the
        transaction commits, a reply that makes wait() raise TaskCancelled.

        On PostgreSQL a call that runs is asked to stop once the transaction
        commits: its worker raises TaskCancelled inside it, rolls it back
        and marks its row cancelled. One that ends before the request
        reaches it stays done."""
        from trytond import backend

        from .followup import Followup
        transaction = Transaction()
        cursor = transaction.connection.cursor()
        table = cls.__table__()
        rows, running = cls._lock_rows(tasks, CANCELLABLE,
            'async_sqs.msg_task_cancel_state', running=True)
        request_stop(running)
        now = dt.datetime.now()
        followup = Followup.of(transaction)
        for sub_rows in grouped_slice(rows, backend.MAX_QUERY_PARAMS):
            sub_rows = list(sub_rows)
            # the row holds the outcome for those who read it later
            cursor.execute(*table.update(
                    [table.state, table.finished_at, table.error_type,
                        table.error, table.error_description,
                        table.traceback, table.result, table.write_date,
                        table.write_uid],
                    ['cancelled', now, CANCELLED, "the task was cancelled",
                        None, None, None, now, transaction.user],
                    where=table.id.in_([r[0] for r in sub_rows])))
            for _, uuid, _, body in sub_rows:
                wants, reply_to = reply_target(body)
                if wants:
                    followup.reply(uuid, encode_reply(uuid, error={
                                'type': CANCELLED,
                                'message': "task %s was cancelled" % uuid,
                                }), reply_to=reply_to)
        links.abandon([r[1] for r in rows], 'cancelled', {
                'type': CANCELLED, 'message': "the task was cancelled"})
        for _, uuid, _, _ in rows:
            logger.info("task %s cancelled", uuid)

    @classmethod
    def clean(cls, days=None):
        """Delete the rows done, failed or cancelled that finished more than
        days ago ([async_sqs] clean_days by default; 0 keeps them), then
        sweep the reply queues older than reply_ttl, and the objects of S3
        older than that which no message needs.

        The rows go in slices: each DELETE removes at most CLEAN_SLICE rows
        picked by a sub-select, so no one statement runs long, and on
        PostgreSQL a DELETE locks only the rows it removes, never the table:
        callers inserting rows and workers finishing others do not wait for
        the cleaning. The slices share the cron's one transaction, so the
        rows removed stay locked until it commits; nobody else writes rows
        that finished so long ago. Return the number of rows deleted."""
        if days is None:
            days = settings.clean_days()
        deleted = 0
        if days:
            deleted = cls._delete_finished(
                dt.datetime.now() - dt.timedelta(days=days))
            if deleted:
                logger.info("deleted %s finished task(s)", deleted)
        try:
            sqs.sweep_reply_queues()
        except Exception:
            # the rows deleted stay deleted: the next run sweeps again
            logger.error("reply queues could not be swept", exc_info=True)
        try:
            payload.sweep(Transaction().database.name)
        except Exception:
            logger.error("S3 objects could not be swept", exc_info=True)
        return deleted

    @classmethod
    def _delete_finished(cls, before):
        cursor = Transaction().connection.cursor()
        table = cls.__table__()
        selected = table.select(table.id,
            where=table.state.in_(list(FINISHED))
            & (table.finished_at < before),
            limit=CLEAN_SLICE)
        deleted = 0
        while True:
            cursor.execute(*table.delete(where=table.id.in_(selected)))
            count = cursor.rowcount
            deleted += max(count, 0)
            if count < CLEAN_SLICE:
                return deleted
