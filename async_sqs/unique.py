# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""One pending call per key: async_task(unique=...).

A unique call's row holds the SHA-256 of its key until a worker starts it.
The task table has a partial unique index on that column where the state is
pending or queued: the database keeps one such call per key, whatever the
transactions that defer at once. A defer finds the call that holds the key
and returns its handle; the commit decides, with an insert that skips the
rows whose key is held, which calls were made and which joined another."""
import hashlib
import logging

from sql import Expression, Null, Table

from trytond import backend, config
from trytond.i18n import gettext
from trytond.pool import Pool
from trytond.tools import grouped_slice
from trytond.transaction import Transaction

from .exceptions import TaskStateError
from .message import canonical

logger = logging.getLogger(__name__)

#: States in which a call holds its key.
HOLDING = ('pending', 'queued')
#: Inserts tried at commit before giving up on calls that neither went in
#: nor found the call that holds their key (each holder started meanwhile).
INSERT_ATTEMPTS = 5
#: SQLSTATE class of PostgreSQL's serialization failures and deadlocks.
TRANSACTION_ROLLBACK = '40'


class Holding(Expression):
    """The states in which a call holds its key, as SQL without parameters:
    SQLite creates no index whose definition has any."""
    __slots__ = ()

    def __str__(self):
        return '("state" IN (%s))' % ', '.join("'%s'" % s for s in HOLDING)

    @property
    def params(self):
        return ()


def check_option(unique):
    "Raise ValueError unless unique is a bool or a callable."
    if not (isinstance(unique, bool) or callable(unique)):
        raise ValueError(
            "async_task unique must be True, False or a callable, not %r"
            % (unique,))


def call_key(options, call, records):
    """Return the key of a call as 64 hex digits, or None if it has none.

    With unique=True the key is the model, method, instance, arguments,
    user and context of the call: the call runs as that user with that
    context, so calls that differ there may do different things. A callable
    is given the records of the call, its positional arguments and its
    keyword arguments, and returns a string, or None for a call that may
    be deferred however many identical ones are pending; that key is the
    method's own, two methods never share one."""
    unique = options.unique
    if not unique:
        return None
    if callable(unique):
        value = unique(records, call.args, call.kwargs)
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError("the unique key of %s.%s must be a string, "
                "not %r" % (call.model, call.method, value))
        parts = [call.model, call.method, value]
    else:
        parts = [call.model, call.method, call.instance, call.args,
            call.kwargs, call.user, call.context]
    return hashlib.sha256(canonical(parts).encode('utf-8')).hexdigest()


def join(outbox, options, call, records, row, handle):
    """Set the key of the call in its row; return the handle of the
    identical call deferred earlier in the same transaction, or None.

    Otherwise the handle points to the pending or queued call that holds
    the key, if any: the commit tells whether it still does."""
    row['unique_key'] = call_key(options, call, records)
    if row['unique_key'] is None:
        return None
    earlier = outbox.unique_handle(row['unique_key'])
    if earlier is not None:
        return earlier
    table = Pool().get('async_sqs.task').__table__()
    cursor = Transaction().connection.cursor()
    cursor.execute(*table.select(table.uuid,
            where=(table.unique_key == row['unique_key']) & Holding(),
            limit=1))
    found = cursor.fetchone()
    if found:
        handle.task_id = found[0]
    return None


def settle(entries, held):
    """Return the entries of the calls whose rows went in, their handles
    pointing to them; point the others' handles to the calls that hold
    their keys (held: {uuid: uuid of the holder}): these are not sent."""
    kept = []
    for entry in entries:
        row, handle = entry[0], entry[1]
        if row['uuid'] in held:
            handle.task_id = held[row['uuid']]
            # its row is another caller's: the row tells how it stands
            handle._set_state(None)
            logger.debug("%s joins %s", row['uuid'], handle.task_id)
        else:
            handle.task_id = row['uuid']
            kept.append(entry)
    return kept


def insert(rows, insert_rows, slice_size):
    """Insert the pending rows of unique calls, skipping those whose key an
    identical call holds. Return {uuid: uuid of the holder} of these.

    insert_rows(rows) inserts with ON CONFLICT DO NOTHING and returns the
    count inserted. On PostgreSQL, under repeatable read, a conflict with a
    row committed after the snapshot fails to serialise instead: the insert
    runs in a savepoint, the holders are read afresh and the rest go in
    again. A holder that started meanwhile holds its key no more: the call
    goes in after all."""
    held = {}
    rows = sorted(rows, key=lambda r: r['unique_key'])
    for _ in range(INSERT_ATTEMPTS):
        missed = []
        for sub_rows in grouped_slice(rows, slice_size):
            sub_rows = list(sub_rows)
            if _insert_skipping(sub_rows, insert_rows) < len(sub_rows):
                missed.extend(_not_inserted(sub_rows))
        if not missed:
            return held
        holders = read_holders(
            Transaction().database.name, [r['unique_key'] for r in missed])
        rows = []
        for row in missed:
            if row['unique_key'] in holders:
                held[row['uuid']] = holders[row['unique_key']]
            else:
                rows.append(row)
        if not rows:
            return held
    raise RuntimeError("%s unique call(s) could neither be inserted nor "
        "join the call that holds their key" % len(rows))


