# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Calls that run past their time limits."
import logging
import time

from trytond.modules.async_sqs import TaskCancelled, TaskTimeLimit, async_task
from trytond.pool import PoolMeta

logger = logging.getLogger(__name__)


class ItemLimits(metaclass=PoolMeta):
    __name__ = 'async_sqs.test.item'

    @async_task(ignore_result=False, soft_time_limit=1, time_limit=60)
    @classmethod
    def overrun_soft(cls, name):
        "Create an item, then run past the soft limit: it is rolled back."
        cls.create([{'name': name}])
        time.sleep(60)

    @async_task(ignore_result=False, soft_time_limit=1, time_limit=3)
    @classmethod
    def overrun_hard(cls, name):
        "Create an item, swallow the soft limit and run on, past the hard one."
        cls.create([{'name': name}])
        while True:
            try:
                time.sleep(60)
            except TaskTimeLimit:
                pass

    @async_task(ignore_result=False, soft_time_limit=1, time_limit=60)
    @classmethod
    def soft_caught(cls, name):
        "Catch the soft limit and clean up: what it did then commits."
        cls.create([{'name': name}])
        try:
            time.sleep(60)
        except TaskTimeLimit:
            cls.create([{'name': name + '-cleaned'}])
            return 'cleaned'

    @async_task(ignore_result=False, time_limit=3)
    @classmethod
    def overrun_in_python(cls, name):
        "Create an item, then loop in Python code past the hard limit."
        cls.create([{'name': name}])
        count = 0
        while True:
            count += 1

    @async_task(ignore_result=False)
    @classmethod
    def until_cancelled(cls, name):
        "Create an item, then sleep until cancelled."
        cls.create([{'name': name}])
        logger.info("%s running", name)
        time.sleep(120)

    @async_task(ignore_result=False)
    @classmethod
    def ignore_cancel(cls, name):
        "Create an item, then swallow every TaskCancelled."
        cls.create([{'name': name}])
        logger.info("%s running", name)
        for _ in range(600):
            try:
                time.sleep(0.5)
            except TaskCancelled:
                pass
