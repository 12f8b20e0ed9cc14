# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The task rows, read and written from outside the task model: by callers
after their commit, by waiters, by the relay and the admin command."""
import logging

from trytond.pool import Pool
from trytond.tools import grouped_slice
from trytond.transaction import Transaction

from . import links, settings
from .exceptions import MessageError
from .message import CANCELLED, decode_call

logger = logging.getLogger(__name__)


#: Columns of a row that say how its call stands and how it ended.
OUTCOME_COLUMNS = ('uuid', 'model', 'method', 'user', 'state', 'attempts',
    'enqueued_at', 'started_at', 'finished_at', 'result', 'error_type',
    'error', 'error_description', 'traceback')


def read_rows(database_name, uuids, columns=OUTCOME_COLUMNS):
    """Return {uuid: {column: value}} of the rows of the uuids that exist.

    Read in a read-only transaction of its own, so that the caller may be
    inside a transaction of another database, or one whose snapshot is
    older than the row (PostgreSQL's repeatable read); with SQL only, so
    that a process which never initialised the pool of the database can
    read them."""
    from sql import Column, Table

    from trytond import backend

    # the table of async_sqs.task, as ModelSQL names it
    table = Table('async_sqs_task')
    rows = {}
    with Transaction(new=True).start(
            database_name, 0, readonly=True) as transaction:
        cursor = transaction.connection.cursor()
        for sub_uuids in grouped_slice(uuids, backend.MAX_QUERY_PARAMS):
            cursor.execute(*table.select(
                    *(Column(table, c) for c in columns),
                    where=table.uuid.in_(list(sub_uuids))))
            for values in cursor:
                row = dict(zip(columns, values))
                rows[row['uuid']] = row
    return rows


def task_queues(database_name):
    """Return the names of the task queues of the database: the configured
    queue, then every queue a decorated method names.

    The pool of the database must be initialised."""
    names = [settings.queue()]
    pool = Pool(database_name)
    for type_ in ('model', 'wizard', 'report'):
        for _, cls in pool.iterobject(type=type_):
            for options in getattr(cls, '__async_tasks__', {}).values():
                if options.queue and options.queue not in names:
                    names.append(options.queue)
    return names


def wants_reply(body):
    "Tell whether the call of a stored body sends a reply."
    return reply_target(body)[0]


def reply_target(body):
    """Return whether the call of a stored body sends a reply, and the queue
    it names for it (None for the reply queue of the call)."""
    try:
        call = decode_call(body)
    except MessageError:
        # unreadable: a waiter, if any, should not read an old reply
        return True, None
    return call.reply, call.reply_to


def mark_queued(database_name, batches, touch=False):
    """Mark the rows of each batch of uuids queued; with touch, note that
    the rows already queued or running were sent again.

    A worker may have claimed a row meanwhile: on PostgreSQL the update then
    fails to serialise, and once again it finds the row no longer pending.
    That is the normal case of a quick worker, not a fault: a row left
    pending is done by then, or sent again by the relay and skipped."""
    from trytond import backend, config
    retries = config.getint('database', 'retry')
    for attempt in range(retries + 1):
        try:
            with Transaction(new=True).start(database_name, 0):
                Task = Pool().get('async_sqs.task')
                for uuids in batches:
                    Task.mark_queued(uuids)
                    if touch:
                        Task.touch(uuids)
            return
        except backend.DatabaseOperationalError:
            if attempt < retries:
                continue
            logger.debug("sent calls could not be marked queued",
                exc_info=True)
        except Exception:
            # harmless: the relay sends them again and the worker runs one
            logger.error("sent calls could not be marked queued",
                exc_info=True)
            return


def end_past_time_limit(database_name, task_id, limit, attempt, final):
    """Record on the row of a call whose process was ended at its time
    limit that it failed: for good if final, else to run again when its
    message comes back."""
    error = "time limit of %s s exceeded" % limit
    state = 'failed' if final else 'queued'
    _end_ended(database_name, task_id, state, attempt, 'TaskTimeLimit',
        error)
    logger.warning("<Task %s@%s> %s after %s", task_id, database_name,
        'failed' if final else 'to run again', error)


def end_cancelled(database_name, task_id, attempt):
    """Record on the row of a call whose process was ended because it did
    not stop once cancelled that it is cancelled."""
    _end_ended(database_name, task_id, 'cancelled', attempt, CANCELLED,
        "the task was cancelled")
    logger.warning("<Task %s@%s> cancelled: its process was ended",
        task_id, database_name)


def _end_ended(database_name, task_id, state, attempt, error_type, error):
    "Write the end of a call whose process was ended on its unsettled row."
    import datetime as dt

    from sql import Table
    table = Table('async_sqs_task')
    now = dt.datetime.now()
    with Transaction(new=True).start(database_name, 0) as transaction:
        cursor = transaction.connection.cursor()
        cursor.execute(*table.update(
                [table.state, table.finished_at, table.attempts,
                    table.error_type, table.error, table.traceback,
                    table.write_date],
                [state, now, attempt, error_type, error, None, now],
                where=(table.uuid == task_id)
                & table.state.in_(['pending', 'queued', 'running'])))
        if state in links.ENDS:
            links.abandon([task_id], state,
                {'type': error_type, 'message': error})
