# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Calls that run past their time limits."
import time

from trytond.modules.async_sqs import TaskTimeLimit, async_task
from trytond.pool import PoolMeta


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
