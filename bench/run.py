#!/usr/bin/env python3
# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Benchmark async_sqs against raw boto3, Tryton's ir.queue and Celery.

    bash bench/run                  # builds .venv/bench, then runs this
    .venv/bench/bin/python bench/run.py [--quick | --full | --await | --http]
        [-n N] [-c C] [--db sqlite | postgresql]

Needs a python with trytond, boto3, wrapt, moto[server] and async_sqs
installed (celery[sqs], kombu and pycurl for the Celery peer, which is
skipped, with a note, when they are missing; psycopg for --db postgresql).
It links bench/async_sqs_bench into that python's trytond/modules, starts
its own moto server on 127.0.0.1, creates the database and measures,
--repeat times each (moto is reset before every measurement):

- raw boto3: SendMessageBatch of ten, ReceiveMessage(10)+DeleteMessageBatch
  drain, request/reply round trip on a fresh UUID queue and a fixed queue;
- async_sqs: N deferred calls in one transaction, drain by
  trytond-async-worker -n 1, 2, 4, defer().wait() round trip; the enqueue
  and drain -n 2 again with ten calls to a message (calls_per_message);
- ir.queue: N __queue__ calls in one transaction, and on PostgreSQL their
  drain by trytond-worker -n 2 (it waits on the connection's socket, which
  SQLite has not);
- Celery: N apply_async, celery worker -P prefork -c 2.

Each drain also gives the CPU per task of the worker command and its
child processes (user+system from /proc, from the first task done to the
last, over the tasks done meanwhile), beside the raw consumer's (this
process's CPU over the receive+delete drain), and, once the last task is
done, the VmRSS and PSS (/proc/PID/smaps_rollup) of each child and the PSS
of the command and its children together.

