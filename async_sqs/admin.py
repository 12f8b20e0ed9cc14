# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The commands of trytond-async-admin.

Each command takes the name of a database whose pool is initialised, writes
what it did on out and returns the exit status; a failure raises AdminError,
botocore's errors or a UserError, which the console script turns into one
line on stderr."""
import datetime as dt
import json
import logging
import sys

from sql.aggregate import Count

from trytond.pool import Pool
from trytond.transaction import Transaction

from . import links, metrics, payload, settings, sqs, stats
from .exceptions import AsyncTaskError, MessageError
from .message import (
    KEY_ID_ATTRIBUTE, SIGNATURE_ATTRIBUTE, decode_call, decode_calls,
    message_group, verify)
from .rows import task_queues
from .storage import RUNNABLE
from .task import STATES

logger = logging.getLogger(__name__)

#: SQS attributes of a queue's depth, and the names status gives them.
DEPTH_ATTRIBUTES = [
    ('ApproximateNumberOfMessages', 'visible'),
    ('ApproximateNumberOfMessagesNotVisible', 'in_flight'),
    ('ApproximateNumberOfMessagesDelayed', 'delayed'),
    ]
#: Seconds a dead letter being requeued stays hidden from other readers.
REQUEUE_VISIBILITY = 300
#: Seconds one receive of requeue-dead long-polls: a short poll of SQS may
#: answer empty while messages wait.
REQUEUE_WAIT_TIME = 1
#: Message attribute the worker writes on the dead letters it sends.
REFUSED_ATTRIBUTE = 'refused'
#: States of a row whose call requeue-dead sends again.
REQUEUEABLE = RUNNABLE + ('failed',)


class AdminError(AsyncTaskError):
    "A command of trytond-async-admin that could not do what it was asked."


def init_pool(database_name):
    "Initialise the pool of the database, as the worker does."
    # Pool() lists the database it is made for: ask before
    initialised = database_name in Pool.database_list()
    pool = Pool(database_name)
    if not initialised:
        with Transaction().start(database_name, 0, readonly=True):
            pool.init()
    return pool


def _queue_attributes(transport, name, attributes):
    "Return the attributes of the queue, or None if it does not exist."
    try:
        url = transport.url(name, create=False)
        return transport.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=attributes)['Attributes']
    except Exception as exc:
        if not sqs.is_missing_queue(exc):
            raise
        transport.forget(name)
        return None


def queue_status(database_name):
    "Return the depths of every task queue of the database, as dicts."
    transport = sqs.client()
    result = []
    for queue in task_queues(database_name):
        name = sqs.task_queue_name(database_name, queue)
        entry = {'name': name, 'queue': queue, 'exists': False}
        entry.update((key, None) for _, key in DEPTH_ATTRIBUTES)
        entry['dead'] = None
        attributes = _queue_attributes(
            transport, name, [a for a, _ in DEPTH_ATTRIBUTES])
        if attributes is not None:
            entry['exists'] = True
            for attribute, key in DEPTH_ATTRIBUTES:
                entry[key] = int(attributes.get(attribute, 0))
        dead = _queue_attributes(transport, sqs.dead_letter_name(name),
            [a for a, _ in DEPTH_ATTRIBUTES[:2]])
        if dead is not None:
            entry['dead'] = sum(
                int(dead.get(a, 0)) for a, _ in DEPTH_ATTRIBUTES[:2])
        result.append(entry)
    return result


def task_status(database_name):
    """Return ({state: count}, {state: seconds or None}) of the task rows:
    the count of each state and the age of the oldest pending and queued."""
    with Transaction().start(database_name, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        cursor.execute(*table.select(table.state, Count(table.id),
                group_by=[table.state]))
        counts = {state: 0 for state, _ in STATES}
        counts.update((state, int(count)) for state, count in cursor)
        oldest = {}
        now = dt.datetime.now()
        for state in ('pending', 'queued'):
            cursor.execute(*table.select(table.enqueued_at,
                    where=(table.state == state)
                    & (table.enqueued_at != None),  # noqa: E711
                    order_by=[table.enqueued_at.asc], limit=1))
            row = cursor.fetchone()
            oldest[state] = (max(0, int((now - row[0]).total_seconds()))
                if row else None)
    return counts, oldest


def status(database_name, as_json=False, out=sys.stdout):
    "Write the depths of the queues, the rows by state, the oldest rows."
    queues = queue_status(database_name)
    counts, oldest = task_status(database_name)
    if as_json:
        json.dump({'queues': queues, 'tasks': counts, 'oldest': oldest},
            out, indent=2)
        out.write('\n')
        return 0
    headers = ["QUEUE", "VISIBLE", "IN FLIGHT", "DELAYED", "DEAD"]
    width = max([len(headers[0])] + [len(q['name']) for q in queues])
    out.write('%-*s  %9s  %9s  %9s  %9s\n' % (width, *headers))
    for queue in queues:

        def show(value):
            return '-' if value is None else str(value)
        if queue['exists']:
            out.write('%-*s  %9s  %9s  %9s  %9s\n' % (width, queue['name'],
                    queue['visible'], queue['in_flight'], queue['delayed'],
                    show(queue['dead'])))
        else:
            out.write('%-*s  %s\n' % (width, queue['name'],
                    "does not exist yet (create-queues creates it)"))
    out.write('\n')
    out.write("TASKS   %s\n" % '  '.join(
            '%s %s' % (state, count) for state, count in counts.items()))
    out.write("OLDEST  %s\n" % '  '.join(
            '%s %s' % (state, '-' if age is None else '%s s' % age)
            for state, age in oldest.items()))
    return 0


def statistics(database_name, minutes=None, as_json=False, out=sys.stdout):
    "Write the figures of each queue and method over the last minutes."
    with Transaction().start(database_name, 0, readonly=True):
        report = stats.report(minutes)
    if as_json:
        metrics.write_json(report, out)
    else:
        metrics.write_table(report, out)
    return 0


def create_queues(database_name, out=sys.stdout):
    "Create every task queue of the database and its dead-letter queue."
    transport = sqs.client()
    for queue in task_queues(database_name):
        name = sqs.task_queue_name(database_name, queue)
        transport.create(name)
        out.write("%s ready, dead letters to %s\n"
            % (name, sqs.dead_letter_name(name)))
    return 0


def _check_dead_letter(message, database_name, rows):
    """Return the uuids of the calls a dead letter carries, or raise
    MessageError when it must stay where it is.

    rows maps the uuid of each call named to (state, queue, body), read by
    the caller. The worker writes its dead letters unsigned, with a refused
    attribute; any other must pass the signature check. Whatever the body
    says, only the body of the call's own row is sent again."""
    message_id = message.get('MessageId')
    attributes = message.get('MessageAttributes') or {}
    if (REFUSED_ATTRIBUTE not in attributes
            or KEY_ID_ATTRIBUTE in attributes
            or SIGNATURE_ATTRIBUTE in attributes):
        verify(message)
    named = _named_calls(message)
    for task_id, database, same_as in named:
        if database != database_name:
            raise MessageError("database %s is not the queue's"
                % database, message_id, task_id)
        row = rows.get(task_id)
        if row is None:
            reason = "no task row"
            if REFUSED_ATTRIBUTE in attributes:
                reason += ", refused: %s" % (
                    attributes[REFUSED_ATTRIBUTE].get('StringValue'))
            raise MessageError(reason, message_id, task_id)
        if not same_as(row[2]):
            raise MessageError("the call differs from its task row",
                message_id, task_id)
    return [task_id for task_id, *_ in named]


