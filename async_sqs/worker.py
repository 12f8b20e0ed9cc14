# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""trytond-async-worker: receive deferred calls and replay them.

The main process supervises worker processes. Each process initialises the
Tryton pool of its databases once, long-polls its queues from receiver
threads and runs the calls one at a time, each in its own transaction as the
recorded user with the recorded context."""
import ctypes
import datetime as dt
import logging
import math
import multiprocessing
import os
import queue as queue_module
import signal
import socket
import threading
import time
import traceback
from collections import defaultdict

from trytond import backend, config
from trytond.exceptions import UserError, UserWarning
from trytond.i18n import gettext
from trytond.pool import Pool
from trytond.status import processing
from trytond.tools import grouped_slice
from trytond.transaction import Transaction, inactive_records

from . import settings, sqs
from .backoff import Outage
from .exceptions import MessageError, RecordMissing
from .message import (
    RecordRef, check_signing, decode_calls, encode_call, encode_reply,
    signature_attributes, verify, walk)
from .outbox import mark_queued, message_entry
from .result import reply_queue_attributes
from .task import task_queues

logger = logging.getLogger(__name__)

#: mallopt parameter of glibc that caps the number of malloc arenas.
M_ARENA_MAX = -8
#: Malloc arenas a worker process's threads share.
MALLOC_ARENAS = 2
#: Seconds between two restarts of a worker process that died.
RESTART_DELAY = 1
#: Longest visibility timeout SQS allows, in seconds.
MAX_VISIBILITY = 43200
#: Why a message without a task row is refused.
NO_ROW = "no task row: the call was never committed"
#: What run_call returns for a call that ran already.
SKIPPED = object()
#: Message attribute counting how often the database kept a call from
#: running: it sets the delay of the next try, not the call's attempts.
RELEASED_ATTRIBUTE = 'async_sqs.released'
#: Seconds before a call the database kept from running is tried again,
#: doubled at each release, up to RELEASE_LONGEST.
RELEASE_FIRST = 1
RELEASE_LONGEST = 300
RELEASE_DOUBLINGS = 16


def database_errors():
    "Return the exceptions that are the database's trouble, not the call's."
    return (backend.DatabaseOperationalError, backend.DatabaseTimeoutError)


def task_name(call):
    return '<Task %s %s.%s@%s>' % (
        call.task, call.model, call.method, call.database)


def error_payload(exc):
    "Return the description of an exception that a reply carries."
    if isinstance(exc, (UserError, UserWarning)):
        return {
            'type': 'UserError',
            'message': exc.message,
            'description': exc.description or '',
            }
    return {
        'type': '%s.%s' % (type(exc).__module__, type(exc).__qualname__),
        'message': str(exc),
        'traceback': ''.join(traceback.format_exception(exc)),
        }


def refusal_payload(exc):
    "Return the description of a MessageError that a reply carries."
    return {'type': 'MessageError', 'message': exc.reason}


class Attempt:
    "One attempt at a call: its number, options and timing."

    def __init__(self, call, received):
        self.call = call
        self.received = received
        self.receive_count = received.receive_count
        self.started_at = dt.datetime.now()
        self.started = time.monotonic()
        self.number = None
        self.state = None
        self.options = None

    def duration(self):
        return (time.monotonic() - self.started) * 1000


class Received:
    "A message received from a queue, and where it came from."
    __slots__ = ('database', 'queue_name', 'url', 'message', 'slots')

    def __init__(self, database, queue_name, url, message, slots):
        self.database = database
        self.queue_name = queue_name
        self.url = url
        self.message = message
        self.slots = slots

    @property
    def receipt(self):
        return self.message['ReceiptHandle']

    @property
    def receive_count(self):
        try:
            return int(self.message.get('Attributes', {}).get(
                    'ApproximateReceiveCount', 1))
        except ValueError:
            return 1


class Heartbeat:
    """Keeps the messages a process holds hidden from the other workers.

    A message waiting in the buffer or running gets its visibility timeout
    renewed every half timeout, so a long call is not started twice."""

    def __init__(self, stopping):
        self.stopping = stopping
        self.lock = threading.Lock()
        self.held = {}
        self.outage = Outage("heartbeat (ChangeMessageVisibility)")

    def hold(self, received, timeout):
        with self.lock:
            self.held[received.receipt] = [
                received.url, timeout, time.monotonic()]

    def extend(self, received, timeout):
        """Set the visibility timeout of a message held, from now.

        A failure is left to the next beat: the message is held anyway."""
        self.hold(received, timeout)
        try:
            sqs.client().change_visibility_batch(
                received.url, [received.receipt], timeout)
        except Exception as exc:
            self.outage.failed(exc)
            self.retry_soon(received)
        else:
            self.outage.succeeded()

    def retry_soon(self, received):
        "Make the next beat extend the message again."
        with self.lock:
            entry = self.held.get(received.receipt)
            if entry is not None:
                entry[2] = 0

    def release(self, received):
        with self.lock:
            self.held.pop(received.receipt, None)

    def run(self):
        transport = sqs.client()
        while not self.stopping.wait(1):
            if not self.outage.due():
                continue
            now = time.monotonic()
            due = defaultdict(list)
            with self.lock:
                for receipt, entry in self.held.items():
                    url, timeout, extended = entry
                    if now - extended >= timeout / 2:
                        entry[2] = now
                        due[(url, timeout)].append(receipt)
            for (url, timeout), receipts in due.items():
                try:
                    transport.change_visibility_batch(url, receipts, timeout)
                except Exception as exc:
                    self.outage.failed(exc)
                    # tried again at the next beat, not half a timeout later
                    with self.lock:
                        for receipt in receipts:
                            if receipt in self.held:
                                self.held[receipt][2] = 0
                else:
                    self.outage.succeeded()


class WorkerProcess:
    "One worker process: receiver threads feeding one executor."

    def __init__(self, database_names, queue_names=None, prefetch=None,
            relay=False):
        self.database_names = database_names
        self.queue_names = queue_names
        self.prefetch = prefetch or settings.prefetch()
        self.relay = relay
        self.stopping = threading.Event()
        self.buffer = queue_module.Queue()
        self.to_delete = defaultdict(list)
        self.heartbeat = Heartbeat(self.stopping)
        self.host = '%s:%s' % (socket.gethostname(), os.getpid())
        self.next_relay = 0
        self.outages = {}
        self.unsent_replies = []

    def outage(self, what):
        "Return the Outage that tracks the calls of that kind."
        outage = self.outages.get(what)
        if outage is None:
            outage = self.outages[what] = Outage(what)
        return outage

    def try_sqs(self, what, function, *args, **kwargs):
        """Call function; tell whether it worked.

        A failure is logged once per outage of that kind of call, never
        raised: what it did not do is done again by whoever calls later
        (deletes are kept) or by the message coming back."""
        outage = self.outage(what)
        try:
            function(*args, **kwargs)
        except Exception as exc:
            outage.failed(exc)
            return False
        outage.succeeded()
        return True

    def stop(self, *args):
        self.stopping.set()

    def init_pools(self):
        database_list = Pool.database_list()
        for database_name in self.database_names:
            pool = Pool(database_name)
            if database_name not in database_list:
                with Transaction().start(database_name, 0, readonly=True):
                    pool.init()

    def queues(self):
        "Return (database, queue name) of every queue to listen on."
        result = []
        for database_name in self.database_names:
            if self.queue_names:
                names = list(self.queue_names)
            else:
                names = task_queues(database_name)
            for name in names:
                result.append((database_name, name))
        return result

    def run(self):
        self.init_pools()
        transport = sqs.client()
        receivers = []
        queues = self.queues()
        # each queue its own prefetch: one busy queue must not starve the
        # others, and receives of ten cost a tenth of receives of one
        share = self.prefetch
        for database_name, name in queues:
            queue_name = sqs.task_queue_name(database_name, name)
            url = self.queue_url(transport, queue_name)
            if url is None:
                return
            thread = threading.Thread(
                target=self.receive_loop,
                args=(database_name, queue_name, url,
                    threading.Semaphore(share), share),
                name='receive %s' % queue_name, daemon=True)
            thread.start()
            receivers.append(thread)
        threading.Thread(
            target=self.heartbeat.run, name='heartbeat', daemon=True).start()
        logger.info("ready, pid %s listens on %s", os.getpid(),
            ', '.join(t.name[len('receive '):] for t in receivers))
        try:
            while not self.stopping.is_set():
                if self.relay and time.monotonic() >= self.next_relay:
                    self.relay_pending()
                self.send_replies()
                try:
                    received = self.buffer.get(timeout=0.5)
                except queue_module.Empty:
                    self.flush_deletes()
                    continue
                try:
                    self.handle(received)
                except Exception:
                    # the message comes back after its visibility timeout
                    logger.critical("message %s could not be handled",
                        received.message.get('MessageId'), exc_info=True)
                finally:
                    self.heartbeat.release(received)
                    received.slots.release()
                if self.buffer.empty():
                    self.flush_deletes()
        finally:
            # calls in flight are done; give back what was not started
            for thread in receivers:
                thread.join(settings.wait_time() + 5)
            self.release_buffer()
            self.flush_deletes(force=True)
            self.send_replies(force=True)

    def queue_url(self, transport, queue_name):
        "Return the URL of the queue, waiting for SQS; None if stopped."
        outage = Outage("open queue %s" % queue_name)
        while not self.stopping.is_set():
            try:
                url = transport.url(queue_name)
            except Exception as exc:
                self.stopping.wait(outage.failed(exc))
            else:
                outage.succeeded()
                return url

    def receive_loop(self, database_name, queue_name, url, slots, share):
        transport = sqs.client()
        timeout = settings.visibility_timeout()
        outage = Outage("receive from %s" % queue_name)
        while not self.stopping.is_set():
            if not slots.acquire(timeout=0.5):
                continue
            count = 1
            while (count < min(share, sqs.MAX_BATCH)
                    and slots.acquire(blocking=False)):
                count += 1
            try:
                messages = transport.receive(url, max_number=count)
            except Exception as exc:
                messages = []
                self.stopping.wait(outage.failed(exc))
            else:
                outage.succeeded()
            for _ in range(count - len(messages)):
                slots.release()
            for message in messages:
                received = Received(
                    database_name, queue_name, url, message, slots)
                self.heartbeat.hold(received, timeout)
                self.buffer.put(received)

    def release_buffer(self):
        "Make the messages received but not started visible again."
        released = defaultdict(list)
        while True:
            try:
                received = self.buffer.get_nowait()
            except queue_module.Empty:
                break
            self.heartbeat.release(received)
            released[received.url].append(received.receipt)
        transport = sqs.client()
        for url, receipts in released.items():
            logger.info("release %s message(s) of %s", len(receipts), url)
            # not released, they come back after their visibility timeout
            self.try_sqs("release (ChangeMessageVisibility)",
                transport.change_visibility_batch, url, receipts, 0)

    def flush_deletes(self, force=False):
        """Delete the messages of the calls settled.

        What SQS did not delete is kept for the next flush: a message that
        comes back meanwhile is skipped by its row."""
        outage = self.outage("delete (DeleteMessageBatch)")
        if not self.to_delete or not (force or outage.due()):
            return
        to_delete, self.to_delete = self.to_delete, defaultdict(list)
        transport = sqs.client()
        for url, receipts in to_delete.items():
            if not self.try_sqs(outage.what,
                    transport.delete_batch, url, receipts):
                self.to_delete[url].extend(receipts)

    def delete(self, received):
        self.to_delete[received.url].append(received.receipt)
        if len(self.to_delete[received.url]) >= sqs.MAX_BATCH:
            self.flush_deletes()

    def dead_letter(self, received, reason, call=None):
        """Copy a message the worker refuses to the dead-letter queue.

        With call, only that call of a packed message goes there, alone.
        Return whether it went: if not, the message stays where it is, to
        be judged again when it comes back."""
        transport = sqs.client()
        body = received.message.get('Body') or ' '
        if call is not None:
            body = encode_call(call)
        attributes = {
            'refused': {'DataType': 'String', 'StringValue': reason[:1000]}}

        def send():
            url = transport.dead_letter_url(received.queue_name)
            transport.send(url, body, attributes=attributes)
        return self.try_sqs("dead letter (SendMessage)", send)

    def handle(self, received):
        message = received.message
        message_id = message.get('MessageId')
        try:
            # the signature first: nothing of an unsigned body is read
            verify(message)
            calls, packed = decode_calls(message.get('Body'), message_id)
            for call in calls:
                if call.database != received.database:
                    raise MessageError(
                        "database %s is not the queue's" % call.database,
                        message_id, call.task)
        except MessageError as exc:
            logger.error("message %s refused (task %s): %s",
                message_id, exc.task_id, exc.reason)
            # no row to write: the dead-letter queue is its only record
            if self.dead_letter(received, exc.reason):
                self.delete(received)
            return
        if not packed:
            call, = calls
            if call.eta is not None and self.postpone(call, received):
                return
            if self.attempt_call(call, received, packed=False):
                self.delete(received)
            return
        settled = True
        for call in calls:
            if self.stopping.is_set():
                # the calls that ran are skipped when it comes back
                logger.info("message %s released part done", message_id)
                self.release_now(received)
                return
            if call.eta is not None and call.eta > dt.datetime.now():
                settled &= self.send_alone(call, received, 0)
                continue
            settled &= self.attempt_call(call, received, packed=True)
        if settled:
            self.delete(received)

    def release_now(self, received):
        "Make a message held visible again at once."
        self.heartbeat.release(received)
        self.try_sqs("release (ChangeMessageVisibility)",
            sqs.client().change_visibility_batch,
            received.url, [received.receipt], 0)

    def attempt_call(self, call, received, packed):
        """Run one call of the message and record how it ended.

        Return whether the call is settled: its message may be deleted as
        far as it goes. A call of a packed message that must come back, or
        be parked, goes alone in a message of its own, so the others of its
        message are not held back."""
        name = task_name(call)
        attempt = Attempt(call, received)
        logger.info("%s starts", name)
        try:
            with processing(name):
                reply = self.run_call(attempt)
        except database_errors() as exc:
            # the database's trouble, not the call's: no attempt is counted
            # and nothing is decided; the call comes back later
            logger.warning("%s released: the database failed for %i ms, "
                "the call is tried again later: %s", name,
                attempt.duration(), exc)
            return self.release(call, received, packed)
        except MessageError as exc:
            logger.error("%s refused: %s", name, exc.reason)
            payload = refusal_payload(exc)
            if attempt.number is not None or exc.reason != NO_ROW:
                if not self.record(call, 'failed', attempt, payload):
                    return self.release(call, received, packed)
            if call.reply and exc.reason != NO_ROW:
                self.reply(call, received,
                    encode_reply(call.task, error=payload))
            return self.dead_letter(
                received, exc.reason, call if packed else None)
        except (UserError, UserWarning) as exc:
            logger.info("%s failed after %i ms: %s", name, attempt.duration(),
                exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            return self.fail(call, received, attempt, exc, True, packed)
        except Exception as exc:
            retries = attempt.options.retries if attempt.options else 0
            number = attempt.number or attempt.receive_count
            # past max_receive_count SQS would park it before it ran again
            final = (number > retries or attempt.receive_count
                >= settings.max_receive_count())
            logger.error("%s failed after %i ms (attempt %s of %s)",
                name, attempt.duration(), number, retries + 1,
                exc_info=True)
            return self.fail(call, received, attempt, exc, final, packed)
        if reply is SKIPPED:
            logger.info("%s skipped: %s already", name, attempt.state)
        else:
            logger.info("%s done in %i ms", name, attempt.duration())
            if call.reply:
                self.reply(call, received, reply)
        return True

    def fail(self, call, received, attempt, exc, final, packed):
        """Record a failed attempt; retry later, or fail the task for good.

        Return whether the call is settled. A call fails for good only once
        its row says so: the reply and the dead letter come after."""
        payload = error_payload(exc)
        if final:
            if not self.record(call, 'failed', attempt, payload):
                return self.release(call, received, packed)
            if call.reply:
                self.reply(
                    call, received, encode_reply(call.task, error=payload))
            if isinstance(exc, (UserError, UserWarning)):
                return True
            # parked for an administrator to look at, and requeue
            return self.dead_letter(
                received, payload['message'], call if packed else None)
        number = attempt.number or attempt.receive_count
        backoff = attempt.options.retry_backoff * 2 ** (number - 1)
        delay = int(min(backoff, MAX_VISIBILITY))
        # if the row cannot say so, the message still comes back
        self.record(call, 'queued', attempt, payload,
            eta=dt.datetime.now() + dt.timedelta(seconds=delay))
        logger.info("%s retries in %i s", task_name(call), delay)
        if packed:
            return self.send_alone(call, received, delay)
        self.heartbeat.release(received)
        self.try_sqs("retry (ChangeMessageVisibility)",
            sqs.client().change_visibility_batch,
            received.url, [received.receipt], delay)
        return False

    def release(self, call, received, packed):
        """Give a call the database kept from running back to its queue.

        It comes back after a delay that doubles with each release. A fresh
        copy is sent, so that neither SQS's receive count, which the
        redrive policy and the attempts go by, nor the row count it.
        Return whether the call is settled."""
        attributes = received.message.get('MessageAttributes') or {}
        try:
            released = int(attributes.get(
                    RELEASED_ATTRIBUTE, {}).get('StringValue', 0))
        except ValueError:
            released = 0
        # unsigned, so bounded before it is used
        released = min(max(released, 0), RELEASE_DOUBLINGS)
        delay = min(RELEASE_FIRST * 2 ** released, RELEASE_LONGEST)
        if packed:
            return self.send_alone(call, received, delay, released + 1)
        self.heartbeat.release(received)
        entry = message_entry('0', received.message['Body'], delay)
        entry.setdefault('MessageAttributes', {})[RELEASED_ATTRIBUTE] = {
            'DataType': 'Number', 'StringValue': str(released + 1)}
        if self.try_sqs("release (SendMessageBatch)",
                sqs.client().send_batch, received.url, [entry]):
            return True
        # not copied: the message itself comes back after its timeout
        return False

    def send_alone(self, call, received, delay, released=0):
        """Send a call of a packed message again, alone, in delay seconds.

        Beyond what SQS delays, the call carries its due time and the
        worker that receives it holds it back. Return whether it went."""
        eta = call.eta
        if delay:
            eta = dt.datetime.now() + dt.timedelta(seconds=delay)
        elif eta is not None:
            delay = max(0, (eta - dt.datetime.now()).total_seconds())
        if delay <= sqs.MAX_DELAY:
            eta = None
        body = encode_call(call._replace(eta=eta))
        delay = min(math.ceil(delay), sqs.MAX_DELAY)
        entry = message_entry('0', body, delay)
        if released:
            entry.setdefault('MessageAttributes', {})[RELEASED_ATTRIBUTE] = {
                'DataType': 'Number', 'StringValue': str(released)}
        return self.try_sqs("send a call alone (SendMessageBatch)",
            sqs.client().send_batch, received.url, [entry])

    def record(self, call, state, attempt, payload=None, eta=None):
        """Write the outcome of an attempt on the task row, as root: the
        error payload that ended it, if any.

        Return whether it is written and committed."""
        payload = payload or {}
        retry = config.getint('database', 'retry')
        for count in range(retry + 1):
            try:
                with Transaction().start(call.database, 0):
                    Task = Pool(call.database).get('async_sqs.task')
                    Task.finish(call.task, state,
                        started_at=attempt.started_at,
                        error_type=payload.get('type'),
                        error=payload.get('message'),
                        error_description=payload.get('description'),
                        traceback=payload.get('traceback'),
                        attempts=attempt.number or attempt.receive_count,
                        worker=self.host, eta=eta)
                return True
            except database_errors():
                if count < retry:
                    time.sleep(0.02 * (count + 1))
                    continue
                logger.warning("%s: the task row could not be marked %s",
                    task_name(call), state, exc_info=True)
            except Exception:
                logger.error("%s: the task row could not be marked %s",
                    task_name(call), state, exc_info=True)
                break
        return False

    def postpone(self, call, received):
        "Hold back a call not yet due; tell whether it was."
        remaining = (call.eta - dt.datetime.now()).total_seconds()
        if remaining <= 1:
            return False
        transport = sqs.client()
        self.heartbeat.release(received)
        if received.receive_count >= settings.max_receive_count() - 1:
            # a fresh copy, lest the redrive policy count this one dead
            if self.try_sqs("postpone (SendMessageBatch)",
                    transport.send_batch, received.url, [message_entry(
                            '0', received.message['Body'],
                            min(int(remaining), sqs.MAX_DELAY))]):
                self.delete(received)
        else:
            self.try_sqs("postpone (ChangeMessageVisibility)",
                transport.change_visibility_batch,
                received.url, [received.receipt],
                int(min(remaining, MAX_VISIBILITY)))
        logger.info("%s postponed, due in %i s", task_name(call), remaining)
        return True

    def run_call(self, attempt):
        """Run the call in its own transaction, committed before return.

        Return the reply body, or SKIPPED when the row says the call ran
        already. The reply is encoded inside the transaction, where records
        still have their id."""
        call, received = attempt.call, attempt.received
        pool = Pool(call.database)
        retry = config.getint('database', 'retry')
        count = 0
        while True:
            try:
                with Transaction().start(call.database, call.user,
                        context=call.context):
                    Task = pool.get('async_sqs.task')
                    # at-least-once delivery: the row lock and 'done' make a
                    # repeat a no-op
                    attempt.state, attempt.number = Task.claim(
                        call.task, attempt.receive_count, self.host)
                    if attempt.number is None:
                        if attempt.state is None:
                            raise MessageError(NO_ROW, task_id=call.task)
                        return SKIPPED
                    self.check_user(pool, call)
                    cls, attempt.options = self.resolve_method(pool, call)
                    if attempt.options.visibility_timeout is not None:
                        self.heartbeat.extend(
                            received, attempt.options.visibility_timeout)
                    args, kwargs, target = self.resolve_records(
                        pool, call, cls)
                    result = getattr(target, call.method)(*args, **kwargs)
                    reply, error = None, {}
                    if call.reply:
                        reply, error = self.encode_result(call, result)
                    # the outcome lasts with the row: any process can read
                    # it, as often as it likes, once this commits
                    Task.finish(call.task, 'done',
                        started_at=attempt.started_at,
                        attempts=attempt.number, worker=self.host,
                        result=reply, error_type=error.get('type'),
                        error=error.get('message'),
                        traceback=error.get('traceback'))
                return reply
            except backend.DatabaseOperationalError:
                if count < retry:
                    count += 1
                    logger.debug("%s retry %i", task_name(call), count)
                    time.sleep(0.02 * count)
                    continue
                raise

    def encode_result(self, call, result):
        """Return the reply body of a result, or of the error encoding it,
        and that error's payload (empty if none)."""
        try:
            return encode_reply(call.task, result), {}
        except (TypeError, ValueError) as exc:
            # the call's effects stand: only its result cannot travel
            logger.error("%s: the result cannot be sent: %s",
                task_name(call), exc)
            payload = error_payload(exc)
            return encode_reply(call.task, error=payload), payload

    def relay_pending(self):
        "Send again the calls committed but left unsent."
        grace = settings.relay_grace()
        self.next_relay = time.monotonic() + max(1, grace / 2)
        now = dt.datetime.now()
        before = now - dt.timedelta(seconds=grace)
        stale_before = now - dt.timedelta(seconds=settings.stale_after())
        for database_name in self.database_names:
            outage = self.outage("relay on %s" % database_name)
            if not outage.due():
                continue
            try:
                relay_pending(database_name, before, stale_before)
            except Exception as exc:
                outage.failed(exc)
            else:
                outage.succeeded()

    def check_user(self, pool, call):
        "Refuse a call recorded for a user that is missing or inactive."
        # root (0) is inactive in res_user, yet cron and scripts run as it
        if call.user == 0:
            return
        User = pool.get('res.user')
        table = User.__table__()
        cursor = Transaction().connection.cursor()
        cursor.execute(*table.select(table.active,
                where=table.id == call.user))
        row = cursor.fetchone()
        if not row or not row[0]:
            raise MessageError(
                "user %s does not exist or is inactive" % call.user,
                task_id=call.task)

    def resolve_method(self, pool, call):
        "Return the pool class and TaskOptions of the call, or refuse it."
        try:
            cls = pool.get(call.model, type=call.kind)
        except KeyError:
            raise MessageError(
                "unknown %s %s" % (call.kind, call.model), task_id=call.task)
        options = getattr(cls, '__async_tasks__', {}).get(call.method)
        if options is None:
            raise MessageError(
                "%s.%s is not an async_task" % (call.model, call.method),
                task_id=call.task)
        if call.instance is not None and call.kind != 'model':
            raise MessageError(
                "only records of models can be instances",
                task_id=call.task)
        return cls, options

    def resolve_records(self, pool, call, cls):
        "Return args, kwargs and target with records browsed again."
        from trytond.model import ModelStorage
        wanted = defaultdict(set)

        def collect(ref):
            wanted[ref.model].add(ref.id)
            return ref
        walk(call.args, collect)
        walk(call.kwargs, collect)
        if call.instance is not None:
            collect(RecordRef(call.model, call.instance))
        models = {}
        for model, ids in wanted.items():
            try:
                Model = pool.get(model)
            except KeyError:
                raise MessageError(
                    "a record of unknown model %s" % model,
                    task_id=call.task)
            if not issubclass(Model, ModelStorage):
                raise MessageError(
                    "%s does not store records" % model, task_id=call.task)
            found = set()
            with inactive_records():
                for sub_ids in grouped_slice(
                        ids, backend.MAX_QUERY_PARAMS):
                    found.update(map(int, Model.search(
                                [('id', 'in', list(sub_ids))], order=[])))
            if missing := ids - found:
                raise RecordMissing(gettext(
                        'async_sqs.msg_task_record_missing',
                        model=model,
                        ids=', '.join(map(str, sorted(missing)[:10]))))
            models[model] = Model

        def browse(ref):
            return models[ref.model](ref.id)
        args = walk(call.args, browse)
        kwargs = walk(call.kwargs, browse)
        if call.instance is not None:
            target = cls(call.instance)
        else:
            target = cls
        return args, kwargs, target

    def reply(self, call, received, body):
        """Send the reply body to the call's reply queue, or to the reply
        queue of the caller's process, now or later."""
        if call.reply_to:
            name = call.reply_to
            if not sqs.is_process_reply_queue(name):
                logger.warning("%s: no reply to %s, not a reply queue",
                    task_name(call), name)
                return
        else:
            name = sqs.reply_queue_name(call.task)
        # the reply queue lives beside the task queue: no GetQueueUrl
        url = received.url.rsplit('/', 1)[0] + '/' + name
        self.unsent_replies.append(
            (task_name(call), name, url, body, not call.reply_to))
        self.send_replies()

    def send_replies(self, force=False):
        """Send the replies not sent yet; keep those SQS did not take.

        The waiter's timeout bounds how long a late reply is of use; the
        reply queue's retention bounds how long it is kept."""
        outage = self.outage("reply (SendMessage)")
        if not self.unsent_replies or not (force or outage.due()):
            return
        replies, self.unsent_replies = self.unsent_replies, []
        for index, reply in enumerate(replies):
            if not self.try_sqs(outage.what, send_reply, *reply[1:]):
                self.unsent_replies.extend(replies[index:])
                if force:
                    for name, *_ in self.unsent_replies:
                        logger.error("%s: the reply could not be sent", name)
                return


