# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The users who administer the deferred tasks."
from trytond.pool import Pool, PoolMeta


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