def _named_calls(message):
    """Return (task id, database, same_as) of each call a dead letter names:
    same_as(body) tells whether the body of a row is that call.

    A call whose body is in S3 is the row whose body has the SHA-256 of its
    pointer: its object is gone once the call failed for good."""
    message_id = message.get('MessageId')
    pointer = payload.pointer_of(message)
    if pointer is not None:
        database, task_id = payload.call_of(pointer.key) or (None, None)
        if task_id is None:
            raise MessageError("the pointer names no call", message_id)
        return [(task_id, database, lambda body: payload.holds(
                        pointer, body))]
    calls, _ = decode_calls(message.get('Body'), message_id)

    def same_as(call):
        def test(body):
            try:
                return decode_call(body) == call
            except MessageError:
                return False
        return test
    return [(c.task, c.database, same_as(c)) for c in calls]


def _task_ids(message):
    "Return the task ids a body seems to name, without trusting it."
    try:
        return [task_id for task_id, *_ in _named_calls(message)]
    except MessageError:
        return []


def _read_rows(database_name, uuids):
    "Return {uuid: (state, queue, body)} of the rows of the uuids."
    from trytond import backend
    from trytond.tools import grouped_slice
    if not uuids:
        return {}
    result = {}
    with Transaction().start(database_name, 0, readonly=True):
        Task = Pool().get('async_sqs.task')
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        for sub in grouped_slice(uuids, backend.MAX_QUERY_PARAMS):
            cursor.execute(*table.select(
                    table.uuid, table.state, table.queue, table.body,
                    where=table.uuid.in_(list(sub))))
            for uuid, state, queue, body in cursor:
                result[uuid] = (state, queue, body)
    return result


