# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The test harness: a moto server in server mode, a database, workers.

moto runs as its own process on 127.0.0.1 and is reached over HTTP like
SQS; the database is the one of TRYTOND_DATABASE_URI and DB_NAME (a file
for SQLite, since workers are separate processes); every test gets its own
queue prefix, so that no test sees another's messages."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

import trytond

BIN = os.path.dirname(sys.executable)
#: Tests that do the same on every trytond series run on the newest series
#: the test command runs (it says which), to keep the whole suite short.
newest_series_only = pytest.mark.skipif(
    os.environ.get('ASYNC_SQS_NEWEST_SERIES', trytond.__series__)
    != trytond.__series__,
    reason="the same on every trytond series: run on the newest one")
REGION = 'us-east-1'
#: The signing key of the tests: each run its own.
SECRET = 'test-signing-key-%s' % uuid.uuid4().hex


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def start_moto():
    port = free_port()
    log = tempfile.NamedTemporaryFile(
        prefix='moto-', suffix='.log', delete=False)
    process = subprocess.Popen(
        [os.path.join(BIN, 'moto_server'), '-H', '127.0.0.1', '-p', str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = 'http://127.0.0.1:%s' % port
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + '/moto-api/', timeout=1).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start, see %s"
                    % log.name)
            time.sleep(0.1)
    log.close()
    return process, url, log.name


MOTO, ENDPOINT, MOTO_LOG = start_moto()
# trytond reads TRYTOND_<SECTION>__<OPTION> when its config is first imported
os.environ.update({
        'TRYTOND_ASYNC_SQS__ENDPOINT_URL': ENDPOINT,
        'TRYTOND_ASYNC_SQS__REGION': REGION,
        'TRYTOND_ASYNC_SQS__ACCESS_KEY': 'testing',
        'TRYTOND_ASYNC_SQS__SECRET_KEY': 'testing-secret',
        'TRYTOND_ASYNC_SQS__WAIT_TIME': '1',
        'TRYTOND_ASYNC_SQS__SECRET': SECRET,
        'AWS_EC2_METADATA_DISABLED': 'true',
        })


def pytest_unconfigure(config):
    from trytond.modules.async_sqs.listener import close_listeners

    # the reply queue of this process, before the server goes
    close_listeners()
    if MOTO.poll() is None:
        os.killpg(MOTO.pid, signal.SIGTERM)
        MOTO.wait(10)
    try:
        os.unlink(MOTO_LOG)
    except FileNotFoundError:
        pass


@pytest.fixture
def database():
    """Return the name of the test database with async_sqs_test activated.

    Per test, because trytond's ModuleTestCase drops the database when it
    ends: activating again is quick when nothing is missing."""
    from trytond.tests.test_tryton import DB_NAME, activate_module
    activate_module(['async_sqs', 'async_sqs_test'])
    return DB_NAME


@pytest.fixture
def prefix():
    "Give the test a queue prefix of its own, here and in its workers."
    from trytond import config
    value = 'test%s' % uuid.uuid4().hex[:10]
    config.set('async_sqs', 'queue_prefix', value)
    yield value
    config.set('async_sqs', 'queue_prefix', '')


def write_config(path, prefix, options=None, head=''):
    """Write a trytond.conf at path whose [async_sqs] section reaches the
    test's moto server and queues, with options over it (None: left out),
    after head."""
    values = {
        'endpoint_url': ENDPOINT,
        'region': REGION,
        'access_key': 'testing',
        'secret_key': 'testing-secret',
        'queue_prefix': prefix,
        'wait_time': '1',
        'secret': SECRET,
        }
    values.update(options or {})
    with open(path, 'w') as fp:
        fp.write(head)
        fp.write('[async_sqs]\n')
        for key, value in values.items():
            if value is not None:
                # a value of several lines goes on indented lines
                fp.write('%s = %s\n' % (key, str(value).replace(
                            '\n', '\n    ')))


