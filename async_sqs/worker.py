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

from trytond import backend
from trytond import config
from trytond.exceptions import UserError, UserWarning
from trytond.i18n import gettext
from trytond.pool import Pool
from trytond.status import processing
from trytond.tools import grouped_slice
from trytond.transaction import Transaction, inactive_records

from . import settings, sqs
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

    def hold(self, received, timeout):
        with self.lock:
            self.held[received.receipt] = [
                received.url, timeout, time.monotonic()]

    def extend(self, received, timeout):
        "Set the visibility timeout of a message held, from now."
        self.hold(received, timeout)
        sqs.client().change_visibility_batch(
            received.url, [received.receipt], timeout)

    def release(self, received):
        with self.lock:
            self.held.pop(received.receipt, None)

    def run(self):
        transport = sqs.client()
        while not self.stopping.wait(1):
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
                except Exception:
                    logger.error("heartbeat on %s failed", url,
                        exc_info=True)


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
            url = transport.url(queue_name)
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
            self.flush_deletes()

    def receive_loop(self, database_name, queue_name, url, slots, share):
        transport = sqs.client()
        timeout = settings.visibility_timeout()
        while not self.stopping.is_set():
            if not slots.acquire(timeout=0.5):
                continue
            count = 1
            while (count < min(share, sqs.MAX_BATCH)
                    and slots.acquire(blocking=False)):
                count += 1
            try:
                messages = transport.receive(url, max_number=count)
            except Exception:
                logger.error("receive from %s failed", queue_name,
                    exc_info=True)
                messages = []
                self.stopping.wait(1)
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
            transport.change_visibility_batch(url, receipts, 0)

    def flush_deletes(self):
        if not self.to_delete:
            return
        to_delete, self.to_delete = self.to_delete, defaultdict(list)
        transport = sqs.client()
        for url, receipts in to_delete.items():
            transport.delete_batch(url, receipts)

    def delete(self, received):
        self.to_delete[received.url].append(received.receipt)
        if len(self.to_delete[received.url]) >= sqs.MAX_BATCH:
            self.flush_deletes()

    def dead_letter(self, received, reason, call=None):
        """Move a message the worker refuses to the dead-letter queue.

        With call, only that call of a packed message goes there, alone."""
        transport = sqs.client()
        url = transport.dead_letter_url(received.queue_name)
        body = received.message.get('Body') or ' '
        if call is not None:
            body = encode_call(call)
        attributes = {
            'refused': {'DataType': 'String', 'StringValue': reason[:1000]}}
        transport.send(url, body, attributes=attributes)
        if call is None:
            transport.delete_batch(received.url, [received.receipt])

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
            self.dead_letter(received, exc.reason)
            return
        if not packed:
            call, = calls
            if call.eta is not None and self.postpone(call, received):
                return
            if self.attempt_call(call, received, packed=False):
                self.delete(received)
            return
        for call in calls:
            if self.stopping.is_set():
                # the calls that ran are skipped when it comes back
                logger.info("message %s released part done", message_id)
                self.heartbeat.release(received)
                sqs.client().change_visibility_batch(
                    received.url, [received.receipt], 0)
                return
            if call.eta is not None and call.eta > dt.datetime.now():
                self.send_alone(call, received, 0)
                continue
            self.attempt_call(call, received, packed=True)
        self.delete(received)

    def attempt_call(self, call, received, packed):
        """Run one call of the message and record how it ended.

        Return whether the message may be deleted. A call of a packed
        message that must come back, or be parked, goes alone in a message
        of its own, so the others of its message are not held back."""
        name = task_name(call)
        attempt = Attempt(call, received)
        logger.info("%s starts", name)
        try:
            with processing(name):
                reply = self.run_call(attempt)
        except MessageError as exc:
            logger.error("%s refused: %s", name, exc.reason)
            if attempt.number is not None or exc.reason != NO_ROW:
                self.record(call, 'failed', attempt, error=exc.reason)
            self.dead_letter(received, exc.reason, call if packed else None)
            if call.reply and exc.reason != NO_ROW:
                self.reply(call, received, encode_reply(call.task, error={
                            'type': 'MessageError', 'message': exc.reason}))
            return False
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

        Return whether the message may be deleted."""
        payload = error_payload(exc)
        if final:
            self.record(call, 'failed', attempt, error=payload['message'],
                traceback=payload.get('traceback'))
            if call.reply:
                self.reply(
                    call, received, encode_reply(call.task, error=payload))
            if isinstance(exc, (UserError, UserWarning)):
                return True
            # parked for an administrator to look at, and requeue
            self.dead_letter(
                received, payload['message'], call if packed else None)
            return False
        number = attempt.number or attempt.receive_count
        backoff = attempt.options.retry_backoff * 2 ** (number - 1)
        delay = int(min(backoff, MAX_VISIBILITY))
        self.record(call, 'queued', attempt, error=payload['message'],
            traceback=payload.get('traceback'))
        logger.info("%s retries in %i s", task_name(call), delay)
        if packed:
            self.send_alone(call, received, delay)
            return True
        self.heartbeat.release(received)
        sqs.client().change_visibility_batch(
            received.url, [received.receipt], delay)
        return False

    def send_alone(self, call, received, delay):
        """Send a call of a packed message again, alone, in delay seconds.

        Beyond what SQS delays, the call carries its due time and the
        worker that receives it holds it back."""
        eta = call.eta
        if delay:
            eta = dt.datetime.now() + dt.timedelta(seconds=delay)
        elif eta is not None:
            delay = max(0, (eta - dt.datetime.now()).total_seconds())
        if delay <= sqs.MAX_DELAY:
            eta = None
        body = encode_call(call._replace(eta=eta))
        delay = min(math.ceil(delay), sqs.MAX_DELAY)
        sqs.client().send_batch(
            received.url, [message_entry('0', body, delay)])

    def record(self, call, state, attempt, error=None, traceback=None):
        "Write the outcome of an attempt on the task row, as root."
        try:
            with Transaction().start(call.database, 0):
                Task = Pool(call.database).get('async_sqs.task')
                Task.finish(call.task, state, started_at=attempt.started_at,
                    error=error, traceback=traceback,
                    attempts=attempt.number or attempt.receive_count,
                    worker=self.host)
        except Exception:
            logger.error("%s: the task row could not be updated",
                task_name(call), exc_info=True)

    def postpone(self, call, received):
        "Hold back a call not yet due; tell whether it was."
        remaining = (call.eta - dt.datetime.now()).total_seconds()
        if remaining <= 1:
            return False
        transport = sqs.client()
        self.heartbeat.release(received)
        if received.receive_count >= settings.max_receive_count() - 1:
            # a fresh copy, lest the redrive policy count this one dead
            transport.send_batch(received.url, [message_entry(
                        '0', received.message['Body'],
                        min(int(remaining), sqs.MAX_DELAY))])
            self.delete(received)
        else:
            transport.change_visibility_batch(
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
                    reply = None
                    if call.reply:
                        reply = self.encode_result(call, result)
                    Task.finish(call.task, 'done',
                        started_at=attempt.started_at,
                        attempts=attempt.number, worker=self.host)
                return reply
            except backend.DatabaseOperationalError:
                if count < retry:
                    count += 1
                    logger.debug("%s retry %i", task_name(call), count)
                    time.sleep(0.02 * count)
                    continue
                raise

    def encode_result(self, call, result):
        "Return the reply body of a result, or of the error encoding it."
        try:
            return encode_reply(call.task, result)
        except (TypeError, ValueError) as exc:
            # the call's effects stand: only its result cannot travel
            logger.error("%s: the result cannot be sent: %s",
                task_name(call), exc)
            return encode_reply(call.task, error=error_payload(exc))

    def relay_pending(self):
        "Send again the calls committed but left unsent."
        grace = settings.relay_grace()
        self.next_relay = time.monotonic() + max(1, grace / 2)
        before = dt.datetime.now() - dt.timedelta(seconds=grace)
        for database_name in self.database_names:
            try:
                relay_pending(database_name, before)
            except Exception:
                logger.error("relay on %s failed", database_name,
                    exc_info=True)

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
        "Send the reply body to the call's reply queue."
        transport = sqs.client()
        name = sqs.reply_queue_name(call.task)
        # the reply queue lives beside the task queue: no GetQueueUrl
        url = received.url.rsplit('/', 1)[0] + '/' + name
        attributes = signature_attributes(body)
        try:
            try:
                transport.send(url, body, attributes=attributes)
            except Exception as exc:
                if not sqs.is_missing_queue(exc):
                    raise
                # the waiter has not created it yet: either side may
                url = transport.create(name, reply_queue_attributes())
                transport.send(url, body, attributes=attributes)
        except Exception:
            logger.error("%s: the reply could not be sent", task_name(call),
                exc_info=True)


def relay_pending(database_name, before):
    "Send the rows of the database left pending since before."
    transport = sqs.client()
    with Transaction().start(database_name, 0, readonly=True):
        Task = Pool(database_name).get('async_sqs.task')
        rows = Task.pending_since(before)
    if not rows:
        return
    logger.warning("relay %s call(s) of %s left unsent", len(rows),
        database_name)
    by_queue = defaultdict(list)
    now = dt.datetime.now()
    for uuid, queue_name, body, eta in rows:
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
    mark_queued(database_name, sent)


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