def send_reply(name, url, body, create=True):
    """Send a reply body to the reply queue name at url, created if missing
    and create."""
    transport = sqs.client()
    attributes = signature_attributes(body)
    try:
        transport.send(url, body, attributes=attributes)
    except Exception as exc:
        if not sqs.is_missing_queue(exc):
            raise
        if not create:
            # the process that waits has not waited yet, or has ended: the
            # task row holds the outcome for whoever reads it
            logger.info("reply queue %s is missing: reply dropped", name)
            return
        # the waiter has not created it yet: either side may
        url = transport.create(name, reply_queue_attributes())
        transport.send(url, body, attributes=attributes)


def relay_pending(database_name, before, stale_before=None):
    """Send the rows of the database left pending since before, and those
    left queued or running since stale_before.

    A pending row's message was never sent; a stale row's message may have
    been lost by any path. Sending one twice is harmless: the claim lets
    one delivery run the call."""
    transport = sqs.client()
    with Transaction().start(database_name, 0, readonly=True):
        Task = Pool(database_name).get('async_sqs.task')
        rows = Task.pending_since(before)
        stale = Task.stale_since(stale_before) if stale_before else []
    if not rows and not stale:
        return
    if rows:
        logger.warning("relay %s call(s) of %s left unsent", len(rows),
            database_name)
    if stale:
        logger.warning("relay %s call(s) of %s left queued or running "
            "since %s", len(stale), database_name, stale_before)
    by_queue = defaultdict(list)
    now = dt.datetime.now()
    for uuid, queue_name, body, eta in rows + stale:
        delay = 0
        if eta is not None and eta > now:
            delay = min(int((eta - now).total_seconds()) + 1, sqs.MAX_DELAY)
        by_queue[queue_name].append((uuid, body, delay))
    sent = []
    for queue_name, items in by_queue.items():
        url = transport.url(queue_name)
        entries = [message_entry(str(i), body, delay)
            for i, (_, body, delay) in enumerate(items)]
        for batch in sqs.batches(entries):
            transport.send_batch(url, batch)
            sent.append([items[int(e['Id'])][0] for e in batch])
    mark_queued(database_name, sent, touch=bool(stale))


