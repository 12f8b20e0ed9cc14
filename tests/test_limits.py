# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Time limits: a call that runs too long is stopped, not its neighbours."
import re
import uuid

import pytest
from conftest import items, wait_until
from test_reliability import USER, row

from trytond.modules.async_sqs import TaskFailed, async_task
from trytond.pool import Pool
from trytond.transaction import Transaction


def test_soft_time_limit(database, prefix, start_worker):
    "Past the soft limit TaskTimeLimit is raised in the call: it rolls back"
    name = 'soft-%s' % uuid.uuid4()
    worker = start_worker()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').overrun_soft.defer(name)
    with pytest.raises(TaskFailed) as info:
        handle.wait(60)
    assert info.value.exc_type.endswith('TaskTimeLimit')
    assert 'soft time limit of 1 s exceeded' in info.value.message
    assert items(database, name) == []
    task = row(database, handle.task_id)
    assert task['state'] == 'failed'
    # the process was not ended
    assert worker.output().count('ready, pid') == 1
    assert 'ran past its time limit' not in worker.output()


def test_hard_time_limit(database, prefix, start_worker):
    "Past the hard limit the process is ended and replaced, the call failed"
    name, other = 'hard-%s' % uuid.uuid4(), 'beside-%s' % uuid.uuid4()
    # hidden long enough for the supervisor to record the end first
    worker = start_worker(processes=2, options={'visibility_timeout': 10})
    with Transaction().start(database, USER):
        Item = Pool().get('async_sqs.test.item')
        handle = Item.overrun_hard.defer(name)
        beside = Item.sleep_then_create.defer(other, 5)
    with pytest.raises(TaskFailed) as info:
        handle.wait(90)
    assert "time limit of 3 s exceeded" in info.value.message
    # the call beside it, on the other process, is not disturbed
    assert beside.wait(90) == other
    assert items(database, other) == [(other, None)]
    assert items(database, name) == []
    task = row(database, handle.task_id)
    assert (task['state'], task['error']) == (
        'failed', "time limit of 3 s exceeded")
    output = worker.output()
    assert 'ran past its time limit of 3 s' in output
    assert re.search(r'exited with -9, starting another', output)
    worker.wait_for_log('ready, pid', timeout=60)
    wait_until(lambda: worker.output().count('ready, pid') == 3)
    # its message comes back once hidden no more, and does not run again
    worker.wait_for_log('<Task %s async_sqs.test.item.overrun_hard@%s> '
        'skipped: failed already' % (handle.task_id, database), timeout=60)
    output = worker.output()
    assert output.count('ran past its time limit') == 1
    assert items(database, name) == []


def test_soft_time_limit_caught(database, prefix, start_worker):
    "A call that catches TaskTimeLimit cleans up, and what it did commits"
    name = 'caught-%s' % uuid.uuid4()
    start_worker()
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').soft_caught.defer(name)
    assert handle.wait(60) == 'cleaned'
    assert items(database, name) == [(name, None)]
    assert items(database, name + '-cleaned') == [(name + '-cleaned', None)]
    assert row(database, handle.task_id)['state'] == 'done'


def test_hard_time_limit_in_python(database, prefix, start_worker):
    "A call that loops in Python code is ended at its hard limit too"
    name = 'loop-%s' % uuid.uuid4()
    worker = start_worker(options={'visibility_timeout': 10})
    with Transaction().start(database, USER):
        handle = Pool().get('async_sqs.test.item').overrun_in_python.defer(
            name)
    with pytest.raises(TaskFailed) as info:
        handle.wait(90)
    assert "time limit of 3 s exceeded" in info.value.message
    assert items(database, name) == []
    assert row(database, handle.task_id)['state'] == 'failed'
    assert 'ran past its time limit of 3 s' in worker.output()
    # another process takes its place
    wait_until(lambda: worker.output().count('ready, pid') == 2)


@pytest.mark.parametrize('limits, message', [
        ({'time_limit': 10, 'soft_time_limit': 10}, 'must be below'),
        ({'time_limit': 10, 'soft_time_limit': 20}, 'must be below'),
        ({'time_limit': 43201}, 'within 0 to 43200'),
        ({'soft_time_limit': -1}, 'within 0 to 43200'),
        ])
def test_time_limits_checked(limits, message):
    "Time limits are checked when the method is decorated"
    with pytest.raises(ValueError, match=message):
        async_task(**limits)
