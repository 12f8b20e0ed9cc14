# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
import datetime as dt
import hashlib
import os
import time
from decimal import Decimal

from trytond.exceptions import UserError
from trytond.model import ModelSQL, fields
from trytond.modules.async_sqs import async_task
from trytond.pool import PoolMeta
from trytond.report import Report
from trytond.rpc import RPC
from trytond.transaction import Transaction
from trytond.wizard import StateTransition, Wizard


class Item(ModelSQL):
    "Async SQS Test Item"
    __name__ = 'async_sqs.test.item'
    name = fields.Char("Name")
    value = fields.Integer("Value")
    note = fields.Text("Note")

    @classmethod
    def __setup__(cls):
        super().__setup__()
        # what the HTTP routes may call; sleep_then_pid and fail_quietly stay
        # deferrable but unexposed, not_deferrable exposed but not deferrable
        cls.__rpc__.update({
                'create_named': RPC(readonly=False),
                'echo': RPC(readonly=False),
                'bump': RPC(readonly=False, instantiate=0),
                'describe': RPC(readonly=False, instantiate=0),
                'fail': RPC(readonly=False),
                'sleep_then_create': RPC(readonly=False),
                'not_deferrable': RPC(readonly=False),
                'count_secrets': RPC(readonly=False),
                })

    @async_task()
    @classmethod
    def create_named(cls, name, value=0):
        "Create an item: the effect a test looks for."
        cls.create([{'name': name, 'value': value}])

    @classmethod
    @async_task(ignore_result=False)
    def echo(cls, *args, **kwargs):
        "Return what the call received, with who and where it ran."
        context = Transaction().context
        return {
            'args': list(args),
            'kwargs': kwargs,
            'user': Transaction().user,
            'context': {k: context.get(k) for k in ('language', 'probe')},
            'pid': os.getpid(),
            }

    @async_task(ignore_result=False)
    def bump(self, amount):
        "Add amount to the value of the item and return it."
        self.value = (self.value or 0) + amount
        self.save()
        return self.value

    @async_task(ignore_result=False)
    @classmethod
    def describe(cls, items):
        "Return the records received, browsed in the worker."
        return [(item.id, item.name, item) for item in items]

    @async_task(ignore_result=False)
    @classmethod
    def fail_user(cls, text):
        raise UserError(text, "from the worker")

    @async_task(ignore_result=False)
    @classmethod
    def fail(cls, text):
        raise ValueError(text)

    @async_task()
    @classmethod
    def fail_quietly(cls, text):
        raise ValueError(text)

    @async_task(ignore_result=False)
    @classmethod
    def sleep_then_create(cls, name, seconds):
        time.sleep(seconds)
        cls.create([{'name': name}])
        return name

    @async_task()
    @classmethod
    def create_in_turn(cls, name, value):
        """Create an item, a little later: the ids tell the order of the runs
        of calls that last longer than a receive."""
        time.sleep(0.05)
        cls.create([{'name': name, 'value': value}])

    @async_task(ignore_result=False)
    @classmethod
    def sleep_then_pid(cls, seconds):
        "Return the process id of the worker, after seconds."
        time.sleep(seconds)
        return os.getpid()

    @async_task(ignore_result=False, retries=2, retry_backoff=1)
    @classmethod
    def flaky(cls, path, failures):
        "Fail the first failures attempts, counted in the file at path."
        with open(path, 'a+') as fp:
            fp.write('attempt\n')
            fp.seek(0)
            attempts = len(fp.readlines())
        if attempts <= failures:
            raise RuntimeError("attempt %s fails" % attempts)
        cls.create([{'name': path, 'value': attempts}])
        return attempts

    @async_task(ignore_result=False)
    @classmethod
    def fail_until_item(cls, flag, name):
        "Fail until an item named flag exists, then create an item named name."
        if not cls.search([('name', '=', flag)]):
            raise RuntimeError("no %s yet" % flag)
        cls.create([{'name': name}])
        return name

    @async_task(ignore_result=False, retries=3, retry_backoff=1)
    @classmethod
    def fail_user_with_retries(cls, text):
        raise UserError(text)

    @async_task(ignore_result=False, queue='other')
    @classmethod
    def on_other_queue(cls, value):
        return value * 2

    @async_task(ignore_result=False)
    @classmethod
    def overridden(cls, value):
        return ['base', value]

    @classmethod
    def not_deferrable(cls, value):
        cls.create([{'name': 'not deferrable'}])
        return value

    @async_task(ignore_result=False, calls_per_message=10, retries=1,
        retry_backoff=1)
    @classmethod
    def packed(cls, name, value=0, behaviour=None):
        """Create an item, as one of several calls sharing a message.

        behaviour: 'user' raises a UserError, 'sleep' takes a second first,
        a path fails the first attempt (counted in the file)."""
        if behaviour == 'user':
            raise UserError("packed %s refused" % value)
        if behaviour == 'sleep':
            time.sleep(1)
        elif behaviour:
            with open(behaviour, 'a+') as fp:
                fp.write('attempt\n')
                fp.seek(0)
                if len(fp.readlines()) == 1:
                    raise RuntimeError("first attempt of %s fails" % value)
        cls.create([{'name': name, 'value': value}])
        return value

    @async_task(ignore_result=False)
    @classmethod
    def fail_until(cls, path, name=None):
        """Fail as long as no file is at path; then create an item of name
        and return it."""
        if not os.path.exists(path):
            raise RuntimeError("no file at %s yet" % path)
        if name is not None:
            cls.create([{'name': name}])
        return name

    @async_task(ignore_result=False, calls_per_message=10)
    @classmethod
    def packed_until(cls, path, name):
        "fail_until, for calls that share a message."
        return cls.fail_until(path, name)

    @async_task(ignore_result=False)
    @classmethod
    def count_secrets(cls):
        "Return how many secrets there are: it reads a restricted model."
        from trytond.pool import Pool
        Secret = Pool().get('async_sqs.test.secret')
        return len(Secret.search([]))

    @async_task(ignore_result=False)
    @classmethod
    def unencodable(cls):
        "Return what JSON cannot hold."
        return [float('nan')]

    @async_task(ignore_result=False)
    @classmethod
    def identity(cls, value):
        return value

    @async_task(ignore_result=False, calls_per_message=10)
    @classmethod
    def measure(cls, text):
        "Return the length and SHA-256 of text: calls that may share one."
        return [len(text), hashlib.sha256(text.encode('utf-8')).hexdigest()]

    @async_task(ignore_result=False)
    @classmethod
    def big_text(cls, size):
        "Return a text of size characters, not all alike."
        line = ''.join(chr(0x41 + i % 26) for i in range(63)) + '\n'
        return (line * (size // len(line) + 1))[:size]

    @async_task(ignore_result=False, queue='other')
    @classmethod
    def behind_gate(cls, value):
        "Return the value, from a queue that a test serves late."
        return value

    @async_task(ignore_result=False)
    @classmethod
    def typed(cls, values):
        "Return the values and the name of each one's type."
        return [values, [type(v).__name__ for v in values]]


class Secret(ModelSQL):
    "Async SQS Test Secret"
    __name__ = 'async_sqs.test.secret'
    name = fields.Char("Name")

    @classmethod
    def __setup__(cls):
        super().__setup__()
        cls.__rpc__.update({'reveal': RPC(readonly=False)})

    @async_task(ignore_result=False)
    @classmethod
    def reveal(cls):
        "Return the names of the secrets: only administrators may read them."
        return [s.name for s in cls.search([])]


class ItemOverride(metaclass=PoolMeta):
    "An override that does not repeat the decorator, as integrators write"
    __name__ = 'async_sqs.test.item'

    @classmethod
    def overridden(cls, value):
        return ['override'] + super().overridden(value)


class Touch(Wizard):
    "Async SQS Test Touch"
    __name__ = 'async_sqs.test.touch'
    start_state = 'touch'
    touch = StateTransition()

    @async_task(ignore_result=False)
    @classmethod
    def count_items(cls, name):
        "Return how many items have the name."
        from trytond.pool import Pool
        Item = Pool().get('async_sqs.test.item')
        return len(Item.search([('name', '=', name)]))

    def transition_touch(self):
        return 'end'


class BigReport(Report):
    __name__ = 'report.bigreport'

    @async_task(ignore_result=False)
    @classmethod
    def expensive_method(cls, arg1, arg2):
        """
        An expensive method which determines your future
        """
        return {'sum': arg1 + arg2, 'at': dt.date(2026, 11, 23),
            'cost': Decimal('1.50')}
