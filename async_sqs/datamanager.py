# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The shape of the data managers that async_sqs joins to a transaction."
from trytond.transaction import Transaction


class JoinedDataManager:
    """A data manager of trytond's two-phase commit, one per transaction
    and class, as trytond's SMTP data manager: what it keeps is dropped on
    abort; subclasses act in tpc_vote or tpc_finish, and drop in _drop."""

    #: The order of the data managers of a commit: trytond sorts them.
    sort_key = None

    @classmethod
    def of(cls, transaction=None):
        "Return the data manager of this class joined to the transaction."
        if transaction is None:
            transaction = Transaction()
        return transaction.join(cls())

    def __eq__(self, other):
        # one per transaction: Transaction.join keeps the first
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))

    def abort(self, trans):
        self._drop()

    def tpc_begin(self, trans):
        pass

    def commit(self, trans):
        pass

    def tpc_vote(self, trans):
        pass

    def tpc_abort(self, trans):
        self._drop()

    def sortKey(self):
        return self.sort_key

    def _drop(self):
        raise NotImplementedError
