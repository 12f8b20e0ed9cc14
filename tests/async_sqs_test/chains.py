# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Calls that follow others, in chains and groups."
import time

from trytond.modules.async_sqs import async_task
from trytond.pool import PoolMeta


class ItemChains(metaclass=PoolMeta):
    __name__ = 'async_sqs.test.item'

    @async_task(ignore_result=False)
    @classmethod
    def add_then_create(cls, value, name, amount):
        "Create an item of name valued value + amount, and return that sum."
        total = value + amount
        cls.create([{'name': name, 'value': total}])
        return total

    @async_task(ignore_result=False)
    @classmethod
    def slow_value(cls, value, seconds, name):
        "Create an item of name with value after seconds; return value."
        time.sleep(seconds)
        cls.create([{'name': name, 'value': value}])
        return value

    @async_task(ignore_result=False)
    @classmethod
    def collect(cls, results, name):
        "Create one item of name valued the sum of results; return them."
        cls.create([{'name': name, 'value': sum(results)}])
        return results