def _mark_queued(database_name, uuids):
    "Set the rows of the uuids back to queued, so that the worker runs them."
    from trytond import backend
    from trytond.tools import grouped_slice
    with Transaction().start(database_name, 0):
        Task = Pool().get('async_sqs.task')
        table = Task.__table__()
        cursor = Transaction().connection.cursor()
        now = dt.datetime.now()
        for sub in grouped_slice(uuids, backend.MAX_QUERY_PARAMS):
            cursor.execute(*table.update(
                    [table.state, table.write_date], ['queued', now],
                    where=table.uuid.in_(list(sub))
                    & table.state.in_(list(REQUEUEABLE))))
        # as a retry does: the calls that wait for them wait again
        links.reopen(uuids)


def requeue_dead(database_name, queue=None, limit=None, out=sys.stdout):
    """Send the calls of the dead letters back to their task queue, their
    rows queued again; leave the refused ones in the dead-letter queue.

    StartMessageMoveTask would move every message as it is: the refused
    ones too, and the worker's own dead letters without a signature. So
    each dead letter is received, checked against its task row, the row's
    body sent again signed, and the dead letter deleted."""
    transport = sqs.client()
    queues = [queue] if queue else task_queues(database_name)
    requeued = set()
    total = 0
    for queue in queues:
        name = sqs.task_queue_name(database_name, queue)
        dead_name = sqs.dead_letter_name(name)
        try:
            dead_url = transport.url(dead_name, create=False)
        except Exception as exc:
            if not sqs.is_missing_queue(exc):
                raise
            transport.forget(dead_name)
            out.write("%s: does not exist\n" % dead_name)
            continue
        moved, obsolete, left = 0, 0, []
        while limit is None or total < limit:
            count = sqs.MAX_BATCH if limit is None else min(
                sqs.MAX_BATCH, limit - total)
            messages = transport.receive(dead_url, max_number=count,
                wait_time=REQUEUE_WAIT_TIME,
                visibility_timeout=REQUEUE_VISIBILITY)
            if not messages:
                break
            rows = _read_rows(database_name, sorted(
                    {u for m in messages for u in _task_ids(m)}))
            to_send, done = [], []
            for message in messages:
                try:
                    uuids = _check_dead_letter(message, database_name, rows)
                except MessageError as exc:
                    left.append(message['ReceiptHandle'])
                    out.write("%s: left %s: %s\n" % (
                            dead_name, message.get('MessageId'), exc.reason))
                    continue
                runnable = [u for u in uuids
                    if rows[u][0] in REQUEUEABLE and u not in requeued]
                if runnable:
                    moved += 1
                    total += 1
                else:
                    # every call ran, was cancelled or was requeued already
                    obsolete += 1
                to_send.extend(runnable)
                requeued.update(runnable)
                done.append(message['ReceiptHandle'])
            if to_send:
                # queued before the message leaves: a worker runs only a
                # call whose row says it may
                _mark_queued(database_name, to_send)
                by_queue = {}
                for uuid in to_send:
                    by_queue.setdefault(rows[uuid][1], []).append(
                        (uuid, rows[uuid][2]))
                for uuid in to_send:
                    if decode_call(rows[uuid][2]).reply:
                        # a waiter must read the outcome of the new attempt
                        transport.drain(sqs.reply_queue_name(uuid))
                for queue_name, bodies in by_queue.items():
                    transport.send_batch(transport.url(queue_name), [
                            payload.call_entry(str(i), body, 0,
                                database_name, uuid, message_group(body))
                            for i, (uuid, body) in enumerate(bodies)])
            if done:
                transport.delete_batch(dead_url, done)
        if left:
            # visible again, for the next look
            transport.change_visibility_batch(dead_url, left, 0)
        out.write("%s: %s dead letter(s) requeued, %s obsolete deleted, "
            "%s refused left\n" % (dead_name, moved, obsolete, len(left)))
        logger.info("%s: %s requeued, %s obsolete, %s refused", dead_name,
            moved, obsolete, len(left))
    out.write("%s call(s) requeued\n" % len(requeued))
    return 0


