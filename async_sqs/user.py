# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The users of async_sqs: who administers the tasks, who calls the routes."
from trytond.pool import Pool, PoolMeta

#: The name of the user application of the routes.
APPLICATION = 'async_sqs'


class User(metaclass=PoolMeta):
    __name__ = 'res.user'

    @classmethod
    def get_groups(cls):
        """Return the groups of the user, with the task administration for
        the members of trytond's Administration group.

        trytond 8.2 and later give its administrators the accesses of every
        group; before, they are the members of res.group_admin, which a
        module cannot add to a group of its own in XML that 8.2 also
        loads."""
        pool = Pool()
        ModelData = pool.get('ir.model.data')
        groups = super().get_groups()
        try:
            admin = ModelData.get_id('res', 'group_admin')
            task_admin = ModelData.get_id('async_sqs', 'group_task_admin')
        except KeyError:
            return groups
        if admin in groups and task_admin not in groups:
            groups = tuple(groups) + (task_admin,)
        return groups


class UserApplication(metaclass=PoolMeta):
    __name__ = 'res.user.application'

    @classmethod
    def __setup__(cls):
        super().__setup__()
        # a key of its own: deferring is granted apart from the REST API
        cls.application.selection.append((APPLICATION, "Deferred Calls"))
