# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
from trytond.model import ModelSQL, fields
from trytond.modules.async_sqs import async_task
from trytond.rpc import RPC


class Item(ModelSQL):
    "Async SQS Bench Item"
    __name__ = 'async_sqs.bench.item'
    name = fields.Char("Name")

    @classmethod
    def __setup__(cls):
        super().__setup__()
        # the HTTP routes call only what the Tryton client may call: noop
        # fire-and-forget, answer waited for or run in the request by REST
        cls.__rpc__.update({
                'noop': RPC(readonly=True),
                'answer': RPC(readonly=True),
                })

    @async_task()
    @classmethod
    def noop(cls):
        "Do nothing: what is measured is the way there and back."

    @async_task(calls_per_message=10)
    @classmethod
    def noop_packed(cls):
        "Do nothing, ten calls of a transaction to a message."

    @async_task(ignore_result=False)
    @classmethod
    def answer(cls, value):
        "Return the value: the round trip of a result."
        return value

    @async_task(ignore_result=False)
    @classmethod
    def answer_late(cls, seconds, value):
        "Return the value after seconds: a slow call."
        import time
        time.sleep(seconds)
        return value

    @classmethod
    def queue_noop(cls, items):
        "Do nothing, for Model.__queue__.queue_noop(items) of ir.queue."
