#!/usr/bin/env python3
# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Defer the rendering of demo invoices, let workers drain them, report.

Run by scripts/demo with the python of its venv, on a database where
async_sqs_demo is activated and a configuration that points at SQS."""
# Nothing may import trytond.pool, trytond.model or a module before the
# configuration is read: trytond picks its backend at first import.
import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal

#: Seconds between two counts of the rendered invoices.
POLL_INTERVAL = 0.2
#: Width of the progress bar, in characters.
BAR_WIDTH = 40
#: Seconds the worker has to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 30


class DemoFailed(Exception):
    "The demo could not complete."


_interrupted = []


def interrupt(signum, frame):
    # once is enough: a second signal (Ctrl-C reaches scripts/demo too, which
    # then sends SIGTERM) must not cut the clean-up short
    if not _interrupted:
        _interrupted.append(signum)
        raise KeyboardInterrupt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Defer invoice renders to async_sqs workers and report "
        "the rates.")
    parser.add_argument('-c', '--config', dest='configfile', required=True,
        metavar='FILE', help="the trytond configuration file")
    parser.add_argument('-d', '--database', dest='database', required=True,
        help="the database where async_sqs_demo is activated")
    parser.add_argument('--count', type=int, default=300, metavar='N',
        help="invoices to create and render (default: %(default)s)")
    parser.add_argument('--processes', type=int, default=2, metavar='N',
        help="worker processes (default: %(default)s)")
    parser.add_argument('--timeout', type=float, default=90,
        metavar='SECONDS',
        help="longest wait for the renders (default: %(default)s)")
    options = parser.parse_args(argv)
    if options.count < 1:
        parser.error("--count must be at least 1")
    if options.processes < 1:
        parser.error("--processes must be at least 1")
    return options


def say(text):
    print('[demo] %s' % text, flush=True)


class Progress:
    "A progress bar on a terminal, a line now and then elsewhere."

    def __init__(self, total, stream=sys.stdout):
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = None
        self.shown_at = 0

    def show(self, done):
        now = time.monotonic()
        if done == self.shown or (
                not self.tty and now - self.shown_at < 1
                and done < self.total):
            return
        filled = BAR_WIDTH * done // self.total
        line = '[%s%s] %i/%i' % (
            '#' * filled, '.' * (BAR_WIDTH - filled), done, self.total)
        if self.tty:
            self.stream.write('\r' + line)
        else:
            self.stream.write(line + '\n')
        self.stream.flush()
        self.shown, self.shown_at = done, now

    def close(self):
        if self.tty and self.shown is not None:
            self.stream.write('\n')
            self.stream.flush()
        self.shown = None


class Worker:
    "A trytond-async-worker process with its log."

    def __init__(self, options, log_path):
        self.log_path = log_path
        command = [
            os.path.join(os.path.dirname(sys.executable),
                'trytond-async-worker'),
            '-c', options.configfile, '-d', options.database,
            '-n', str(options.processes), '-v']
        self.log = open(log_path, 'w')
        # a session of its own: a Ctrl-C reaches the demo, which then stops
        # the worker by SIGTERM, the way it is meant to stop
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def pid(self):
        return self.process.pid

    def running(self):
        return self.process.poll() is None

    def stop(self):
        "Send SIGTERM, wait for the exit, kill if it is late; return the code."
        try:
            if self.running():
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say("the worker did not stop within %s s: killed"
                    % STOP_TIMEOUT)
                return None
        finally:
            try:
                # its processes too, should one outlive it
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.log.close()

    def tail(self, lines=20):
        "Return the last lines of the worker's log, to end an error with."
        with open(self.log_path, errors='replace') as fp:
            text = ''.join(fp.readlines()[-lines:]).rstrip()
        if not text:
            return "; the worker logged nothing"
        return "; the worker log ends with:\n%s" % text


def main(argv=None):
    options = parse_args(argv)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)

    from trytond import config
    config.update_etc(options.configfile)

    from trytond.pool import Pool
    from trytond.transaction import Transaction

    from trytond.modules.async_sqs import AsyncTaskError

    database = options.database
    Pool.start()
    pool = Pool(database)
    with Transaction().start(database, 0, readonly=True):
        pool.init()
    Invoice = pool.get('async_sqs.demo.invoice')

    def count_rendered():
        with Transaction().start(database, 0, readonly=True):
            return Invoice.search_count([('state', '=', 'rendered')])

    count = options.count
    say("creating %i invoices and deferring %i renders in one transaction"
        % (count, count))
    with Transaction().start(database, 0):
        invoices = Invoice.create([{
                    'number': 'INV/%05i' % i,
                    'amount': (Decimal(1000 + 37 * i) / 10).quantize(
                        Decimal('0.01')),
                    } for i in range(1, count + 1)])
        enqueue_start = time.monotonic()
        handles = [Invoice.render.defer([invoice]) for invoice in invoices]
        defer_time = time.monotonic() - enqueue_start
        # the calls leave when the transaction commits, at the end of with
    enqueue_time = time.monotonic() - enqueue_start
    unsent = [h for h in handles if h.state != 'sent']
    if unsent:
        raise DemoFailed("%i of %i calls were not sent to SQS (%s)"
            % (len(unsent), count, unsent[0].state))
    say("%i calls deferred in %.2f s, sent to SQS by the commit in %.2f s"
        % (count, defer_time, enqueue_time - defer_time))

    log_path = os.path.join(
        os.path.dirname(os.path.abspath(options.configfile)), 'worker.log')
    say("starting trytond-async-worker with %i processes"
        % options.processes)
    worker_start = dt.datetime.now()
    worker = Worker(options, log_path)
    try:
        progress = Progress(count)
        deadline = time.monotonic() + options.timeout
        try:
            while True:
                done = count_rendered()
                progress.show(done)
                if done >= count:
                    break
                if not worker.running():
                    raise DemoFailed(
                        "the worker exited with %s after %i of %i renders%s"
                        % (worker.process.returncode, done, count,
                            worker.tail()))
                if time.monotonic() > deadline:
                    raise DemoFailed(
                        "only %i of %i invoices rendered after %g s%s"
                        % (done, count, options.timeout, worker.tail()))
                time.sleep(POLL_INTERVAL)
        finally:
            progress.close()

        say("deferring one call with a result and waiting for it")
        wait_start = time.monotonic()
        with Transaction().start(database, 0):
            handle = Invoice.summarize.defer()
        try:
            summary = handle.wait(timeout=30)
        except AsyncTaskError as exc:
            raise DemoFailed("%s%s" % (exc, worker.tail())) from exc
        wait_time = time.monotonic() - wait_start
        say("wait() returned %s" % summary)
    finally:
        say("stopping the worker (SIGTERM)")
        code = worker.stop()
    if code != 0:
        raise DemoFailed(
            "the worker exited with %s%s" % (code, worker.tail()))

    with Transaction().start(database, 0, readonly=True):
        invoices = Invoice.search([('state', '=', 'rendered')])
        workers = {i.rendered_by for i in invoices} | {summary['by']}
        first = min(i.rendered_at for i in invoices)
        last = max(i.rendered_at for i in invoices)
    drain_time = (last - worker_start).total_seconds()
    startup_time = (first - worker_start).total_seconds()
    report = [
        ("calls run", "%i renders and 1 summarize, by %i worker processes "
            "(%s)" % (
                len(invoices), len(workers), ', '.join(sorted(workers)))),
        ("enqueue", "%.0f calls/s (%i calls in %.2f s, one transaction)" % (
                count / enqueue_time, count, enqueue_time)),
        ("drain", "%.0f calls/s (%.2f s from the worker start, the first "
            "done after %.2f s)" % (
                count / drain_time, drain_time, startup_time)),
        ("wait() round trip", "%.0f ms (defer, commit, run, reply)"
            % (wait_time * 1000)),
        ]
    print()
    for name, value in report:
        print('%-18s %s' % (name, value))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except DemoFailed as exc:
        print('\n[demo] FAILED: %s' % exc, file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print('\n[demo] interrupted', file=sys.stderr, flush=True)
        sys.exit(130)