class Worker:
    "A trytond-async-worker process started by a test."

    def __init__(self, database, prefix, processes=1, queues=(),
            options=None, args=()):
        self.directory = tempfile.mkdtemp(prefix='async-worker-')
        self.config_path = os.path.join(self.directory, 'trytond.conf')
        write_config(self.config_path, prefix, options)
        self.log_path = os.path.join(self.directory, 'worker.log')
        # the log once the worker ended and its directory is removed
        self.final_output = None
        command = [os.path.join(BIN, 'trytond-async-worker'),
            '-c', self.config_path, '-d', database, '-n', str(processes),
            '-vv']
        for queue in queues:
            command += ['--queue', queue]
        command += list(args)
        self.log = open(self.log_path, 'w')
        self.process = subprocess.Popen(command, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        "Return the log of the worker, kept once its directory is removed."
        if self.final_output is not None:
            return self.final_output
        with open(self.log_path) as fp:
            return fp.read()

    def wait_for_log(self, text, timeout=60):
        "Wait until text appears in the worker's log."
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise AssertionError(
                    "%r not in worker log:\n%s" % (text, self.output()))
            if self.process.poll() is not None:
                raise AssertionError(
                    "worker exited with %s:\n%s" % (
                        self.process.returncode, self.output()))
            time.sleep(0.05)

    def ready(self, count=1, timeout=60):
        "Wait until count processes listen."
        deadline = time.monotonic() + timeout
        while self.output().count('ready, pid') < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    "worker not ready:\n%s" % self.output())
            time.sleep(0.05)
        return self

    def terminate(self, timeout=60):
        "SIGTERM, then wait for the exit; return the exit code."
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        if self.final_output is None:
            self.final_output = self.output()
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def start_worker(database, prefix):
    "Return a function that starts a worker on the test's queues."
    workers = []

    def start(processes=1, queues=(), options=None, args=(), ready=True,
            queue_prefix=None):
        worker = Worker(database, queue_prefix or prefix,
            processes=processes, queues=queues, options=options, args=args)
        workers.append(worker)
        if ready:
            worker.ready(count=processes)
        return worker
    yield start
    for worker in workers:
        worker.kill()
        # shown by pytest when the test fails
        print("--- worker log %s\n%s" % (worker.log_path, worker.output()))


def items(database, name):
    "Return (name, value) of the test items of that name, read afresh."
    from trytond.pool import Pool
    from trytond.transaction import Transaction
    with Transaction(new=True).start(database, 0, readonly=True):
        Item = Pool().get('async_sqs.test.item')
        return [(i.name, i.value) for i in Item.search([('name', '=', name)])]


def dead_letters(queue_name, count):
    "Return the bodies of count messages of the dead-letter queue."
    from trytond.modules.async_sqs import sqs
    transport = sqs.client()
    url = transport.url(queue_name + '-dead')
    bodies = []

    def collect():
        for message in transport.receive(url, wait_time=1):
            bodies.append(message['Body'])
            transport.delete_batch(url, [message['ReceiptHandle']])
        return len(bodies) >= count
    wait_until(collect)
    return bodies


def wait_until(predicate, timeout=60, interval=0.1, message=None):
    "Poll predicate until it returns a true value, and return that value."
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or "condition not met in time")
        time.sleep(interval)


def pytest_collection_modifyitems(session, config, items):
    # trytond's ModuleTestCase and the scenarios drop the database when they
    # end: run them last rather than build it again for every test after
    items.sort(key=lambda item: item.fspath.basename in {
            'test_module.py', 'test_scenario.py'})


class Server:
    "A trytond server process started by a test, on a free port of 127.0.0.1."

    def __init__(self, prefix, options=None):
        self.prefix = prefix
        self.directory = tempfile.mkdtemp(prefix='trytond-server-')
        self.config_path = os.path.join(self.directory, 'trytond.conf')
        self.port = free_port()
        self.url = 'http://127.0.0.1:%s' % self.port
        # the database is the one of the environment, as for the tests
        write_config(self.config_path, prefix, options,
            head='[web]\nlisten = 127.0.0.1:%s\n' % self.port)
        self.log_path = os.path.join(self.directory, 'server.log')
        self.final_output = None
        self.log = open(self.log_path, 'w')
        self.process = subprocess.Popen(
            [os.path.join(BIN, 'trytond'), '-c', self.config_path, '-v'],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        "Return the log of the server, kept once its directory is removed."
        if self.final_output is not None:
            return self.final_output
        with open(self.log_path) as fp:
            return fp.read()

    def ready(self, timeout=60):
        "Wait until the server answers HTTP."
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + '/', timeout=1).read()
                return self
            except urllib.error.HTTPError:
                # any answer is an answer: it listens
                return self
            except OSError:
                if (self.process.poll() is not None
                        or time.monotonic() > deadline):
                    raise AssertionError(
                        "trytond server did not start:\n%s" % self.output())
                time.sleep(0.1)

    def stop(self, timeout=30):
        "SIGTERM, then SIGKILL if need be; keep the log, remove the rest."
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()
        if self.final_output is None:
            self.final_output = self.output()
            shutil.rmtree(self.directory, ignore_errors=True)