--db sqlite (the default) creates a SQLite file in a temp dir. --db
postgresql starts a throwaway PostgreSQL cluster in that temp dir (the
newest /usr/lib/postgresql/*/bin, installed with apt-get by scripts/lib.sh
when missing and run as root; initdb and the server run as the user
postgres then) on a free port of 127.0.0.1, with fsync off, and stops it at
the end, also on an error or SIGTERM.

--full adds the cost per task at N=2000 against N=500 with the same
queue-depth profile: moto scans the whole queue on every call, so the 2000
calls go round-robin to 4 queues of 500 (the _queue_ option of defer) and
one worker listens to the 4 (--queue, repeated); both the enqueue and the
drain -n 2 are compared with the same at 500 in one queue, measured next to
them.

--await measures only N concurrent awaits in one event loop, side by
side: reply_queue = task, reply_queue = process, and a thread per waiter
(loop.run_in_executor(None, handle.wait), the way of before). Each time a
first await creates what the mode needs, then N calls are deferred in one
transaction with 5 slow ones (half a second each) first in the queue, and
awaited at once while a worker -n 2 runs them: all back per second, and
the largest delay of a 10 ms ticker of the same loop.

--http runs only the HTTP load instead: with the keys of a validated
async_sqs and rest user application, the trytond command (werkzeug's
threaded server: a thread per connection) on a free port of 127.0.0.1 and
a trytond-async-worker -n 2 beside it, ab -n N -c C (N=1000, C=500 unless
given; apache2-utils installed with apt-get by scripts/lib.sh when
missing, as root) POSTs to the fire-and-forget route (the no-op), to the
route with ?wait=60 (the call that returns its argument), to the same
route served by a second trytond command whose reply_queue is process, and
to trytond's REST route, which runs that call in the request. After each
run of a route of async_sqs it waits until every accepted call ended and
checks that as many rows are done; it checks that no log holds a
traceback, and prints the figures beside the seed's (347.8 and 53.9
requests/s); it exits with 1 when a check failed.

It prints one table and writes every sample as a JSON line to
bench/results/<timestamp>.jsonl. The environment of the trytond test suite
(TRYTOND_*, DB_NAME, ...) is ignored."""
import argparse
import datetime as dt
import glob
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
DATABASE = 'bench'
REGION = 'us-east-1'
#: Seconds a worker has to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 30
#: Seconds between two counts of the finished tasks.
POLL_INTERVAL = 0.1
#: Seconds between two counts until the first task is finished, from when
#: the CPU of a worker counts.
FIRST_POLL_INTERVAL = 0.01
#: Longest a drain may take before the benchmark gives up.
DRAIN_TIMEOUT = 600
CLK_TCK = os.sysconf('SC_CLK_TCK')
#: --full: the queues N=2000 is spread over, and the calls each one holds;
#: moto's cost per message grows with the depth of the queue
FULL_QUEUES = 4
QUEUE_DEPTH = 500
#: --profile: the functions printed per thread, by time
PROFILE_TOP = 25
#: Label of the figures of calls that share messages, ten to a message.
PACKED = ' (10 calls per message)'
#: --http: the model of the bench module the routes call
ITEM = 'async_sqs.bench.item'
#: --http: the processes of the trytond-async-worker beside the server
HTTP_WORKERS = 2
#: --http: the seconds the waiting route may wait (?wait=)
HTTP_WAIT_SECONDS = 60
#: Seconds ab waits for an answer before it counts a failure.
AB_TIMEOUT = 120
#: --http: the names of the figures of each route
HTTP_FIRE = 'HTTP async_sqs fire-and-forget (202)'
HTTP_WAIT = 'HTTP async_sqs ?wait=%s (200)' % HTTP_WAIT_SECONDS
HTTP_WAIT_PROCESS = 'HTTP async_sqs ?wait=%s, reply_queue = process (200)' % (
    HTTP_WAIT_SECONDS)
HTTP_REST = 'HTTP trytond REST, run in the request'
#: The figures the seed published (tcelery-req-handler: ab -n 1000 -c 500,
#: a 2-processor VM, Tornado, Celery and RabbitMQ, no database), req/s
SEED_FIRE = 347.8
SEED_WAIT = 53.9


def say(text):
    print('[bench] %s' % text, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
        help="N=20, 1 repeat, 10 round trips, skip peers not installed")
    parser.add_argument('--full', action='store_true',
        help="also measure the async_sqs enqueue and drain -n 2 of N=%s "
        "over %s queues of %s, against %s in one queue (cost per task)" % (
            FULL_QUEUES * QUEUE_DEPTH, FULL_QUEUES, QUEUE_DEPTH,
            QUEUE_DEPTH))
    parser.add_argument('--await', dest='awaits', action='store_true',
        help="measure only N concurrent awaits in one event loop: "
        "reply_queue = task, process, and a thread per waiter")
    parser.add_argument('--http', action='store_true',
        help="only the HTTP routes under ab: fire-and-forget, ?wait=%s and "
        "trytond's REST route, served by the trytond command" % (
            HTTP_WAIT_SECONDS))
    parser.add_argument('--profile', action='store_true',
        help="only drain N no-op calls with a worker process run in this "
        "process, each thread under cProfile (CPU time); print the "
        "profiles")
    parser.add_argument('--packed', action='store_true',
        help="--profile: the no-op with ten calls per message")
    parser.add_argument('-n', type=int, default=None, metavar='N',
        help="calls per measurement (default 500, 20 with --quick, "
        "1000 with --http)")
    parser.add_argument('-c', type=int, default=500, metavar='C',
        dest='concurrency',
        help="--http: concurrent requests of ab (default 500)")
    parser.add_argument('--repeat', type=int, default=None,
        help="repeats of each measurement (default 3, 1 with --quick)")
    parser.add_argument('--calls', type=int, default=None,
        help="round trips per repeat (default 200, 10 with --quick)")
    parser.add_argument('--db', choices=['sqlite', 'postgresql'],
        default='sqlite',
        help="database backend: a SQLite file (default) or a throwaway "
        "PostgreSQL cluster, which the trytond-worker drain needs")
    parser.add_argument('--no-peers', action='store_true',
        help="skip ir.queue and Celery")
    parser.add_argument('--results', default=os.path.join(HERE, 'results'),
        help="directory of the JSON lines file (default: bench/results)")
    options = parser.parse_args(argv)
    if options.n is None:
        options.n = 20 if options.quick else 1000 if options.http else 500
    if options.repeat is None:
        options.repeat = 1 if options.quick or options.http else 3
    if options.calls is None:
        options.calls = 10 if options.quick else 200
    return options


def clean_environ():
    "Drop what the test suite or a shell set for trytond and AWS."
    for key in list(os.environ):
        if (key.startswith(('TRYTOND_', 'AWS_', 'ASYNC_SQS_'))
                or key in {'DB_NAME', 'DB_CACHE', 'TRYTONPASSFILE'}):
            del os.environ[key]
    os.environ['AWS_EC2_METADATA_DISABLED'] = 'true'
    os.environ['PYTHONDONTWRITEBYTECODE'] = '1'


def link_module():
    "Link bench/async_sqs_bench into trytond/modules of this python."
    import importlib.util
    spec = importlib.util.find_spec('trytond')
    modules = os.path.join(os.path.dirname(spec.origin), 'modules')
    target = os.path.join(modules, 'async_sqs_bench')
    source = os.path.join(HERE, 'async_sqs_bench')
    if os.path.realpath(target) != os.path.realpath(source):
        if os.path.islink(target):
            os.unlink(target)
        os.symlink(source, target)


def ab_path():
    "Return the path of ab, installed with apt-get by scripts/lib.sh."
    path = shutil.which('ab')
    if not path:
        say("no ab here: scripts/lib.sh installs apache2-utils")
        subprocess.run(['bash', '-c',
                'source scripts/lib.sh && ab_ensure_installed'],
            cwd=ROOT, check=True)
        path = shutil.which('ab')
    if not path:
        raise RuntimeError("ab not found after installing apache2-utils")
    return path


def parse_ab(output):
    """Return the figures of ab's output: complete, failed, non_2xx,
    seconds, rps, p50 and p95 (ms, of its percentile table); None if it
    has none."""
    import re

    def number(pattern, default=None):
        match = re.search(pattern, output, re.MULTILINE)
        return float(match.group(1)) if match else default

    figures = {
        'complete': number(r'^Complete requests:\s+(\d+)'),
        'failed': number(r'^Failed requests:\s+(\d+)'),
        # only printed when there are some
        'non_2xx': number(r'^Non-2xx responses:\s+(\d+)', 0),
        'seconds': number(r'^Time taken for tests:\s+([0-9.]+)'),
        'rps': number(r'^Requests per second:\s+([0-9.]+)'),
        'p50': number(r'^\s+50%\s+(\d+)'),
        'p95': number(r'^\s+95%\s+(\d+)'),
        }
    if None in figures.values():
        return None
    for name in ('complete', 'failed', 'non_2xx'):
        figures[name] = int(figures[name])
    return figures


def status_counts(log):
    "Return the count of each status of the requests werkzeug logged."
    import re
    counts = {}
    # werkzeug colours the line of a status other than 200 on a terminal
    # and, as here, in a file
    for match in re.finditer(
            r'"(?:\x1b\[[0-9;]*m)*POST [^"]*" (\d{3}) ', log):
        status = int(match.group(1))
        counts[status] = counts.get(status, 0) + 1
    return counts


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# --- processes ---------------------------------------------------------------

def cpu_seconds(pid):
    "Return the user+system CPU seconds of the process."
    with open('/proc/%s/stat' % pid) as fp:
        fields = fp.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid):
    "Return the pids of the processes whose parent is pid."
    pids = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as fp:
                ppid = int(fp.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            pids.append(int(name))
    return pids


def proc_mib(pid, path, field):
    """Return in MiB the field (in kB) of /proc/PID/path, or None once the
    process is gone."""
    try:
        with open('/proc/%s/%s' % (pid, path)) as fp:
            for line in fp:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib(pid):
    "Return the resident set size in MiB: shared pages count in full."
    return proc_mib(pid, 'status', 'VmRSS')


def pss_mib(pid):
    "Return the proportional set size in MiB: shared pages count a share."
    return proc_mib(pid, 'smaps_rollup', 'Pss')


def own_cpu():
    "Return the user+system CPU seconds of this process (finer than ticks)."
    return time.process_time()


def process_cpu(pid):
    "Return the CPU seconds of the process and of its children."
    total = 0
    for each in [pid] + children(pid):
        try:
            total += cpu_seconds(each)
        except OSError:
            pass
    return total


def memory(pid):
    """Return the mean VmRSS and PSS in MiB of the child processes of pid,
    and the PSS of them all with pid."""
    pids = children(pid)
    rss = [v for v in map(rss_mib, pids) if v is not None]
    pss = [v for v in map(pss_mib, pids) if v is not None]
    total = [v for v in map(pss_mib, [pid] + pids) if v is not None]
    return (statistics.mean(rss) if rss else None,
        statistics.mean(pss) if pss else None,
        sum(total) if total else None)


class Usage:
    """What a worker command cost while it drained: moto's CPU seconds,
    its own CPU seconds over the tasks done meanwhile, and its memory."""

    def __init__(self, moto_cpu, cpu, tasks, rss, pss, pss_total):
        self.moto_cpu = moto_cpu
        self.cpu = cpu
        self.tasks = tasks
        self.rss = rss
        self.pss = pss
        self.pss_total = pss_total


class Process:
    "A process started by the benchmark, in a session of its own."

    def __init__(self, command, log_path, env=None, cwd=None):
        self.log_path = log_path
        self.log = open(log_path, 'w')
        self.started = time.time()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True)
        self.pid = self.process.pid

    def output(self):
        with open(self.log_path, errors='replace') as fp:
            return fp.read()

    def check(self):
        if self.process.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (
                    self.process.args[0], self.process.returncode,
                    self.output()[-3000:]))

    def stop(self):
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    say("%s did not stop in %s s: killed"
                        % (self.process.args[0], STOP_TIMEOUT))
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.log.close()


class Moto:
    "moto_server on a free port of 127.0.0.1."

    def __init__(self, directory):
        for _ in range(3):
            self.port = free_port()
            self.url = 'http://127.0.0.1:%s' % self.port
            self.server = Process(
                [os.path.join(BIN, 'moto_server'), '-H', '127.0.0.1',
                    '-p', str(self.port)],
                os.path.join(directory, 'moto.log'))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(
                        self.url + '/moto-api/', timeout=1).read()
                    return
                except OSError:
                    if self.server.process.poll() is not None:
                        break
                    time.sleep(0.1)
            self.server.stop()
        raise RuntimeError("moto server did not start")

    def reset(self):
        request = urllib.request.Request(
            self.url + '/moto-api/reset', data=b'', method='POST')
        urllib.request.urlopen(request, timeout=30).read()

    def cpu(self):
        return cpu_seconds(self.server.pid)

    def stop(self):
        self.server.stop()


def postgres_bin():
    "Return the directory of the PostgreSQL server binaries."
    def version(path):
        name = path.split(os.sep)[-3]
        return int(name) if name.isdigit() else 0

    def find():
        found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
            key=version)
        initdb = found[-1] if found else shutil.which('initdb')
        return os.path.dirname(initdb) if initdb else None

    if not find():
        say("no PostgreSQL server here: scripts/lib.sh installs it")
        subprocess.run(['bash', '-c',
                'source scripts/lib.sh && pg_ensure_installed'],
            cwd=ROOT, check=True)
    return find()


class Postgres:
    "A throwaway PostgreSQL cluster on a free port of 127.0.0.1."

    def __init__(self, directory):
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("--db postgresql needs psycopg, trytond's "
                "driver (%s): use bash bench/run" % exc) from exc
        self.bin = postgres_bin()
        self.directory = os.path.join(directory, 'postgresql')
        self.data = os.path.join(self.directory, 'data')
        self.pid = None
        os.mkdir(self.directory)
        if os.getuid() == 0:
            # initdb refuses root: the cluster is postgres's, who must be
            # able to pass through the temp dir to reach it
            os.chmod(directory, 0o711)
            shutil.chown(self.directory, 'postgres', 'postgres')
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def owner(self, command, log):
        "Run a PostgreSQL binary as the owner of the cluster."
        command = [os.path.join(self.bin, command[0])] + command[1:]
        if os.getuid() == 0:
            command = ['runuser', '-u', 'postgres', '--'] + command
        # from the cluster's directory: postgres may not read our cwd
        result = subprocess.run(command, cwd=self.directory,
            stdin=subprocess.DEVNULL, capture_output=True, text=True)
        with open(os.path.join(self.directory, log), 'a') as fp:
            fp.write(result.stdout + result.stderr)
        return result

    def log(self):
        try:
            with open(os.path.join(self.directory, 'server.log'),
                    errors='replace') as fp:
                return fp.read()[-3000:]
        except OSError:
            return ''

    def start(self):
        result = self.owner(['initdb', '-D', self.data, '-A', 'trust',
                '-U', 'postgres', '-E', 'UTF8', '--locale=C.UTF-8',
                '--no-sync'], 'initdb.log')
        if result.returncode:
            raise RuntimeError("initdb failed:\n%s"
                % (result.stdout + result.stderr)[-3000:])
        for _ in range(3):
            self.port = free_port()
            # fsync off: the disk is not what is measured; timezone UTC is
            # trytond's, which writes datetime.now() beside CURRENT_TIMESTAMP
            result = self.owner(['pg_ctl', '-D', self.data,
                    '-l', os.path.join(self.directory, 'server.log'),
                    '-o', '-p %s -k %s -c listen_addresses=127.0.0.1 '
                    '-c fsync=off -c synchronous_commit=off '
                    '-c full_page_writes=off -c max_connections=200 '
                    '-c timezone=UTC' % (self.port, self.directory),
                    '-w', '-t', '60', 'start'], 'pg_ctl.log')
            self.pid = self.postmaster_pid()
            if not result.returncode:
                return
            # the port may have been taken in between: try another one
            self.stop()
        raise RuntimeError("PostgreSQL did not start:\n%s" % self.log())

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, 'postmaster.pid')) as fp:
                return int(fp.readline())
        except (OSError, ValueError):
            return None

    def uri(self):
        return 'postgresql://postgres@127.0.0.1:%s/' % self.port

    def connect(self, database):
        "Return an autocommit connection to the database."
        import psycopg
        return psycopg.connect(host='127.0.0.1', port=self.port,
            user='postgres', dbname=database, autocommit=True)

    def create(self, database):
        # trytond-admin fills a database, it does not create one
        with self.connect('postgres') as connection:
            connection.execute('CREATE DATABASE "%s" TEMPLATE template0 '
                "ENCODING 'UTF8'" % database)

    def stop(self):
        "Stop the server: a fast shutdown, else SIGKILL to its group."
        if self.postmaster_pid() is None:
            return
        result = self.owner(['pg_ctl', '-D', self.data, '-m', 'fast', '-w',
                '-t', '30', 'stop'], 'pg_ctl.log')
        pid = self.postmaster_pid() or self.pid
        if result.returncode and pid:
            # pg_ctl made the postmaster the leader of a session of its own
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- results -----------------------------------------------------------------

class Results:
    "The samples of every figure, printed as a table and written as JSON."

    def __init__(self, path, meta):
        self.path = path
        self.figures = {}
        self.order = []
        self.ratios = []
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, 'w')
        self.write(dict(kind='meta', **meta))

    def write(self, record):
        self.file.write(json.dumps(record, default=str) + '\n')
        self.file.flush()

    def add(self, figure, n, value, unit, moto_cpu=None, rss=None,
            **extra):
        if figure not in self.figures:
            self.figures[figure] = dict(
                figure=figure, n=n, unit=unit, values=[], moto_cpu=[],
                rss=[])
            self.order.append(figure)
        entry = self.figures[figure]
        entry['values'].append(value)
        if moto_cpu is not None:
            entry['moto_cpu'].append(moto_cpu)
        if rss is not None:
            entry['rss'].append(rss)
        self.write(dict(kind='sample', figure=figure, n=n, value=value,
                unit=unit, moto_cpu_s=moto_cpu, rss_mib=rss, **extra))
        say("%-68s %10.1f %s" % (figure, value, unit))

    def median(self, figure):
        entry = self.figures.get(figure)
        if not entry or not entry['values']:
            return None
        return statistics.median(entry['values'])

    def ratio(self, name, numerator, denominator, median=None, note=None):
        """Add the ratio of two medians (or of the values given); the note
        is printed under it."""
        a = self.median(numerator) if median is None else median[0]
        b = self.median(denominator) if median is None else median[1]
        if a is None or b is None or not b:
            value = None
        else:
            value = a / b
        self.ratios.append((name, value, note))
        self.write(dict(kind='ratio', name=name, value=value,
                numerator=numerator, denominator=denominator))

    def table(self):
        lines = []
        header = ('%-68s %5s %10s %21s %-6s %13s %8s' % (
                'figure', 'N', 'median', 'min-max', 'unit',
                'moto CPU ms/msg', 'RSS MiB'))
        lines.append(header)
        lines.append('-' * len(header))
        for figure in self.order:
            e = self.figures[figure]
            values = e['values']
            cpu = ('%13.2f' % (
                    statistics.median(e['moto_cpu']) * 1000 / e['n'])
                if e['moto_cpu'] else '%13s' % '')
            rss = ('%8.0f' % statistics.median(e['rss'])
                if e['rss'] else '%8s' % '')
            lines.append('%-68s %5i %10.1f %10.1f-%-10.1f %-6s %s %s' % (
                    figure, e['n'], statistics.median(values), min(values),
                    max(values), e['unit'], cpu, rss))
        lines.append('')
        lines.append('ratios (of medians)')
        for name, value, note in self.ratios:
            lines.append('  %-66s %s' % (
                    name, 'n/a' if value is None else '%.2f' % value))
            if note:
                lines.append('      %s' % note)
        return '\n'.join(lines)

    def close(self):
        self.file.close()


def span(first, last, started):
    """Return the epoch seconds of the first and last timestamps of a drain
    that began at started (epoch seconds).

    The columns hold naive UTC, text from SQLite, datetime from PostgreSQL;
    a time zone mixed up in them would put the drain outside of the run."""
    first, last = (
        (dt.datetime.fromisoformat(v) if isinstance(v, str) else v)
        .replace(tzinfo=dt.timezone.utc).timestamp()
        for v in (first, last))
    if not started - 1 <= first <= last <= time.time() + 1:
        raise RuntimeError("drain timestamps %s to %s outside of the run "
            "(%s to now): not UTC?" % (first, last, started))
    return first, last


def percentile(values, q):
    values = sorted(values)
    index = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[index]


# --- the benchmark -----------------------------------------------------------

class Bench:

    def __init__(self, options, directory, moto, postgres, results):
        self.options = options
        self.directory = directory
        self.moto = moto
        self.postgres = postgres
        self.results = results
        self.db_path = os.path.join(directory, DATABASE + '.sqlite')
        self.connection = None
        self.secret = 'bench-%s' % uuid.uuid4().hex
        self.env = dict(os.environ, BENCH_RUN=os.path.basename(directory))
        self.config_path = self.write_config('bench')
        self.user = None
        self.sequence = 0
        self.problems = []

    # -- setup
    def write_config(self, prefix, name=None, web=None, reply_queue=None):
        """Write the configuration of a process; web is the address the
        trytond command listens on."""
        path = os.path.join(self.directory, (name or prefix) + '.conf')
        if self.postgres:
            database = 'uri = %s\n' % self.postgres.uri()
        else:
            database = 'uri = sqlite://\npath = %s\n' % self.directory
        with open(path, 'w') as fp:
            if web:
                fp.write('[web]\nlisten = %s\n\n' % web)
            fp.write('[database]\n%s\n'
                '[queue]\nworker = True\n\n'
                '[async_sqs]\nendpoint_url = %s\nregion = %s\n'
                'access_key = bench\nsecret_key = bench\nwait_time = 1\n'
                'queue_prefix = %s\nsecret = %s\n' % (
                    database, self.moto.url, REGION, prefix, self.secret))
            if reply_queue:
                fp.write('reply_queue = %s\n' % reply_queue)
        return path

    def create_database(self):
        t0 = time.monotonic()
        if self.postgres:
            self.postgres.create(DATABASE)
        else:
            open(self.db_path, 'w').close()
        password = os.path.join(self.directory, 'password')
        with open(password, 'w') as fp:
            fp.write('admin\n')
        env = dict(self.env, TRYTONPASSFILE=password)
        for args in [['--all'],
                ['-u', 'async_sqs_bench', '--activate-dependencies']]:
            result = subprocess.run(
                [os.path.join(BIN, 'trytond-admin'), '-c', self.config_path,
                    '-d', DATABASE] + args,
                input='\n', text=True, env=env, capture_output=True)
            if result.returncode:
                raise RuntimeError("trytond-admin %s failed:\n%s" % (
                        ' '.join(args),
                        (result.stdout + result.stderr)[-3000:]))
        say("database ready in %.1f s" % (time.monotonic() - t0))
        from trytond import config
        config.update_etc(self.config_path)
        from trytond.pool import Pool
        Pool.start()
        Pool(DATABASE).init()
        self.user = self.sql('SELECT id FROM res_user WHERE login = %s',
            ('admin',))[0][0]
        from trytond.transaction import Transaction
        with Transaction().start(DATABASE, self.user):
            Item = Pool().get('async_sqs.bench.item')
            self.item_id, = map(int, Item.create([{'name': 'bench'}]))

    def sql(self, query, args=()):
        """Run query on the database directly, outside of trytond.

        %s marks an argument, as for PostgreSQL; timestamps come back as
        SQLite stores them, text, and as datetime from PostgreSQL."""
        if self.postgres:
            # one connection: a new one per poll would load the server
            if self.connection is None:
                self.connection = self.postgres.connect(DATABASE)
            cursor = self.connection.execute(query, args or None)
            return cursor.fetchall() if cursor.description else []
        connection = sqlite3.connect(self.db_path, timeout=30)
        try:
            rows = connection.execute(
                query.replace('%s', '?'), args).fetchall()
            connection.commit()
            return rows
        finally:
            connection.close()

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def prefix(self):
        "Reset moto and return a queue prefix of its own."
        self.moto.reset()
        self.sequence += 1
        prefix = 'b%s' % self.sequence
        from trytond import config
        config.set('async_sqs', 'queue_prefix', prefix)
        return prefix

    def log_path(self, name):
        return os.path.join(self.directory, '%s-%s.log' % (
                name, self.sequence))

    def wait_for(self, predicate, process, what, interval=POLL_INTERVAL):
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            value = predicate()
            if value:
                return value
            if process is not None:
                process.check()
            if time.monotonic() > deadline:
                raise RuntimeError("%s: not done in %s s" % (
                        what, DRAIN_TIMEOUT))
            time.sleep(interval)

    # -- raw boto3
    def count(self, query):
        "Return the number a SELECT count(*) query gives."
        return self.sql(query)[0][0]

    def drain(self, worker, cpu0, done, n, what):
        """Wait until done() counts n tasks with the worker running, then
        stop it; return its Usage.

        Its CPU is that of the command and its children from the first task
        done to the last: the start-up (imports, pool) is left out."""
        try:
            # a finer poll: a small N may be done in a few polls
            self.wait_for(lambda: done() >= 1, worker, what,
                FIRST_POLL_INTERVAL)
            first, cpu_first = done(), process_cpu(worker.pid)

            def finished():
                count = done()
                return count if count >= n else 0
            last = self.wait_for(finished, worker, what)
            cpu = process_cpu(worker.pid) - cpu_first
            moto_cpu = self.moto.cpu() - cpu0
            rss, pss, pss_total = memory(worker.pid)
            return Usage(moto_cpu, cpu, last - first, rss, pss, pss_total)
        finally:
            worker.stop()

    def add_usage(self, figure, n, usage, memory=True):
        "Add the rows of the worker's CPU per task and of its memory."
        if usage.tasks:
            self.results.add(figure + ': worker CPU per task', usage.tasks,
                usage.cpu * 1000 / usage.tasks, 'ms')
        if not memory:
            return
        for label, value in [('RSS per process', usage.rss),
                ('PSS per process', usage.pss),
                ('PSS of all processes', usage.pss_total)]:
            if value is not None:
                self.results.add('%s: %s' % (figure, label), n, value, 'MiB')

    def boto3_client(self):
        import boto3
        from botocore.config import Config
        return boto3.session.Session(
            aws_access_key_id='bench', aws_secret_access_key='bench',
            region_name=REGION).client('sqs', endpoint_url=self.moto.url,
            config=Config(retries={'mode': 'standard', 'max_attempts': 5},
                max_pool_connections=32, tcp_keepalive=True))

    def raw_send_drain(self, n):
        self.prefix()
        client = self.boto3_client()
        url = client.create_queue(QueueName='raw-%s' % self.sequence)[
            'QueueUrl']
        body = 'x' * 400
        cpu0, t0 = self.moto.cpu(), time.perf_counter()
        for start in range(0, n, 10):
            entries = [{'Id': str(i), 'MessageBody': body}
                for i in range(min(10, n - start))]
            response = client.send_message_batch(QueueUrl=url,
                Entries=entries)
            assert not response.get('Failed'), response
        elapsed, cpu = time.perf_counter() - t0, self.moto.cpu() - cpu0
        self.results.add('raw boto3 send batch of 10', n, n / elapsed,
            'msg/s', cpu)
        received = 0
        cpu0, t0 = self.moto.cpu(), time.perf_counter()
        own0 = own_cpu()
        while received < n:
            messages = client.receive_message(QueueUrl=url,
                MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
                'Messages', [])
            if messages:
                client.delete_message_batch(QueueUrl=url, Entries=[
                        {'Id': str(i), 'ReceiptHandle': m['ReceiptHandle']}
                        for i, m in enumerate(messages)])
            received += len(messages)
        elapsed, cpu = time.perf_counter() - t0, self.moto.cpu() - cpu0
        own = own_cpu() - own0
        self.results.add('raw boto3 receive 10 + delete batch', n,
            n / elapsed, 'msg/s', cpu)
        self.results.add('raw boto3 receive 10 + delete batch: consumer CPU '
            'per message', n, own * 1000 / n, 'ms')

    def raw_round_trip(self, calls):
        self.prefix()
        client = self.boto3_client()
        request_url = client.create_queue(QueueName='raw-request')['QueueUrl']
        fixed_url = client.create_queue(QueueName='raw-reply')['QueueUrl']
        # the responder is a process of its own, as a worker is
        responder = subprocess.Popen([sys.executable, '-c', RESPONDER,
                self.moto.url, request_url], env=self.env,
            start_new_session=True)
        try:
            for name, fresh in [('fresh UUID queue', True),
                    ('fixed queue', False)]:
                durations = []
                cpu0 = self.moto.cpu()
                for _ in range(calls):
                    t0 = time.perf_counter()
                    if fresh:
                        reply_url = client.create_queue(
                            QueueName='raw-reply-%s' % uuid.uuid4().hex)[
                            'QueueUrl']
                    else:
                        reply_url = fixed_url
                    client.send_message(QueueUrl=request_url,
                        MessageBody=json.dumps({'reply': reply_url}))
                    while True:
                        messages = client.receive_message(QueueUrl=reply_url,
                            MaxNumberOfMessages=1, WaitTimeSeconds=20).get(
                            'Messages', [])
                        if messages:
                            break
                    if fresh:
                        client.delete_queue(QueueUrl=reply_url)
                    else:
                        client.delete_message(QueueUrl=reply_url,
                            ReceiptHandle=messages[0]['ReceiptHandle'])
                    durations.append((time.perf_counter() - t0) * 1000)
                cpu = self.moto.cpu() - cpu0
                self.results.add('raw boto3 round trip, %s p50' % name,
                    calls, percentile(durations, 0.5), 'ms', cpu)
        finally:
            responder.terminate()
            responder.wait(10)

    # -- async_sqs
    def defer_noops(self, n, queues=(None,), method='noop'):
        """Defer n no-op calls in one transaction, in turn to each of the
        queues named (None: the default queue); return the seconds taken.

        method noop_packed lets ten calls share a message."""
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        self.sql('DELETE FROM async_sqs_task')
        t0 = time.perf_counter()
        with Transaction().start(DATABASE, self.user):
            Item = Pool().get('async_sqs.bench.item')
            noop = getattr(Item, method)
            handles = [noop.defer(_queue_=queues[i % len(queues)])
                for i in range(n)]
        elapsed = time.perf_counter() - t0
        states = {h.state for h in handles}
        if states != {'sent'}:
            raise RuntimeError("deferred calls not all sent: %s" % states)
        return elapsed

    def async_enqueue(self, n, queues=(None,), label='', method='noop'):
        self.prefix()
        cpu0 = self.moto.cpu()
        elapsed = self.defer_noops(n, queues, method)
        self.results.add('async_sqs enqueue (defer + commit)' + label, n,
            n / elapsed, 'msg/s' if method == 'noop' else 'task/s',
            self.moto.cpu() - cpu0)

    def async_worker(self, prefix, processes, queues=(None,)):
        config_path = self.write_config(prefix, 'worker-%s' % prefix)
        listen = []
        for name in filter(None, queues):
            listen += ['--queue', name]
        return Process([os.path.join(BIN, 'trytond-async-worker'),
                '-c', config_path, '-d', DATABASE, '-n', str(processes)]
            + listen, self.log_path('async-worker'), env=self.env)

    def async_drain(self, n, processes, queues=(None,), label='',
            method='noop'):
        prefix = self.prefix()
        self.defer_noops(n, queues, method)
        cpu0 = self.moto.cpu()
        worker = self.async_worker(prefix, processes, queues)
        usage = self.drain(worker, cpu0, lambda: self.count(
                "SELECT count(*) FROM async_sqs_task "
                "WHERE state IN ('done', 'failed')"), n, 'async_sqs drain')
        (first, last, failed), = self.sql(
            "SELECT min(started_at), max(finished_at), "
            "count(CASE WHEN state = 'failed' THEN 1 END) "
            "FROM async_sqs_task")
        if failed:
            say("%s call(s) failed, see %s" % (failed, worker.log_path))
        first, last = span(first, last, worker.started)
        figure = 'async_sqs drain -n %s%s' % (processes, label)
        self.results.add(figure, n, n / (last - first), 'task/s',
            usage.moto_cpu, usage.rss)
        self.results.add(figure + ' incl. start-up', n,
            n / (last - worker.started), 'task/s', usage.moto_cpu, usage.rss)
        # the memory of a process is the same with calls packed
        self.add_usage(figure, n, usage, memory=not label)

    def async_full(self):
        """The enqueue and drain -n 2 of N=2000 over 4 queues of 500, each
        next to the same at 500 in one queue: one depth profile."""
        queues = ['full%s' % i for i in range(FULL_QUEUES)]
        one = ' (1 queue x %s)' % QUEUE_DEPTH
        many = ' (%s queues x %s)' % (FULL_QUEUES, QUEUE_DEPTH)
        self.async_enqueue(QUEUE_DEPTH, label=one)
        self.async_enqueue(QUEUE_DEPTH * FULL_QUEUES, queues, label=many)
        self.async_drain(QUEUE_DEPTH, 2, label=one)
        self.async_drain(QUEUE_DEPTH * FULL_QUEUES, 2, queues, label=many)

    def async_wait(self, calls):
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        prefix = self.prefix()
        worker = self.async_worker(prefix, 1)
        try:
            # a first call, not counted, waits for the worker to start
            with Transaction().start(DATABASE, self.user):
                Item = Pool().get('async_sqs.bench.item')
                handle = Item.answer.defer(-1)
            handle.wait(120)
            durations = []
            cpu0 = self.moto.cpu()
            for i in range(calls):
                t0 = time.perf_counter()
                with Transaction().start(DATABASE, self.user):
                    Item = Pool().get('async_sqs.bench.item')
                    handle = Item.answer.defer(i)
                result = handle.wait(60)
                durations.append((time.perf_counter() - t0) * 1000)
                assert result == i, (result, i)
            cpu = self.moto.cpu() - cpu0
        finally:
            worker.stop()
        self.results.add('async_sqs defer().wait() p50', calls,
            percentile(durations, 0.5), 'ms', cpu)
        self.results.add('async_sqs defer().wait() p95', calls,
            percentile(durations, 0.95), 'ms', cpu)

    def async_awaits(self, n, mode):
        """Await n results in one event loop, in the mode: task, process
        or executor (a thread per waiter)."""
        import asyncio

        from trytond import config
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        prefix = self.prefix()
        config.set('async_sqs', 'reply_queue',
            'task' if mode == 'executor' else mode)
        worker = self.async_worker(prefix, 2)

        def defer(values, slow=0):
            with Transaction().start(DATABASE, self.user):
                Item = Pool().get('async_sqs.bench.item')
                return ([Item.answer_late.defer(0.5, -1) for _ in range(slow)]
                    + [Item.answer.defer(v) for v in values])

        async def main(handles):
            loop = asyncio.get_running_loop()
            order, lags = [], []

            async def one(handle):
                if mode == 'executor':
                    value = await loop.run_in_executor(None, handle.wait)
                else:
                    value = await handle
                order.append(value)

            async def ticker():
                while True:
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.01)
                    lags.append(time.perf_counter() - t0 - 0.01)
            ticking = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            await asyncio.gather(*map(one, handles))
            elapsed = time.perf_counter() - t0
            ticking.cancel()
            return elapsed, order, lags
        try:
            # the first await waits for the worker and makes the queues
            asyncio.run(main(defer([-2])))
            cpu0 = self.moto.cpu()
            elapsed, order, lags = asyncio.run(main(defer(range(n), 5)))
            cpu = self.moto.cpu() - cpu0
        finally:
            worker.stop()
            config.set('async_sqs', 'reply_queue', '')
        label = {
            'task': 'reply_queue = task',
            'process': 'reply_queue = process',
            'executor': 'thread per waiter (before)',
            }[mode]
        self.results.add('async_sqs %s awaits, %s' % (n, label), n,
            n / elapsed, 'task/s', cpu)
        self.results.add('async_sqs %s awaits, %s: loop lag p95' % (
                n, label), n, percentile(lags or [0], 0.95) * 1000, 'ms')
        self.results.add('async_sqs %s awaits, %s: loop lag max' % (
                n, label), n, max(lags or [0]) * 1000, 'ms')

    # -- profile
    def profile(self, n, method='noop', top=PROFILE_TOP):
        """Drain n deferred calls with a worker process run here, each of its
        threads under a cProfile of its own CPU time (time.thread_time);
        print where each thread spent it."""
        import cProfile
        import pstats
        import threading

        from trytond.modules.async_sqs.process import WorkerProcess
        self.prefix()
        self.defer_noops(n, method=method)
        worker = WorkerProcess([DATABASE])

        def stop_when_done():
            while self.count("SELECT count(*) FROM async_sqs_task "
                    "WHERE state IN ('done', 'failed')") < n:
                time.sleep(POLL_INTERVAL)
            worker.stop()
        stopper = threading.Thread(target=stop_when_done, daemon=True)
        stopper.start()
        profiles = []
        run = threading.Thread.run

        def profiled(thread):
            profile = cProfile.Profile(time.thread_time)
            profiles.append((thread, profile))
            profile.runcall(run, thread)
        main = cProfile.Profile(time.thread_time)
        profiles.append((None, main))
        threading.Thread.run = profiled
        cpu0, t0 = own_cpu(), time.perf_counter()
        try:
            main.runcall(worker.run)
        finally:
            threading.Thread.run = run
        elapsed, cpu = time.perf_counter() - t0, own_cpu() - cpu0
        (done,), = self.sql("SELECT count(*) FROM async_sqs_task "
            "WHERE state = 'done'")
        say("profile: %s calls done in %.1f s, %.2f ms of CPU per call "
            "under the profiler (this process: the worker and the count "
            "of the rows)" % (done, elapsed, cpu * 1000 / n))
        # a thread still running (trytond's status dumper) would be read
        # with this thread's clock: left out
        for thread, _ in profiles:
            if thread is not None and thread.is_alive():
                say("profile: thread %s still runs, left out" % thread.name)
        profiles = [(t.name if t else 'main (runs the calls)', p)
            for t, p in profiles if t is None or not t.is_alive()]
        totals = {}
        for name, profile in profiles:
            totals[name] = pstats.Stats(profile).total_tt
        whole = sum(totals.values()) or 1
        for name, profile in profiles:
            print()
            print("== thread %s: %.0f ms of CPU, %.2f ms per call, %.0f %% of "
                "the threads'" % (name, totals[name] * 1000,
                    totals[name] * 1000 / n, totals[name] * 100 / whole))
            stats = pstats.Stats(profile)
            stats.sort_stats('tottime').print_stats(top)
            if profile is main:
                stats.sort_stats('cumulative').print_stats(top)

    # -- ir.queue
    def queue_enqueue(self, n):
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        self.sql('DELETE FROM ir_queue')
        t0 = time.perf_counter()
        with Transaction().start(DATABASE, self.user):
            Item = Pool().get('async_sqs.bench.item')
            item = Item(self.item_id)
            for _ in range(n):
                Item.__queue__.queue_noop([item])
        return time.perf_counter() - t0

    def queue_drain(self, n, processes=2):
        elapsed = self.queue_enqueue(n)
        self.results.add('ir.queue enqueue (__queue__ + commit)', n,
            n / elapsed, 'task/s')
        if not self.postgres:
            # trytond-worker selects on the connection's socket: SQLite has
            # none (ValueError: Invalid file object)
            if not self.options.quick or self.sequence < 2:
                say("SKIPPED trytond-worker drain: it needs --db postgresql")
            return
        worker = Process([os.path.join(BIN, 'trytond-worker'),
                '-c', self.config_path, '-d', DATABASE, '-n', str(processes)],
            self.log_path('trytond-worker'), env=self.env)
        usage = self.drain(worker, self.moto.cpu(), lambda: self.count(
                "SELECT count(*) FROM ir_queue "
                "WHERE finished_at IS NOT NULL"), n, 'ir.queue drain')
        # dequeued_at is the server's CURRENT_TIMESTAMP, finished_at the
        # worker's datetime.now(): both UTC, as trytond sets TZ=UTC in each
        # process and PGTZ from it, and span() checks it
        (first, last), = self.sql(
            "SELECT min(dequeued_at), max(finished_at) FROM ir_queue")
        first, last = span(first, last, worker.started)
        figure = 'ir.queue trytond-worker -n %s' % processes
        self.results.add(figure, n, n / (last - first), 'task/s',
            rss=usage.rss)
        self.results.add(figure + ' incl. start-up', n,
            n / (last - worker.started), 'task/s', rss=usage.rss)
        self.add_usage(figure, n, usage)

    # -- Celery
    def celery_env(self):
        return dict(self.env,
            BENCH_BROKER='sqs://bench:bench@127.0.0.1:%s' % self.moto.port,
            BENCH_DONE_FILE=os.path.join(
                self.directory, 'celery-%s.done' % self.sequence),
            PYTHONPATH=HERE)

    def celery(self, n, processes=2):
        self.prefix()
        env = self.celery_env()
        # apply_async in a process of its own: Celery reads its environment
        # at import
        cpu0 = self.moto.cpu()
        result = subprocess.run([sys.executable, '-c', CELERY_SEND, str(n)],
            env=env, capture_output=True, text=True, cwd=HERE)
        if result.returncode:
            raise RuntimeError("celery apply_async failed:\n%s"
                % (result.stdout + result.stderr)[-3000:])
        elapsed = float(result.stdout.split()[-1])
        self.results.add('Celery apply_async', n, n / elapsed, 'task/s',
            self.moto.cpu() - cpu0)
        done_file = env['BENCH_DONE_FILE']
        cpu0 = self.moto.cpu()
        worker = Process([sys.executable, '-m', 'celery', '-A', 'celery_bench',
                'worker', '-P', 'prefork', '-c', str(processes),
                '--without-gossip', '--without-mingle', '--without-heartbeat',
                '-l', 'warning'], self.log_path('celery'), env=env, cwd=HERE)

        def done():
            try:
                with open(done_file) as fp:
                    return fp.read().count('\n')
            except FileNotFoundError:
                return 0
        usage = self.drain(worker, cpu0, done, n, 'Celery drain')
        with open(done_file) as fp:
            times = [tuple(map(float, line.split())) for line in fp]
        first = min(t[0] for t in times)
        last = max(t[1] for t in times)
        figure = 'Celery worker prefork -c %s' % processes
        self.results.add(figure, n, n / (last - first), 'task/s',
            usage.moto_cpu, usage.rss)
        self.results.add(figure + ' incl. start-up', n,
            n / (last - worker.started), 'task/s', usage.moto_cpu, usage.rss)
        self.add_usage(figure, n, usage)

    # -- HTTP routes
    def create_keys(self):
        """Create a validated user application key of the admin user for
        async_sqs and one for rest; return them by application."""
        from trytond.pool import Pool
        from trytond.transaction import Transaction
        with Transaction().start(DATABASE, 0):
            Application = Pool().get('res.user.application')
            applications = Application.create([
                    {'user': self.user, 'application': name,
                        'state': 'validated'}
                    for name in ('async_sqs', 'rest')])
            return {a.application: a.key for a in applications}

    def http_server(self, prefix, reply_queue=None):
        "Start the trytond command on a free port; wait until it answers."
        for _ in range(3):
            port = free_port()
            config_path = self.write_config(prefix, 'server-%s-%s' % (
                    prefix, reply_queue or 'task'),
                web='127.0.0.1:%s' % port, reply_queue=reply_queue)
            # no -v: the log holds the errors, with their tracebacks, and
            # not a line per request
            server = Process([os.path.join(BIN, 'trytond'),
                    '-c', config_path, '-d', DATABASE],
                self.log_path('trytond-%s' % (reply_queue or 'task')),
                env=self.env)
            url = 'http://127.0.0.1:%s' % port
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(url + '/', timeout=1).read()
                    return server, url
                except urllib.error.HTTPError:
                    # any answer is an answer: it listens
                    return server, url
                except OSError:
                    if server.process.poll() is not None:
                        break
                    time.sleep(0.1)
            server.stop()
        raise RuntimeError("trytond did not start:\n%s" % (
                server.output()[-3000:]))

    def ab(self, url, body, key, n, concurrency):
        """Run ab's POST load on url; return its figures.

        -l: the length of an answer varies (its timestamps), which is no
        failure; -s: a waiting request may take longer than ab's 30 s; -r:
        a socket error counts, it does not stop the run."""
        body_path = os.path.join(self.directory, 'body-%s.json' % (
                self.sequence))
        with open(body_path, 'w') as fp:
            json.dump(body, fp)
        command = [ab_path(), '-n', str(n), '-c', str(concurrency), '-l',
            '-r', '-s', str(AB_TIMEOUT), '-p', body_path,
            '-T', 'application/json', '-H', 'Authorization: bearer %s' % key,
            url]
        result = subprocess.run(command, stdin=subprocess.DEVNULL,
            capture_output=True, text=True)
        with open(self.log_path('ab'), 'w') as fp:
            fp.write(result.stdout + result.stderr)
        figures = parse_ab(result.stdout)
        if result.returncode or figures is None:
            raise RuntimeError("ab failed (%s):\n%s" % (result.returncode,
                    (result.stdout + result.stderr)[-3000:]))
        return figures

    def http_run(self, name, url, body, key, server, worker=None):
        """Run the load of one route; add its figures; check that every
        accepted call ran once and that no log holds a traceback."""
        n, concurrency = self.options.n, self.options.concurrency
        if worker is not None:
            self.sql('DELETE FROM async_sqs_task')
        self.sequence += 1
        cpu0, server_cpu0 = self.moto.cpu(), process_cpu(server.pid)
        log_start = len(server.output())
        worker_start = len(worker.output()) if worker is not None else 0
        started = time.time()
        figures = self.ab(url, body, key, n, concurrency)
        server_cpu = process_cpu(server.pid) - server_cpu0
        statuses = status_counts(server.output()[log_start:])
        say("%s: statuses in the server log %s" % (name, ', '.join(
                    '%s x %s' % (count, status)
                    for status, count in sorted(statuses.items()))))
        say("%s: %s complete, %s failed, %s non-2xx in %.1f s; server "
            "CPU %.1f ms/request" % (name, figures['complete'],
                figures['failed'], figures['non_2xx'], figures['seconds'],
                server_cpu * 1000 / n))
        accepted = figures['complete'] - figures['failed'] - figures[
            'non_2xx']
        drained = None
        if worker is not None:
            drained = self.http_check(name, accepted, worker, started)
        cpu = self.moto.cpu() - cpu0
        extra = dict(complete=figures['complete'], failed=figures['failed'],
            non_2xx=figures['non_2xx'], concurrency=concurrency,
            server_cpu_s=server_cpu, statuses=statuses)
        self.results.add('%s requests/s' % name, n, figures['rps'],
            'req/s', cpu, **extra)
        self.results.add('%s failed + non-2xx' % name, n,
            figures['failed'] + figures['non_2xx'], 'req', **extra)
        for q in (50, 95):
            self.results.add('%s p%s' % (name, q), n, figures['p%s' % q],
                'ms', cpu, **extra)
        if drained is not None:
            self.results.add('%s, all calls done' % name, accepted, drained,
                'task/s')
        if '?wait=' in url:
            # ab counts a 202, the call not ended in time, as a success
            self.results.add('%s answered 200, with the result' % name, n,
                statuses.get(200, 0), 'req', **extra)
        if figures['failed'] or figures['non_2xx']:
            self.problem("%s: %s failed and %s non-2xx requests, see %s"
                % (name, figures['failed'], figures['non_2xx'],
                    self.log_path('ab')))
        for process, start in [(server, log_start), (worker, worker_start)]:
            if process is None:
                continue
            process.check()
            # the logs are the whole run's: this route's part
            if 'Traceback' in process.output()[start:]:
                self.problem("%s: a traceback in %s" % (
                        name, process.log_path))

    def http_check(self, name, accepted, worker, started):
        """Wait for the accepted calls to end; check each ran once.

        Return the rate of the calls from the start of the load to the
        end of the last one."""
        try:
            self.wait_for(lambda: self.count(
                    "SELECT count(*) FROM async_sqs_task "
                    "WHERE state IN ('done', 'failed', 'cancelled')")
                >= accepted, worker, '%s drain' % name)
        except RuntimeError as exc:
            self.problem(str(exc))
        (rows, done, again, last), = self.sql(
            "SELECT count(*), count(CASE WHEN state = 'done' THEN 1 END), "
            "count(CASE WHEN attempts > 1 THEN 1 END), max(finished_at) "
            "FROM async_sqs_task")
        # a second attempt is no second run: the claim of the first may
        # have failed, and the row lock and 'done' make a repeat a no-op
        say("%s: %s accepted, %s rows, %s done, %s claimed more than once"
            % (name, accepted, rows, done, again))
        if not rows == done == accepted:
            self.problem("%s: %s accepted calls, but %s rows and %s done"
                % (name, accepted, rows, done))
        if last is None:
            return None
        _, last = span(last, last, started)
        return accepted / (last - started)

    def problem(self, text):
        say("CHECK FAILED: %s" % text)
        self.problems.append(text)
        self.results.write(dict(kind='problem', text=text))

    def http(self):
        """ab against the fire-and-forget route, its ?wait= and trytond's
        REST route, served by the trytond command beside a worker; and
        the ?wait= again, served by a trytond command whose reply_queue is
        process."""
        keys = self.create_keys()
        prefix = self.prefix()
        server, url = self.http_server(prefix)
        try:
            # another trytond command: the reply queue is the process's
            process_server, process_url = self.http_server(prefix, 'process')
        except Exception:
            server.stop()
            raise
        worker = self.async_worker(prefix, HTTP_WORKERS)
        try:
            for each in (url, process_url):
                # a first call, not counted, waits for the worker to start
                # and opens the queues
                request = urllib.request.Request(
                    '%s/%s/async_sqs/model/%s/answer?wait=120' % (
                        each, DATABASE, ITEM), data=b'{"value": 0}',
                    headers={
                        'Authorization': 'bearer %s' % keys['async_sqs'],
                        'Content-Type': 'application/json'})
                urllib.request.urlopen(request, timeout=130).read()
            base = '%s/%s/async_sqs/model/%s' % (url, DATABASE, ITEM)
            process_base = '%s/%s/async_sqs/model/%s' % (
                process_url, DATABASE, ITEM)
            for r in range(self.options.repeat):
                say("HTTP repeat %s/%s, -n %s -c %s" % (r + 1,
                        self.options.repeat, self.options.n,
                        self.options.concurrency))
                self.http_run(HTTP_FIRE, base + '/noop', {},
                    keys['async_sqs'], server, worker)
                self.http_run(HTTP_WAIT, base + '/answer?wait=%s' % (
                        HTTP_WAIT_SECONDS), {'value': 1}, keys['async_sqs'],
                    server, worker)
                self.http_run(HTTP_WAIT_PROCESS,
                    process_base + '/answer?wait=%s' % HTTP_WAIT_SECONDS,
                    {'value': 1}, keys['async_sqs'], process_server, worker)
                self.http_run(HTTP_REST, '%s/%s/rest/model/%s/answer' % (
                        url, DATABASE, ITEM), {'value': 1}, keys['rest'],
                    server)
        finally:
            worker.stop()
            server.stop()
            process_server.stop()


RESPONDER = r'''
import json, sys, boto3
from botocore.config import Config
endpoint, request_url = sys.argv[1:]
client = boto3.session.Session(aws_access_key_id='bench',
    aws_secret_access_key='bench', region_name='us-east-1').client('sqs',
    endpoint_url=endpoint, config=Config(
        retries={'mode': 'standard', 'max_attempts': 5}, tcp_keepalive=True))
while True:
    for m in client.receive_message(QueueUrl=request_url,
            MaxNumberOfMessages=10, WaitTimeSeconds=20).get('Messages', []):
        client.send_message(QueueUrl=json.loads(m['Body'])['reply'],
            MessageBody='ok')
        client.delete_message(QueueUrl=request_url,
            ReceiptHandle=m['ReceiptHandle'])
'''

CELERY_SEND = r'''
import sys, time
from celery_bench import noop
n = int(sys.argv[1])
noop.apply_async()  # connects and creates the queue, not counted
t0 = time.perf_counter()
for _ in range(n - 1):
    noop.apply_async()
print(time.perf_counter() - t0)
'''


def celery_missing():
    "Return why the Celery peer cannot run here, or None."
    try:
        import celery  # noqa: F401
        import kombu  # noqa: F401
        import pycurl  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def run(options, directory, results):
    moto = Moto(directory)
    postgres = bench = None
    try:
        if options.db == 'postgresql':
            postgres = Postgres(directory)
            say("PostgreSQL on port %s" % postgres.port)
        bench = Bench(options, directory, moto, postgres, results)
        bench.create_database()
        if options.profile:
            bench.profile(options.n,
                method='noop_packed' if options.packed else 'noop')
            return bench.problems
        if options.http:
            bench.http()
            add_http_ratios(results)
            return bench.problems
        n, repeat = options.n, options.repeat
        missing = None if not options.no_peers else "--no-peers"
        if missing is None:
            missing = celery_missing()
            if missing:
                if not options.quick:
                    raise RuntimeError("the Celery peer cannot run (%s): "
                        "use bash bench/run, or --quick or --no-peers"
                        % missing)
                say("SKIPPED Celery: not installed here (%s)" % missing)
        elif options.no_peers:
            say("SKIPPED ir.queue and Celery: --no-peers")
        for r in range(repeat):
            say("repeat %s/%s" % (r + 1, repeat))
            if options.awaits:
                for mode in ('task', 'process', 'executor'):
                    bench.async_awaits(n, mode)
                continue
            bench.raw_send_drain(n)
            bench.raw_round_trip(options.calls)
            bench.async_enqueue(n)
            for processes in (1, 2, 4):
                bench.async_drain(n, processes)
            bench.async_enqueue(n, label=PACKED, method='noop_packed')
            bench.async_drain(n, 2, label=PACKED, method='noop_packed')
            if options.full:
                bench.async_full()
            bench.async_wait(options.calls)
            if not options.no_peers:
                bench.queue_drain(n)
                if missing is None:
                    bench.celery(n)
    finally:
        if bench is not None:
            bench.close()
        if postgres is not None:
            postgres.stop()
        moto.stop()
    if not (options.awaits or options.profile):
        add_ratios(results, options)
    return bench.problems


def add_http_ratios(results):
    "Add the seed's figures to the table and the ratios of --http."
    r = results.ratio
    results.add('seed: Tornado + Celery fire-and-forget, no database', 1000,
        SEED_FIRE, 'req/s', published=True)
    results.add('seed: Tornado + Celery waiting, no database', 1000,
        SEED_WAIT, 'req/s', published=True)
    fire, wait, rest = ('%s requests/s' % name
        for name in (HTTP_FIRE, HTTP_WAIT, HTTP_REST))
    r('fire-and-forget / seed %s' % SEED_FIRE, fire,
        'seed: Tornado + Celery fire-and-forget, no database')
    r('?wait / seed %s' % SEED_WAIT, wait,
        'seed: Tornado + Celery waiting, no database')
    r('fire-and-forget / REST run in the request', fire, rest)
    r('?wait / REST run in the request', wait, rest)
    r('?wait, reply_queue = process / reply_queue = task',
        '%s requests/s' % HTTP_WAIT_PROCESS, wait)


def add_ratios(results, options):
    r = results.ratio
    r('async_sqs enqueue / raw send', 'async_sqs enqueue (defer + commit)',
        'raw boto3 send batch of 10')
    r('async_sqs enqueue / Celery apply_async',
        'async_sqs enqueue (defer + commit)', 'Celery apply_async')
    r('async_sqs enqueue / ir.queue enqueue',
        'async_sqs enqueue (defer + commit)',
        'ir.queue enqueue (__queue__ + commit)')
    r('drain -n 2 / raw receive+delete', 'async_sqs drain -n 2',
        'raw boto3 receive 10 + delete batch')
    r('drain -n 2 / trytond-worker -n 2 (incl. start-up both)',
        'async_sqs drain -n 2 incl. start-up',
        'ir.queue trytond-worker -n 2 incl. start-up')
    r('drain -n 2 / trytond-worker -n 2', 'async_sqs drain -n 2',
        'ir.queue trytond-worker -n 2')
    r('drain -n 2 / Celery prefork -c 2', 'async_sqs drain -n 2',
        'Celery worker prefork -c 2')
    r('drain -n 4 / drain -n 1', 'async_sqs drain -n 4',
        'async_sqs drain -n 1')
    r('wait p50 / raw UUID round trip p50', 'async_sqs defer().wait() p50',
        'raw boto3 round trip, fresh UUID queue p50')
    enqueue = 'async_sqs enqueue (defer + commit)'
    r('enqueue%s / Celery apply_async' % PACKED, enqueue + PACKED,
        'Celery apply_async')
    r('drain -n 2%s / Celery prefork -c 2' % PACKED,
        'async_sqs drain -n 2' + PACKED, 'Celery worker prefork -c 2')
    r('drain -n 2%s / trytond-worker -n 2' % PACKED,
        'async_sqs drain -n 2' + PACKED, 'ir.queue trytond-worker -n 2')
    r('drain -n 2%s / raw receive+delete' % PACKED,
        'async_sqs drain -n 2' + PACKED,
        'raw boto3 receive 10 + delete batch')
    if options.full:
        one = ' (1 queue x %s)' % QUEUE_DEPTH
        many = ' (%s queues x %s)' % (FULL_QUEUES, QUEUE_DEPTH)
        # a cost is the inverse of a rate
        for name, figure in [
                ('cost per task N=%s / N=%s (drain -n 2)',
                    'async_sqs drain -n 2'),
                ('cost per call N=%s / N=%s (enqueue)',
                    'async_sqs enqueue (defer + commit)')]:
            r(name % (QUEUE_DEPTH * FULL_QUEUES, QUEUE_DEPTH),
                figure + one, figure + many,
                note="rate of '%s' / rate of '%s'" % (
                    figure + one, figure + many))
    drain = 'async_sqs drain -n 2'
    peers = [('trytond-worker', 'ir.queue trytond-worker -n 2'),
        ('Celery prefork', 'Celery worker prefork -c 2')]
    for label in ('RSS per process', 'PSS per process',
            'PSS of all processes'):
        for name, peer in peers:
            r('worker %s / %s' % (label, name), '%s: %s' % (drain, label),
                '%s: %s' % (peer, label))
    cpu = ': worker CPU per task'
    r('worker CPU per task / raw boto3 consumer', drain + cpu,
        'raw boto3 receive 10 + delete batch: consumer CPU per message')
    for name, peer in peers:
        r('worker CPU per task / %s' % name, drain + cpu, peer + cpu)
    r('worker CPU per task%s / Celery prefork' % PACKED,
        drain + PACKED + cpu, 'Celery worker prefork -c 2' + cpu)


def terminate(signum, frame):
    # the finally clauses stop what was started
    raise SystemExit(128 + signum)


def main(argv=None):
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    clean_environ()
    link_module()
    import trytond
    stamp = dt.datetime.now().strftime('%Y%m%d-%H%M%S')
    meta = dict(started=stamp, argv=sys.argv[1:] if argv is None else argv,
        nproc=os.cpu_count(), python=platform.python_version(),
        trytond=trytond.__version__, machine=platform.platform(),
        n=options.n, repeat=options.repeat, calls=options.calls,
        db=options.db)
    results = Results(
        os.path.join(options.results, '%s.jsonl' % stamp), meta)
    say("N=%(n)s, %(repeat)s repeat(s), %(calls)s round trips; "
        "python %(python)s, trytond %(trytond)s, %(nproc)s CPU(s)" % meta)
    t0 = time.monotonic()
    directory = tempfile.mkdtemp(prefix='async_sqs_bench.')
    problems = []
    try:
        problems = run(options, directory, results)
    finally:
        results.close()
        if os.environ.get('BENCH_KEEP'):
            say("kept %s" % directory)
        else:
            subprocess.run(['rm', '-rf', directory])
    print()
    print(results.table())
    print()
    say("done in %.0f s; samples in %s" % (
            time.monotonic() - t0, results.path))
    for text in problems:
        say("CHECK FAILED: %s" % text)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
