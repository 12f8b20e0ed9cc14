# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The user application that grants the HTTP routes of async_sqs."
from trytond.pool import PoolMeta

#: The name of the user application of the routes.
APPLICATION = 'async_sqs'


class UserApplication(metaclass=PoolMeta):
    __name__ = 'res.user.application'

    @classmethod
    def __setup__(cls):
        super().__setup__()
        # a key of its own: deferring is granted apart from the REST API
        cls.application.selection.append((APPLICATION, "Deferred Calls"))
