# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Unique calls: one pending call per key."
import os
import time

from trytond.modules.async_sqs import async_task
from trytond.pool import PoolMeta


def by_name(records, args, kwargs):
    "The key of refresh_named: its name, whatever the value."
    return args[0]


class ItemUnique(metaclass=PoolMeta):
    __name__ = 'async_sqs.test.item'

    @async_task(ignore_result=False, unique=True)
    @classmethod
    def refresh(cls, name, value=0, wait_for=None):
        """Create an item of the name valued value; first wait for a file
        at wait_for, if given, up to a minute."""
        if wait_for:
            deadline = time.monotonic() + 60
            while (not os.path.exists(wait_for)
                    and time.monotonic() < deadline):
                time.sleep(0.05)
        cls.create([{'name': name, 'value': value}])
        return value

    @async_task(ignore_result=False, unique=by_name)
    @classmethod
    def refresh_named(cls, name, value=0):
        "Create an item of the name valued value: one pending per name."
        cls.create([{'name': name, 'value': value}])
        return value

    @async_task(ignore_result=False, unique=True)
    def refresh_record(self):
        "Add one to the value of the item."
        self.value = (self.value or 0) + 1
        self.save()
        return self.value

    @async_task(ignore_result=False, unique=True)
    @classmethod
    def refresh_unless(cls, path, name):
        "Fail unless a file is at path, then create an item of the name."
        if not os.path.exists(path):
            raise RuntimeError("no file at %s" % path)
        cls.create([{'name': name}])
        return name
