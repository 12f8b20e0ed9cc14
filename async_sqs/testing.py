# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Helpers for the test suites of modules that defer calls.

eager() runs the deferred calls in the test's process; local_sqs() starts
an SQS server of moto on 127.0.0.1 and points the configuration at it;
worker() runs a real trytond-async-worker beside the test."""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

from trytond import config

from . import settings

#: Seconds a server or a worker may take to start.
START_TIMEOUT = 60
#: Seconds a worker may take to stop once told to.
STOP_TIMEOUT = 60
#: What the worker logs once a process listens.
READY = 'ready, pid'


@contextmanager
def _option(section, values):
    "Set the options of the section for the block, then put them back."
    if not config.has_section(section):
        config.add_section(section)
    saved = {k: config.get(section, k) for k in values}
    for key, value in values.items():
        config.set(section, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                # trytond's config has set(), no remove
                config._config.remove_option(section, key)
                config._cache_clear()
            else:
                config.set(section, key, value)


@contextmanager
def eager():
    """Run every call deferred in the block in this process, once its
    transaction commits (eager mode), without SQS or a secret."""
    with _option(settings.SECTION, {'eager': 'True'}):
        yield


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _script(name):
    "Return the path of a console script beside this Python, or on PATH."
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    return shutil.which(name)


def _stop(process, timeout=10):
    "SIGTERM the process group, SIGKILL it if it lingers."
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
        except ProcessLookupError:
            pass


def start_moto_server(directory):
    """Start moto's server on 127.0.0.1 on a free port.

    Return the process and its URL; its output goes to directory."""
    if importlib.util.find_spec('moto') is None or not _script(
            'moto_server'):
        raise RuntimeError("local_sqs() needs moto's server: "
            "pip install 'moto[server]'")
    port = _free_port()
    log_path = os.path.join(directory, 'moto.log')
    with open(log_path, 'w') as log:
        process = subprocess.Popen(
            [_script('moto_server'), '-H', '127.0.0.1', '-p', str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = 'http://127.0.0.1:%s' % port
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url + '/moto-api/', timeout=1).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                _stop(process)
                with open(log_path) as fp:
                    raise RuntimeError(
                        "moto server did not start:\n%s" % fp.read())
            time.sleep(0.1)


@contextmanager
def local_sqs():
    """Start an SQS server (moto's) on 127.0.0.1 for the block, with the
    [async_sqs] endpoint, region and keys pointing at it; yield its URL.

    It is stopped on exit, and the options set back."""
    from . import sqs
    from .listener import close_listeners
    directory = tempfile.mkdtemp(prefix='async-sqs-moto-')
    try:
        process, url = start_moto_server(directory)
        try:
            with _option(settings.SECTION, {
                        'endpoint_url': url,
                        'region': 'us-east-1',
                        'access_key': 'testing',
                        'secret_key': 'testing-secret',
                        }):
                try:
                    yield url
                finally:
                    # the reply queue of the process goes with the server
                    close_listeners(url)
        finally:
            _stop(process)
            # the client of this process keeps the URLs of that server
            sqs._transports.clear()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_config(path):
    "Write the [database] and [async_sqs] options of this process to path."
    with open(path, 'w') as fp:
        for section in ('database', settings.SECTION):
            if not config.has_section(section):
                continue
            fp.write('[%s]\n' % section)
            for key in config.options(section):
                value = config.get(section, key)
                if value is None:
                    continue
                fp.write('%s = %s\n' % (key, value.replace('\n', '\n    ')))


class Worker:
    "A trytond-async-worker process, as worker() runs it."

    def __init__(self, process, directory, log_path):
        self.process = process
        self.directory = directory
        self.log_path = log_path

    @property
    def pid(self):
        return self.process.pid

    def output(self):
        "Return what the worker logged so far."
        with open(self.log_path) as fp:
            return fp.read()


@contextmanager
def worker(database, processes=1):
    """Run a real trytond-async-worker on the database for the block.

    It reads a temporary trytond.conf with the [database] and [async_sqs]
    options of this process; the block starts once every process listens,
    and on exit the worker gets SIGTERM (calls in flight finish) and its
    temporary folder is removed. Yield a Worker, whose output() is its
    log."""
    if database == ':memory:':
        raise ValueError(
            "worker() needs a database that another process can open, "
            "not an SQLite database in memory")
    script = _script('trytond-async-worker')
    if not script:
        raise RuntimeError("trytond-async-worker is not installed")
    directory = tempfile.mkdtemp(prefix='async-worker-')
    try:
        config_path = os.path.join(directory, 'trytond.conf')
        _write_config(config_path)
        log_path = os.path.join(directory, 'worker.log')
        with open(log_path, 'w') as log:
            process = subprocess.Popen([script, '-c', config_path,
                    '-d', database, '-n', str(processes), '-vv'],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running = Worker(process, directory, log_path)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while running.output().count(READY) < processes:
                if process.poll() is not None or (
                        time.monotonic() > deadline):
                    raise RuntimeError("trytond-async-worker did not "
                        "start:\n%s" % running.output())
                time.sleep(0.05)
            yield running
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
            _stop(process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