def _insert_skipping(rows, insert_rows):
    "Return the count of rows inserted: 0 if the insert failed to serialise."
    if backend.name != 'postgresql':
        # a writer holds SQLite's lock: whatever it conflicts with committed
        return insert_rows(rows)
    cursor = Transaction().connection.cursor()
    cursor.execute('SAVEPOINT async_sqs_unique')
    try:
        count = insert_rows(rows)
    except backend.DatabaseOperationalError as exc:
        if not str(getattr(exc, 'sqlstate', '')).startswith(
                TRANSACTION_ROLLBACK):
            raise
        cursor.execute('ROLLBACK TO SAVEPOINT async_sqs_unique')
        logger.debug("unique calls conflict with a later commit: %s", exc)
        return 0
    cursor.execute('RELEASE SAVEPOINT async_sqs_unique')
    return count


def _not_inserted(rows):
    "Return the rows of those that the transaction did not insert."
    table = Pool().get('async_sqs.task').__table__()
    cursor = Transaction().connection.cursor()
    cursor.execute(*table.select(table.uuid,
            where=table.uuid.in_([r['uuid'] for r in rows])))
    inserted = {u for u, in cursor}
    return [r for r in rows if r['uuid'] not in inserted]


def read_holders(database_name, keys):
    """Return {key: uuid} of the calls that hold the keys: as the
    transaction sees them, then, for the keys it sees no holder of, as a
    transaction of its own does: under repeatable read, a holder committed
    after the snapshot is not visible to the first."""
    table = Pool().get('async_sqs.task').__table__()
    holders = _holders(Transaction().connection.cursor(), table, keys)
    keys = [k for k in keys if k not in holders]
    if keys:
        with Transaction(new=True).start(
                database_name, 0, readonly=True) as transaction:
            holders.update(_holders(
                    transaction.connection.cursor(), table, keys))
    return holders


def _holders(cursor, table, keys):
    holders = {}
    for sub_keys in grouped_slice(keys, backend.MAX_QUERY_PARAMS):
        cursor.execute(*table.select(table.unique_key, table.uuid,
                where=table.unique_key.in_(list(sub_keys)) & Holding()))
        holders.update(cursor)
    return holders


def check_retry(task_ids):
    """Raise TaskStateError if a task of the ids has a key that another
    call holds, or that another of them has: retried, it would be a second
    pending call of that key."""
    table = Pool().get('async_sqs.task').__table__()
    cursor = Transaction().connection.cursor()
    keys = {}
    for sub_ids in grouped_slice(task_ids, backend.MAX_QUERY_PARAMS):
        cursor.execute(*table.select(table.unique_key, table.uuid,
                table.model, table.method,
                where=table.id.in_(list(sub_ids))
                & (table.unique_key != Null)))
        for key, *task in cursor.fetchall():
            if key in keys:
                _refuse_retry(task, keys[key])
            keys[key] = task
    for key, task in keys.items():
        cursor.execute(*table.select(table.uuid, table.model, table.method,
                where=(table.unique_key == key) & Holding()
                & (table.uuid != task[0]), limit=1))
        holder = cursor.fetchone()
        if holder:
            _refuse_retry(task, holder)


def _refuse_retry(task, holder):
    def name(uuid, model, method):
        return '%s.%s %s' % (model, method, uuid)
    raise TaskStateError(gettext('async_sqs.msg_task_retry_unique',
            task=name(*task), other=name(*holder)))


def release(call):
    """Clear the key of a unique call about to run, in a transaction of its
    own committed before the call's.

    A call that runs holds its key no more: an identical one may be
    deferred meanwhile. The call's own transaction could not say so, on
    PostgreSQL nor on SQLite: nobody sees what it wrote before it ends."""
    try:
        cls = Pool(call.database).get(call.model, type=call.kind)
    except KeyError:
        # refused when it is claimed
        return
    options = getattr(cls, '__async_tasks__', {}).get(call.method)
    if options is None or not options.unique:
        return
    table = Table('async_sqs_task')
    retries = config.getint('database', 'retry')
    for attempt in range(retries + 1):
        try:
            with Transaction().start(call.database, 0) as transaction:
                transaction.connection.cursor().execute(*table.update(
                        [table.unique_key], [None],
                        where=(table.uuid == call.task)
                        & (table.unique_key != Null)))
            return
        except backend.DatabaseOperationalError:
            # a sender marking it queued: its update is quick
            if attempt == retries:
                raise
