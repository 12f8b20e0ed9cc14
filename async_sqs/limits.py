# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Time limits of the calls a worker process runs.

The soft limit raises TaskTimeLimit inside the call, from SIGALRM: a worker
process runs its calls in its main thread. The hard limit is the
supervisor's: a process publishes the call it runs and when its time is up,
and the supervisor ends a process past it, records the call's end and
starts another, so that a call that hangs holds no process for ever."""
import ctypes
import json
import logging
import signal
import threading
import time
from contextlib import contextmanager

from . import settings
from .exceptions import TaskTimeLimit

logger = logging.getLogger(__name__)

#: Bytes of the record, shared with the supervisor, of the call a process
#: runs: its task, database, limit and deadline.
WATCH_SIZE = 512
#: Modules in which an exception raised from a signal could leave a lock
#: taken or a connection half used: a signal that comes there is handled
#: again a moment later, once the call is back in its own code.
UNSAFE_MODULES = ('psycopg', 'psycopg2', 'psycopg_pool', 'sqlite3', 'sql',
    'trytond.backend', 'trytond.cache', 'trytond.transaction', 'threading',
    'logging', 'importlib', 'multiprocessing', 'queue', 'selectors',
    'botocore', 'urllib3')
#: Seconds before a signal that came at an unsafe point is handled again.
SAFE_POINT_DELAY = 0.05
#: The module that calls the methods: the frames below it are the call's.
RUNNER_MODULE = __name__.rsplit('.', 1)[0] + '.runner'


def unsafe_to_raise(frame):
    """Tell whether an exception raised at frame, the frame a signal
    interrupted, could be raised within code of UNSAFE_MODULES."""
    while frame is not None:
        module = frame.f_globals.get('__name__', '')
        if module == RUNNER_MODULE:
            return False
        if any(module == m or module.startswith(m + '.')
                for m in UNSAFE_MODULES):
            return True
        frame = frame.f_back
    return False


class Watch:
    "The call a worker process runs and until when, shared with its parent."

    def __init__(self, context):
        self.array = context.Array(ctypes.c_char, WATCH_SIZE)
        # the process's own copy of what it published
        self.entry = None

    def publish(self, entry):
        with self.array.get_lock():
            self.entry = entry
            self.array.value = json.dumps(entry).encode('ascii')

    def clear(self):
        with self.array.get_lock():
            self.entry = None
            self.array.value = b''

    def stop_within(self, grace):
        """Bring the deadline of the call published to within grace
        seconds, for a call that was cancelled while it runs."""
        with self.array.get_lock():
            entry = self.entry
            if entry is None:
                return
            deadline = time.time() + grace
            if entry['deadline'] is not None:
                deadline = min(deadline, entry['deadline'])
            self.publish(dict(entry, deadline=deadline, cancelled=True,
                    limit=grace))

    def read(self):
        "Return the call published, or None."
        lock = self.array.get_lock()
        # a process ended while it wrote leaves the lock taken
        if not lock.acquire(timeout=1):
            return None
        try:
            value = self.array.value
        finally:
            lock.release()
        return json.loads(value) if value else None

    def expired(self):
        "Return the call published if its deadline has passed, else None."
        entry = self.read()
        if (entry and entry['deadline'] is not None
                and time.time() >= entry['deadline']):
            return entry
        return None


def limits_of(options):
    "Return (hard, soft) seconds of a method's options; 0 means none."
    hard = options.time_limit
    if hard is None:
        hard = settings.time_limit()
    return hard or 0, options.soft_time_limit or 0


@contextmanager
def time_limits(watch, attempt, final):
    """Apply the time limits of the attempt's method to the block.

    final tells whether a call ended at its hard limit fails for good, or
    comes back to run again."""
    hard, soft = limits_of(attempt.options)
    soft_on = soft and threading.current_thread() is threading.main_thread()
    if soft_on:
        def expire(signum, frame):
            if unsafe_to_raise(frame):
                signal.setitimer(signal.ITIMER_REAL, SAFE_POINT_DELAY)
                return
            raise TaskTimeLimit(soft)
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, soft)
    if watch is not None:
        # published without a deadline too: a cancel may give it one
        call = attempt.call
        watch.publish({'task': call.task, 'database': call.database,
                'limit': hard,
                'deadline': time.time() + hard if hard else None,
                'attempt': attempt.number, 'final': final})
    try:
        yield
    finally:
        if soft_on:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if watch is not None:
            watch.clear()
