# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Calls grouped by tenant for SQS's fair queues."
from trytond.modules.async_sqs import async_task
from trytond.pool import PoolMeta


def shop_of(records, context):
    "The tenant of a call: the shop of its context, or none."
    return context.get('shop')


class ItemTenants(metaclass=PoolMeta):
    __name__ = 'async_sqs.test.item'

    @async_task(ignore_result=False, tenant='company', calls_per_message=10)
    @classmethod
    def by_company(cls, name):
        "Create an item of the name, and return it."
        cls.create([{'name': name}])
        return name

    @async_task(tenant=shop_of)
    @classmethod
    def by_shop(cls, name):
        "Create an item of the name."
        cls.create([{'name': name}])
