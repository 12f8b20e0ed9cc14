# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Test that bench/run.py --quick runs and prints its table.

It runs as a process of its own, with this python and a clean environment:
its own moto server, its own SQLite database in a temp dir. Timings are
not asserted, only that the figures are there and positive."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import newest_series_only

from trytond import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, 'bench', 'run.py')
#: Rows the quick run must print with a positive median.
ROWS = [
    'raw boto3 send batch of 10',
    'raw boto3 receive 10 + delete batch',
    'raw boto3 round trip, fresh UUID queue p50',
    'raw boto3 round trip, fixed queue p50',
    'async_sqs enqueue (defer + commit)',
    'async_sqs drain -n 1',
    'async_sqs drain -n 2',
    'async_sqs drain -n 4',
    'async_sqs enqueue (defer + commit) (10 calls per message)',
    'async_sqs drain -n 2 (10 calls per message)',
    'async_sqs defer().wait() p50',
    'async_sqs defer().wait() p95',
    ]
#: Rows of the cost of a worker the quick run must print, whatever their
#: value: its CPU per task beside the raw consumer's, its memory.
USAGE_ROWS = [
    'raw boto3 receive 10 + delete batch: consumer CPU per message',
    'async_sqs drain -n 1: worker CPU per task',
    'async_sqs drain -n 2: worker CPU per task',
    'async_sqs drain -n 2: RSS per process',
    'async_sqs drain -n 2: PSS per process',
    'async_sqs drain -n 2: PSS of all processes',
    ]
#: Ratios of the cost of a worker the quick run must print, n/a or not.
USAGE_RATIOS = [
    'worker RSS per process / trytond-worker',
    'worker PSS per process / trytond-worker',
    'worker PSS of all processes / trytond-worker',
    'worker CPU per task / raw boto3 consumer',
    'worker CPU per task / trytond-worker',
    'worker CPU per task / Celery prefork',
    ]
#: Rows the HTTP run must print with a positive median, per route.
HTTP_ROUTES = [
    'HTTP async_sqs fire-and-forget (202)',
    'HTTP async_sqs ?wait=60 (200)',
    'HTTP async_sqs ?wait=60, reply_queue = process (200)',
    'HTTP trytond REST, run in the request',
    ]


def clean_env():
    return {k: v for k, v in os.environ.items()
        if not k.startswith(('TRYTOND_', 'AWS_', 'ASYNC_SQS_'))
        and k not in {'DB_NAME', 'DB_CACHE', 'TRYTONPASSFILE'}}


@newest_series_only
@pytest.mark.skipif(backend.name != 'sqlite',
    reason="the benchmark brings its own database")
def test_bench_quick():
    "Test the quick benchmark prints the async_sqs and raw rows"
    with tempfile.TemporaryDirectory() as results:
        process = subprocess.run(
            [sys.executable, RUN, '--quick', '--results', results],
            env=clean_env(), cwd=ROOT, capture_output=True, text=True,
            timeout=300)
        output = process.stdout + process.stderr
        assert process.returncode == 0, output
        files = os.listdir(results)
        assert len(files) == 1 and files[0].endswith('.jsonl'), files
    table = output[output.index('\nfigure '):]
    for row in ROWS:
        match = re.search(r'^%s\s+(\d+)\s+([0-9.]+)\s' % re.escape(row),
            table, re.MULTILINE)
        assert match, "%r missing from:\n%s" % (row, table)
        n, median = int(match.group(1)), float(match.group(2))
        assert n > 0 and median > 0, (row, n, median)
    for row in USAGE_ROWS:
        assert re.search(r'^%s\s+\d+\s+[0-9.]+\s+[0-9.]+-[0-9.]+\s+(ms|MiB)\s'
            % re.escape(row), table, re.MULTILINE), (
            "%r missing from:\n%s" % (row, table))
    ratios = table[table.index('\nratios (of medians)'):]
    for ratio in USAGE_RATIOS:
        assert re.search(r'^  %s\s+(n/a|[0-9.]+)$' % re.escape(ratio),
            ratios, re.MULTILINE), "%r missing from:\n%s" % (ratio, ratios)
    try:
        import celery  # noqa: F401
    except ImportError:
        assert 'SKIPPED Celery' in output, output


def ab_installable():
    "Tell whether ab is here or apt-get can install it."
    return bool(shutil.which('ab')) or (
        os.getuid() == 0 and bool(shutil.which('apt-get')))


def table_rows(output):
    "Return the median of each row of the table, by figure."
    table = output[output.index('\nfigure '):]
    rows = {}
    for match in re.finditer(r'^(\S.*?)\s+(\d+)\s+([0-9.]+)\s+[0-9.]+-',
            table, re.MULTILINE):
        rows[match.group(1)] = (int(match.group(2)), float(match.group(3)))
    return rows


@newest_series_only
@pytest.mark.skipif(backend.name != 'sqlite',
    reason="the benchmark brings its own database")
@pytest.mark.skipif(not ab_installable(),
    reason="ab is missing and apt-get cannot install apache2-utils "
    "without root")
def test_bench_http():
    "Test the HTTP benchmark prints positive figures and no failure"
    with tempfile.TemporaryDirectory() as results:
        process = subprocess.run(
            [sys.executable, RUN, '--http', '-n', '20', '-c', '10',
                '--results', results],
            env=clean_env(), cwd=ROOT, capture_output=True, text=True,
            timeout=600)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert 'CHECK FAILED' not in output, output
    rows = table_rows(output)
    for route in HTTP_ROUTES:
        for figure in ['requests/s', 'p50', 'p95']:
            n, median = rows['%s %s' % (route, figure)]
            assert n == 20 and median > 0, (route, figure, n, median)
        n, failed = rows['%s failed + non-2xx' % route]
        assert failed == 0, (route, output)
    for route in HTTP_ROUTES[:3]:
        n, rate = rows['%s, all calls done' % route]
        assert n == 20 and rate > 0, (route, n, rate)
    assert 'fire-and-forget / seed 347.8' in output, output
    assert '?wait, reply_queue = process / reply_queue = task' in output, (
        output)
