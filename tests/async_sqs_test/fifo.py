# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Calls of a FIFO queue, which run in order within their tenant."
import os

from trytond.modules.async_sqs import async_task
from trytond.pool import PoolMeta


class ItemFifo(metaclass=PoolMeta):
    __name__ = 'async_sqs.test.item'

    @async_task(queue='ordered.fifo', tenant='company', retries=2,
        retry_backoff=2)
    @classmethod
    def in_order(cls, name, step, fail_once=None):
        """Create an item of the name valued step; fail the first time if
        fail_once names a file that does not exist yet."""
        if fail_once and not os.path.exists(fail_once):
            open(fail_once, 'w').close()
            raise RuntimeError("failed once")
        cls.create([{'name': name, 'value': step}])
