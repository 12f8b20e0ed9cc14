# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""trytond-async-worker: the main process, which supervises the worker
processes.

It initialises the Tryton pool of its databases before it forks them, so
that they share its pages; each process long-polls its queues from receiver
threads and runs the calls one at a time, each in its own transaction as
the recorded user with the recorded context."""
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import threading

from trytond import config

from . import clients, payload, settings, sqs
from .limits import Watch
from .message import check_signing
from .process import WorkerProcess

logger = logging.getLogger(__name__)

#: mallopt parameter of glibc that caps the number of malloc arenas.
M_ARENA_MAX = -8
#: Malloc arenas a worker process's threads share.
MALLOC_ARENAS = 2
#: Seconds between two restarts of a worker process that died.
RESTART_DELAY = 1


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


def _child(options, queue_names, relay, watch):
    from trytond import commandline
    limit_malloc_arenas()
    clients.inherit_from_parent()
    config.update_etc(options.configfile)
    commandline.config_log(options)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = WorkerProcess(options.database_names, queue_names, relay=relay,
        watch=watch)
    signal.signal(signal.SIGTERM, worker.stop)
    try:
        worker.run()
    except Exception:
        logger.critical("worker process failed", exc_info=True)
        raise


def _record_time_limit(entry):
    from .rows import end_cancelled, end_past_time_limit
    try:
        if entry.get('cancelled'):
            end_cancelled(entry['database'], entry['task'], entry['attempt'])
        else:
            end_past_time_limit(entry['database'], entry['task'],
                entry['limit'], entry['attempt'], entry['final'])
    except Exception:
        # the row stays as it was: the relay sends its call again once
        # stale_after has passed
        logger.critical("<Task %s@%s>: its end at the time limit could not "
            "be recorded", entry['task'], entry['database'], exc_info=True)
        raise


def preload_pools(database_names):
    """Make the SQS client (and the S3 client, with a bucket), then
    initialise the pool of each database here, before the worker processes
    fork, so that they share those pages (copy-on-write) and take the
    clients over, the processes started again too.

    No connection outlives it: a child must not use its parent's. A
    database whose pool fails here is left to each process, which tries
    again on its own."""
    from trytond import backend
    from trytond.pool import Pool
    try:
        # first: what botocore parses and drops is reused by the pools. The
        # processes take these clients over; they make no request here.
        sqs.client()
        if settings.s3_bucket():
            payload.client()
    except Exception:
        logger.warning("the SQS and S3 clients are left to each worker "
            "process", exc_info=True)
    gc.collect()
    for database_name in database_names:
        if database_name in Pool.database_list():
            continue
        try:
            Pool(database_name).init()
        except Exception:
            # Pool() lists the database before its init: unlisted, each
            # process inits it
            Pool.stop(database_name)
            logger.warning("the pool of %s is left to each worker process",
                database_name, exc_info=True)
        try:
            # as trytond's WSGI application does before a server forks:
            # PostgreSQL keeps a pool of connections per database
            backend.Database(database_name).close()
        except Exception:
            logger.warning("the connections to %s could not be closed",
                database_name, exc_info=True)
    # what the pools hold lives as long as the processes: the collector
    # leaves it, and so the shared pages, untouched
    gc.collect()
    gc.freeze()


def work(options):
    """Run the worker processes until SIGTERM or SIGINT.

    A process that dies is started again; on a signal each process stops
    taking messages, finishes the call it runs and exits."""
    check_signing()
    if not settings.secret():
        logger.warning("insecure: no [async_sqs] secret, messages are "
            "neither signed nor checked: anyone who can write to the "
            "queues can run any decorated method as any user")
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes = options.processes or 1
    preload_pools(options.database_names)
    logger.info("start %d worker process(es) on %s", processes,
        ', '.join(options.database_names))
    Supervisor(options, processes, stopping).run()
    logger.info("stopped")


class Supervisor:
    "Starts the worker processes, and another for each that dies."

    def __init__(self, options, processes, stopping):
        self.options = options
        self.processes = processes
        self.stopping = stopping
        self.context = multiprocessing.get_context('fork')
        self.children = {}
        self.watches = {}

    def start(self, slot):
        # a new one each time: a process ended mid-write leaves its lock
        watch = self.watches[slot] = Watch(self.context)
        # one relay per worker is enough: duplicates are harmless anyway
        process = self.context.Process(target=_child,
            args=(self.options, self.options.queues or None, slot == 0,
                watch),
            name='trytond-async-worker-%s' % slot)
        process.start()
        self.children[slot] = process

    def run(self):
        for slot in range(self.processes):
            self.start(slot)
        while not self.stopping.wait(0.2):
            self.end_past_time_limit()
            for slot, process in list(self.children.items()):
                if not process.is_alive():
                    logger.critical(
                        "worker process %s exited with %s, starting another",
                        process.pid, process.exitcode)
                    if self.stopping.wait(RESTART_DELAY):
                        break
                    self.start(slot)
        logger.info("stopping: calls in flight finish")
        self.stop_children()

    def end_past_time_limit(self):
        """End the processes whose call ran past its hard time limit, and
        record the call's end on its row, from a process of its own: the
        supervisor holds no connection that its children would inherit."""
        for slot, process in list(self.children.items()):
            entry = self.watches[slot].expired()
            if entry is None or not process.is_alive():
                continue
            if entry.get('cancelled'):
                logger.error("<Task %s@%s> was cancelled and did not stop "
                    "within %s s: process %s is ended", entry['task'],
                    entry['database'], entry['limit'], process.pid)
            else:
                logger.error("<Task %s@%s> ran past its time limit of %s s: "
                    "process %s is ended", entry['task'], entry['database'],
                    entry['limit'], process.pid)
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
            self.watches[slot].clear()
            recorder = self.context.Process(target=_record_time_limit,
                args=(entry,), name='trytond-async-worker-time-limit')
            recorder.start()
            recorder.join(60)

    def stop_children(self):
        for process in self.children.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in self.children.values():
            process.join()
