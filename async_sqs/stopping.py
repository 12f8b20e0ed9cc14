# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Stopping a running call that was cancelled.

The row of a running call is locked by the worker's transaction until the
call ends, so a cancel cannot write on it: it sends a stop request on a
PostgreSQL notification channel instead, delivered when its transaction
commits. Every worker process listens on the channel; the one that runs the
call raises TaskCancelled inside it, from SIGUSR1 in its main thread, so
that a call sleeping in C code stops too. Past [async_sqs] cancel_grace the
supervisor ends the process, as it does at a hard time limit."""
import logging
import selectors
import signal
import threading

from trytond import backend

from . import settings
from .exceptions import TaskCancelled
from .limits import SAFE_POINT_DELAY, unsafe_to_raise

logger = logging.getLogger(__name__)

#: Notification channel of the stop requests; the payload is a task UUID.
CHANNEL = 'async_sqs_stop'
#: Seconds a listener waits on its connection before it checks it.
SELECT_TIMEOUT = 30
#: Seconds before a listener whose connection failed connects again,
#: doubled after each failure up to RECONNECT_LONGEST.
RECONNECT_FIRST = 1
RECONNECT_LONGEST = 30
#: The signal that raises TaskCancelled in the main thread.
STOP_SIGNAL = signal.SIGUSR1


def can_stop(database_name):
    "Tell whether running calls of the database can be stopped."
    return backend.Database(database_name).has_channel()


def request_stop(task_ids):
    """Ask the worker that runs each call to stop it, once the current
    transaction commits."""
    from trytond.transaction import Transaction
    transaction = Transaction()
    for task_id in task_ids:
        transaction.database.notify(
            transaction.connection, CHANNEL, task_id)
        logger.info("task %s: stop requested", task_id)


class Stopper:
    """The call a worker process runs, and whether it was asked to stop.

    The process tells it which call starts and ends; listener threads tell
    it which calls must stop."""

    def __init__(self, watch=None):
        self.watch = watch
        self.lock = threading.Lock()
        self.current = None
        self.stopped = None
        # set once TaskCancelled is raised in the call, or the call ended
        self.delivered = threading.Event()
        self.main_thread = threading.main_thread().ident

    def install(self):
        "Handle the stop signal; to be called in the main thread."
        signal.signal(STOP_SIGNAL, self._on_signal)

    def start(self, database_name, task_id):
        with self.lock:
            self.current = (database_name, task_id)
            self.stopped = None
            self.delivered.clear()

    def end(self):
        "Return whether the call that ends was asked to stop."
        with self.lock:
            stopped = self.stopped is not None
            self.current = self.stopped = None
            self.delivered.set()
        return stopped

    def stop(self, database_name, task_id):
        "Stop the call if it is the one running."
        with self.lock:
            if self.current != (database_name, task_id) or self.stopped:
                return
            self.stopped = self.current
        logger.warning("<Task %s@%s> cancelled while it runs: stopping it",
            task_id, database_name)
        if self.watch is not None:
            self.watch.stop_within(settings.cancel_grace())
        # again until it comes at a point where raising is safe
        while True:
            signal.pthread_kill(self.main_thread, STOP_SIGNAL)
            if self.delivered.wait(SAFE_POINT_DELAY):
                break

    def _on_signal(self, signum, frame):
        # no lock here: the main thread may hold it when the signal comes;
        # a signal that comes once the call has ended stops nothing
        stopped = self.stopped
        if stopped is None or stopped != self.current:
            return
        if unsafe_to_raise(frame):
            return
        self.delivered.set()
        raise TaskCancelled(stopped[1])


class StopListener(threading.Thread):
    "Receives the stop requests of one database for a worker process."

    def __init__(self, database_name, stopper, stopping):
        super().__init__(name='stop-listener-%s' % database_name,
            daemon=True)
        self.database_name = database_name
        self.stopper = stopper
        self.stopping = stopping

    def run(self):
        delay = RECONNECT_FIRST
        while not self.stopping.is_set():
            try:
                self.listen()
            except Exception:
                logger.warning("stop requests of %s: listening failed, "
                    "again in %s s", self.database_name, delay,
                    exc_info=True)
                if self.stopping.wait(delay):
                    break
                delay = min(delay * 2, RECONNECT_LONGEST)
            else:
                break

    def listen(self):
        database = backend.Database(self.database_name).connect()
        connection = database.get_connection(autocommit=True)
        selector = selectors.DefaultSelector()
        try:
            cursor = connection.cursor()
            cursor.execute('LISTEN "%s"' % CHANNEL)
            selector.register(connection, selectors.EVENT_READ)
            while not self.stopping.is_set():
                selector.select(timeout=SELECT_TIMEOUT)
                for notification in database.get_notifications(connection):
                    self.stopper.stop(
                        self.database_name, notification.payload)
                # keeps the connection alive, and fails if it is not
                cursor.execute('SELECT 1')
        finally:
            selector.close()
            database.put_connection(connection)


def start_listeners(database_names, stopper, stopping):
    "Start a listener per database whose running calls can be stopped."
    listeners = []
    for database_name in database_names:
        if can_stop(database_name):
            listener = StopListener(database_name, stopper, stopping)
            listener.start()
            listeners.append(listener)
    return listeners
