# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"What a user of the site presses: a batch of calls, deferred."
from trytond.model import ModelView
from trytond.pool import Pool
from trytond.rpc import RPC


class Batch(ModelView):
    "Async SQS Test Batch"
    __name__ = 'async_sqs.test.batch'

    @classmethod
    def __setup__(cls):
        super().__setup__()
        cls.__rpc__.update({
                'start': RPC(readonly=False),
                'allow': RPC(readonly=False),
                })

    @classmethod
    def start(cls, name, count, flag):
        """Defer count calls that create an item of name, and one that fails
        until an item of flag exists."""
        Item = Pool().get('async_sqs.test.item')
        for value in range(count):
            Item.create_named.defer(name, value=value)
        Item.fail_until_item.defer(flag, name)

    @classmethod
    def allow(cls, flag):
        "Create the item of flag that the failing call waits for."
        Item = Pool().get('async_sqs.test.item')
        Item.create([{'name': flag}])
