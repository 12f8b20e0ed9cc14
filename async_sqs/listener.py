# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The waiting of a process: a few threads wait for the replies of many
handles.

wait_async() and await hand their handle to the Listener of the process,
which resolves one future per waiter: no thread is held per waiter, and an
event loop only awaits futures. One thread reads the rows of every task
waited for, one query per database and ROW_INTERVAL. With [async_sqs]
reply_queue = task, a few poller threads take the reply queues of the
waiters in turn; with process, one thread long-polls the reply queue of the
process, ten replies a call, and hands each to its waiter by task id."""
import atexit
import collections
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict

from . import settings, sqs
from .exceptions import MessageError, PayloadUnavailable
from .payload import read_reply

logger = logging.getLogger(__name__)

#: Threads that poll the per-call reply queues in turn.
POLLERS = 8
#: Seconds between two polls of one per-call reply queue.
POLL_INTERVAL = 1
#: Seconds between two reads of the rows of the tasks waited for.
ROW_INTERVAL = 1
#: Replies kept for handles of the process that have not waited yet.
KEEP_ARRIVED = 10000

_listeners = {}
_lock = threading.Lock()


def listener():
    "Return the Listener of this process for the configured reply queue."
    # the queues of another prefix or endpoint are another listener's
    key = (os.getpid(), settings.reply_queue(), settings.queue_prefix(),
        settings.endpoint_url())
    found = _listeners.get(key)
    if found is None:
        with _lock:
            found = _listeners.get(key)
            if found is None:
                # a forked child does not inherit its parent's threads
                for other in list(_listeners):
                    if other[0] != key[0]:
                        del _listeners[other]
                found = _listeners[key] = Listener(key[1])
    return found


def close_listeners(endpoint_url=None):
    """Delete now the reply queues of the listeners of this process (of the
    SQS endpoint given, or of all), as its exit would: before the SQS
    server goes, in a test suite."""
    with _lock:
        listeners = [found for key, found in _listeners.items()
            if key[0] == os.getpid()
            and endpoint_url in (None, key[3])]
    for found in listeners:
        found.close()


def process_queue_name():
    "Return the name of the reply queue of this process."
    return listener().queue_name


class Watch:
    "The waiters of one task."
    __slots__ = ('handle', 'futures', 'url', 'finished', 'due')

    def __init__(self, handle):
        self.handle = handle
        self.futures = set()
        self.url = None
        # when the row was first seen finished, with the reply not in
        self.finished = False
        self.due = 0


class Listener:
    "Waits for the replies of the handles of the process, on few threads."

    def __init__(self, mode):
        self.mode = mode
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.watches = {}
        self.turns = collections.deque()
        self.arrived = collections.OrderedDict()
        self.started = False
        # the queue of the process has a lock of its own: a waiter does not
        # wait for its creation to register
        self.queue_lock = threading.RLock()
        self.closing = False
        # once the process's queue is deleted for good
        self.closed = False
        self._queue_name = None
        self.url = None
        self.alive_at = 0

    @property
    def queue_name(self):
        "The name of the reply queue of the process, made on first use."
        if self._queue_name is None:
            with self.queue_lock:
                if self._queue_name is None:
                    self._queue_name = sqs.process_reply_queue_name(
                        socket.gethostname(), os.getpid(),
                        uuid.uuid4().hex[:8])
        return self._queue_name

    def watch(self, handle):
        "Return a concurrent future that gets the Reply of the handle."
        future = concurrent.futures.Future()
        task_id = handle.task_id
        with self.lock:
            reply = self.arrived.pop(task_id, None)
            # with the database the row decides: a reply kept may be of an
            # attempt before a retry
            if reply is not None and handle.database is None:
                future.set_result(reply)
                return future
            watch = self.watches.get(task_id)
            if watch is None:
                watch = self.watches[task_id] = Watch(handle)
                if self.mode == 'task':
                    self.turns.append(task_id)
            watch.futures.add(future)
            self.changed.notify_all()
        self.start()
        return future

    def forget(self, handle, future):
        "Stop waiting with that future: its waiter gave up."
        with self.lock:
            watch = self.watches.get(handle.task_id)
            if watch is not None:
                watch.futures.discard(future)
                if not watch.futures:
                    del self.watches[handle.task_id]

    def wait(self, handle, timeout):
        "Return the Reply of the handle, or None after timeout seconds."
        if self.mode == 'process':
            # here rather than in the thread: made before the process ends
            self.open_queue()
        future = self.watch(handle)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            self.forget(handle, future)
            return None

    def resolve(self, task_id, reply, keep=False):
        """Give the reply to the waiters of the task; return their Watch.

        Without waiters and with keep, it is kept for one that comes."""
        with self.lock:
            watch = self.watches.pop(task_id, None)
            if watch is None:
                if keep:
                    self.arrived[task_id] = reply
                    while len(self.arrived) > KEEP_ARRIVED:
                        self.arrived.popitem(last=False)
                return None
        for future in watch.futures:
            try:
                future.set_result(reply)
            except concurrent.futures.InvalidStateError:
                # cancelled by its event loop: the waiter gave up
                pass
        return watch

    def start(self):
        if self.started:
            return
        with self.lock:
            if self.started:
                return
            self.started = True
        threads = [('rows', self.read_rows)]
        if self.mode == 'process':
            threads.append(('replies', self.receive_replies))
        else:
            threads += [('poller %s' % i, self.poll_queues)
                for i in range(POLLERS)]
        for name, target in threads:
            threading.Thread(target=target, daemon=True,
                name='async_sqs listener %s' % name).start()

    def accept(self, message):
        "Return the Reply of a message if it is signed and sound, else None."
        try:
            return read_reply(message)
        except MessageError as exc:
            logger.warning("reply refused: %s", exc)
            return None
        except PayloadUnavailable as exc:
            # the row of a handle with its database answers
            logger.warning("reply not read: %s", exc)
            return None

    def read_rows(self):
        "Resolve the waiters whose task row is finished."
        while True:
            with self.lock:
                while not self.watches:
                    self.changed.wait()
                by_database = defaultdict(list)
                for task_id, watch in self.watches.items():
                    if watch.handle.database is not None:
                        by_database[watch.handle.database].append(watch)
            for database, watches in by_database.items():
                try:
                    self.read_database(database, watches)
                except Exception:
                    logger.warning("task rows of %s could not be read",
                        database, exc_info=True)
            with self.lock:
                # a new waiter is read at once, the others each interval
                self.changed.wait(ROW_INTERVAL)
            # waiters come in bursts: one read for the burst
            time.sleep(0.05)

    def read_database(self, database, watches):
        from .rows import read_rows
        rows = read_rows(database, [w.handle.task_id for w in watches])
        for watch in watches:
            row = rows.get(watch.handle.task_id)
            if row is None:
                continue
            reply = watch.handle._row_reply(row)
            if reply is None:
                continue
            if self.mode == 'task' and not watch.finished:
                # the reply leaves after the row commits: one more turn
                # for the reply queue, which the waiter then deletes
                watch.finished = True
                continue
            if self.resolve(watch.handle.task_id, reply) and watch.url:
                self.delete_queue(watch.handle.reply_queue)

    def delete_queue(self, name):
        try:
            sqs.client().delete_queue(name)
        except Exception:
            logger.warning("reply queue %s could not be deleted", name,
                exc_info=True)

    def poll_queues(self):
        "Take the per-call reply queues in turn, one receive each."
        transport = sqs.client()
        while True:
            with self.lock:
                while not self.turns:
                    self.changed.wait()
                task_id = self.turns.popleft()
                watch = self.watches.get(task_id)
                if watch is None:
                    continue
                # a long poll each while there are few, a short one each in
                # turn when there are more waiters than pollers
                wait_time = 0 if len(self.watches) > POLLERS else 1
            delay = watch.due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            name = watch.handle.reply_queue
            try:
                if watch.url is None:
                    watch.url = transport.open(
                        name, sqs.reply_queue_attributes())
                messages = transport.receive(
                    watch.url, max_number=1, wait_time=wait_time)
            except Exception:
                logger.warning("reply queue %s could not be read", name,
                    exc_info=True)
                messages = []
            resolved = False
            for message in messages:
                reply = self.accept(message)
                if reply is not None and reply.task == task_id:
                    self.resolve(task_id, reply)
                    self.delete_queue(name)
                    resolved = True
                else:
                    transport.delete_batch(
                        watch.url, [message['ReceiptHandle']])
            if not resolved:
                watch.due = time.monotonic() + POLL_INTERVAL
                with self.lock:
                    if task_id in self.watches:
                        self.turns.append(task_id)

    def open_queue(self):
        "Return the URL of the reply queue of the process, created if need."
        with self.queue_lock:
            if self.closed:
                raise RuntimeError("the reply queue of the process is closed")
            if self.url is None:
                if not self.closing:
                    # before the creation: a process that ends meanwhile
                    # still deletes it
                    atexit.register(self.close)
                    self.closing = True
                self.url = sqs.client().create(
                    self.queue_name, sqs.reply_queue_attributes())
                self.alive_at = 0
            self.keep_alive()
            return self.url

    def keep_alive(self):
        "Tag the queue of the process with the time, once an interval."
        now = time.time()
        if now - self.alive_at < sqs.alive_interval():
            return
        sqs.client().sqs.tag_queue(
            QueueUrl=self.url, Tags={sqs.ALIVE_TAG: str(int(now))})
        self.alive_at = now

    def close(self):
        "Delete the reply queue of the process: it exits."
        with self.queue_lock:
            self.closed = True
            url, self.url = self.url, None
        with self.lock:
            # the thread of the replies ends rather than wait for a handle
            self.changed.notify_all()
        if url is not None and self._queue_name is not None:
            try:
                sqs.client().delete_queue(self._queue_name, url=url)
            except Exception:
                logger.warning("reply queue %s could not be deleted",
                    self._queue_name, exc_info=True)

    def receive_replies(self):
        "Long-poll the reply queue of the process and hand out its replies."
        transport = sqs.client()
        while not self.closed:
            try:
                url = self.open_queue()
                with self.lock:
                    # replies of handles that do not wait stay in the queue
                    if not self.watches:
                        self.changed.wait(sqs.alive_interval())
                        continue
                messages = transport.receive(url)
            except Exception as exc:
                if self.closed:
                    return
                if sqs.is_missing_queue(exc):
                    # deleted under the process: a name of 60 s ago cannot
                    # be created again; the calls deferred before it reply
                    # in vain, their rows answer
                    logger.warning("reply queue %s is gone, another one "
                        "replaces it", self._queue_name)
                    with self.queue_lock:
                        self._queue_name = self.url = None
                    continue
                logger.warning("reply queue %s could not be read",
                    self._queue_name, exc_info=True)
                time.sleep(1)
                continue
            self.hand_out(url, messages)

    def hand_out(self, url, messages):
        "Give each reply received to its waiters, or keep it."
        if not messages:
            return
        for message in messages:
            reply = self.accept(message)
            if reply is not None:
                self.resolve(reply.task, reply, keep=True)
        sqs.client().delete_batch(url, [m['ReceiptHandle'] for m in messages])

    def ready(self, handle):
        "Return the Reply of the handle if it has arrived, without waiting."
        url = self.open_queue()
        self.start()
        self.hand_out(url, sqs.client().receive(url, wait_time=0))
        with self.lock:
            reply = self.arrived.pop(handle.task_id, None)
        # with the database the row, read before, decides
        return reply if handle.database is None else None