def sweep_replies(older_than=None, database_name=None, out=sys.stdout):
    """Delete the reply queues of the prefix older than older_than seconds;
    with an S3 bucket, the objects older than that no message needs."""
    if older_than is None:
        older_than = settings.reply_ttl()
    count = sqs.sweep_reply_queues(older_than)
    out.write("%s reply queue(s) deleted\n" % count)
    if settings.s3_bucket():
        count = payload.sweep(database_name, older_than)
        out.write("%s object(s) deleted from s3://%s/%s\n"
            % (count, settings.s3_bucket(), settings.s3_prefix()))
    return 0


def _tasks(database_name, uuids):
    Task = Pool().get('async_sqs.task')
    tasks = Task.search([('uuid', 'in', list(uuids))])
    missing = set(uuids) - {t.uuid for t in tasks}
    if missing:
        raise AdminError("unknown task(s) in %s: %s" % (
                database_name, ', '.join(sorted(missing))))
    return Task, tasks


def retry(database_name, uuids, out=sys.stdout):
    "Run the failed or cancelled tasks of the uuids again."
    with Transaction().start(database_name, 0):
        Task, tasks = _tasks(database_name, uuids)
        Task.retry(tasks)
    out.write("%s task(s) retried\n" % len(tasks))
    return 0


def cancel(database_name, uuids, out=sys.stdout):
    "Cancel the pending or queued tasks of the uuids."
    with Transaction().start(database_name, 0):
        Task, tasks = _tasks(database_name, uuids)
        Task.cancel(tasks)
    out.write("%s task(s) cancelled\n" % len(tasks))
    return 0


def run(options, out=sys.stdout):
    "Run the command of the parsed options; return the exit status."
    database_name = options.database_name
    init_pool(database_name)
    command = options.command
    if command == 'status':
        return status(database_name, as_json=options.json, out=out)
    elif command == 'stats':
        return statistics(database_name, minutes=options.since,
            as_json=options.json, out=out)
    elif command == 'create-queues':
        return create_queues(database_name, out=out)
    elif command == 'requeue-dead':
        return requeue_dead(database_name, queue=options.queue,
            limit=options.limit, out=out)
    elif command == 'sweep-replies':
        return sweep_replies(options.older_than, database_name, out=out)
    elif command == 'retry':
        return retry(database_name, options.uuids, out=out)
    elif command == 'cancel':
        return cancel(database_name, options.uuids, out=out)
    raise AdminError("unknown command %s" % command)
