# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""trytond-async-worker: receive deferred calls and replay them.

The main process supervises worker processes. Each process initialises the
Tryton pool of its databases once, long-polls its queues from receiver
threads and runs the calls one at a time, each in its own transaction as the
recorded user with the recorded context."""
import logging
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
from .message import RecordRef, decode_call, encode_reply, walk
from .result import reply_queue_attributes

logger = logging.getLogger(__name__)

#: Messages one process holds at most, received but not finished.
PREFETCH = 10
#: Seconds between two restarts of a worker process that died.
RESTART_DELAY = 1


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


class WorkerProcess:
    "One worker process: receiver threads feeding one executor."

    def __init__(self, database_names, queue_names=None, prefetch=PREFETCH):
        self.database_names = database_names
        self.queue_names = queue_names
        self.prefetch = prefetch
        self.stopping = threading.Event()
        self.buffer = queue_module.Queue()
        self.to_delete = defaultdict(list)
        self.host = '%s:%s' % (socket.gethostname(), os.getpid())

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
                names = [settings.queue()]
                pool = Pool(database_name)
                for type_ in ('model', 'wizard', 'report'):
                    for _, cls in pool.iterobject(type=type_):
                        for options in getattr(
                                cls, '__async_tasks__', {}).values():
                            if options.queue and options.queue not in names:
                                names.append(options.queue)
            for name in names:
                result.append((database_name, name))
        return result

    def run(self):
        self.init_pools()
        transport = sqs.client()
        receivers = []
        queues = self.queues()
        # each queue its share of the prefetch: one busy queue must not
        # starve the others of receive calls
        share = max(1, self.prefetch // len(queues))
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
        logger.info("ready, pid %s listens on %s", os.getpid(),
            ', '.join(t.name[len('receive '):] for t in receivers))
        try:
            while not self.stopping.is_set():
                try:
                    received = self.buffer.get(timeout=0.5)
                except queue_module.Empty:
                    self.flush_deletes()
                    continue
                try:
                    self.handle(received)
                finally:
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
                self.buffer.put(
                    Received(database_name, queue_name, url, message, slots))

    def release_buffer(self):
        "Make the messages received but not started visible again."
        released = defaultdict(list)
        while True:
            try:
                received = self.buffer.get_nowait()
            except queue_module.Empty:
                break
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

    def dead_letter(self, received, reason):
        "Move a message the worker refuses to the dead-letter queue."
        transport = sqs.client()
        url = transport.dead_letter_url(received.queue_name)
        message = received.message
        attributes = {
            'refused': {'DataType': 'String', 'StringValue': reason[:1000]}}
        transport.send(url, message.get('Body') or ' ', attributes=attributes)
        transport.delete_batch(received.url, [received.receipt])

    def handle(self, received):
        message = received.message
        message_id = message.get('MessageId')
        try:
            call = decode_call(message.get('Body'), message_id)
            if call.database != received.database:
                raise MessageError(
                    "database %s is not the queue's" % call.database,
                    message_id, call.task)
        except MessageError as exc:
            logger.error("message %s refused (task %s): %s",
                message_id, exc.task_id, exc.reason)
            self.dead_letter(received, exc.reason)
            return
        name = task_name(call)
        started = time.monotonic()

        def duration():
            return (time.monotonic() - started) * 1000
        logger.info("%s starts", name)
        try:
            with processing(name):
                outcome = self.run_call(call, received)
        except MessageError as exc:
            logger.error("%s refused: %s", name, exc.reason)
            self.dead_letter(received, exc.reason)
            return
        except (UserError, UserWarning) as exc:
            logger.info("%s failed after %i ms: %s", name, duration(), exc,
                exc_info=logger.isEnabledFor(logging.DEBUG))
            outcome = {'error': error_payload(exc)}
        except Exception as exc:
            logger.error("%s failed after %i ms", name, duration(),
                exc_info=True)
            outcome = {'error': error_payload(exc)}
        else:
            logger.info("%s done in %i ms", name, duration())
        if call.reply:
            self.reply(call, received, outcome)
        self.delete(received)

    def run_call(self, call, received):
        """Run the call in its own transaction, committed before return.

        Return {'result': body} or {'error': payload}: the reply body is
        encoded inside the transaction, where records still have their id."""
        pool = Pool(call.database)
        retry = config.getint('database', 'retry')
        count = 0
        while True:
            try:
                with Transaction().start(call.database, call.user,
                        context=call.context):
                    cls, options = self.resolve_method(pool, call)
                    if options.visibility_timeout is not None:
                        sqs.client().change_visibility_batch(
                            received.url, [received.receipt],
                            options.visibility_timeout)
                    args, kwargs, target = self.resolve_records(
                        pool, call, cls)
                    result = getattr(target, call.method)(*args, **kwargs)
                    if call.reply:
                        return {'result': encode_reply(call.task, result)}
                return {}
            except backend.DatabaseOperationalError:
                if count < retry:
                    count += 1
                    logger.debug("%s retry %i", task_name(call), count)
                    time.sleep(0.02 * count)
                    continue
                raise

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
                for sub_ids in grouped_slice(ids):
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

    def reply(self, call, received, outcome):
        if 'result' in outcome:
            body = outcome['result']
        else:
            body = encode_reply(call.task, error=outcome['error'])
        transport = sqs.client()
        name = sqs.reply_queue_name(call.task)
        url = received.url.rsplit('/', 1)[0] + '/' + name
        try:
            transport.send(url, body)
        except Exception as exc:
            if not sqs.is_missing_queue(exc):
                raise
            # the waiter has not created it yet: either side may
            url = transport.create(name, reply_queue_attributes())
            transport.send(url, body)


def _child(options, queue_names):
    from trytond import commandline
    config.update_etc(options.configfile)
    commandline.config_log(options)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = WorkerProcess(options.database_names, queue_names)
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
    processes = options.processes or 1
    queue_names = options.queues or None
    context = multiprocessing.get_context('fork')
    stopping = threading.Event()
    children = {}

    def start(slot):
        process = context.Process(
            target=_child, args=(options, queue_names),
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