def limit_malloc_arenas():
    """Let the threads of the process share two malloc arenas.

    glibc gives each thread that allocates an arena of its own; receiver
    and heartbeat threads mostly wait, and their arenas cost megabytes of
    resident memory per process. Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


def _child(options, queue_names, relay):
    from trytond import commandline
    limit_malloc_arenas()
    config.update_etc(options.configfile)
    commandline.config_log(options)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = WorkerProcess(options.database_names, queue_names, relay=relay)
    signal.signal(signal.SIGTERM, worker.stop)
    try:
        worker.run()
    except Exception:
        logger.critical("worker process failed", exc_info=True)
        raise


def work(options):
    """Run the worker processes until SIGTERM or SIGINT.

    A process that dies is started again; on a signal each process stops
    taking messages, finishes the call it runs and exits."""
    check_signing()
    if not settings.secret():
        logger.warning("insecure: no [async_sqs] secret, messages are "
            "neither signed nor checked: anyone who can write to the "
            "queues can run any decorated method as any user")
    processes = options.processes or 1
    queue_names = options.queues or None
    context = multiprocessing.get_context('fork')
    stopping = threading.Event()
    children = {}

    def start(slot):
        # one relay per worker is enough: duplicates are harmless anyway
        process = context.Process(
            target=_child, args=(options, queue_names, slot == 0),
            name='trytond-async-worker-%s' % slot)
        process.start()
        children[slot] = process

    def stop(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("start %d worker process(es) on %s", processes,
        ', '.join(options.database_names))
    for slot in range(processes):
        start(slot)
    while not stopping.wait(0.2):
        for slot, process in list(children.items()):
            if not process.is_alive():
                logger.critical(
                    "worker process %s exited with %s, starting another",
                    process.pid, process.exitcode)
                if stopping.wait(RESTART_DELAY):
                    break
                start(slot)
    logger.info("stopping: calls in flight finish")
    for process in children.values():
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    for process in children.values():
        process.join()
    logger.info("stopped")
