# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The Celery peer of bench/run.py: a no-op task over the same moto server.

BENCH_BROKER is the broker URL, BENCH_DONE_FILE the file each run of the
task appends 'start end' (time.time()) to, so that the driver counts them."""
import os
import time

from celery import Celery

app = Celery('celery_bench', broker=os.environ.get('BENCH_BROKER'))
app.conf.update(
    broker_transport_options={
        'is_secure': False,
        'region': 'us-east-1',
        'wait_time_seconds': 1,
        'polling_interval': 0.1,
        },
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    )


@app.task
def noop():
    start = time.time()
    # one write per line with O_APPEND: lines of two processes do not mix
    fd = os.open(os.environ['BENCH_DONE_FILE'],
        os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, ('%.6f %.6f\n' % (start, time.time())).encode())
    finally:
        os.close(fd)
