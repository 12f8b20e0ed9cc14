# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The data manager that holds deferred calls until their transaction ends.

It has the shape of trytond's SMTP data manager: calls are put during the
transaction and sent once it has committed; a rollback drops them."""
import logging
import sys
from collections import defaultdict

from trytond.transaction import Transaction

from . import sqs

logger = logging.getLogger(__name__)


class Outbox:
    "The deferred calls of one transaction."

    def __init__(self):
        self.entries = []

    @classmethod
    def of(cls, transaction=None):
        "Return the outbox joined to the transaction."
        if transaction is None:
            transaction = Transaction()
        return transaction.join(cls())

    def __eq__(self, other):
        return isinstance(other, Outbox)

    def __hash__(self):
        return hash(Outbox)

    def put(self, queue_name, body, handle, delay=0):
        "Keep the message until the transaction commits."
        self.entries.append((queue_name, body, handle, delay))

    def abort(self, trans):
        self._drop()

    def tpc_begin(self, trans):
        pass

    def commit(self, trans):
        pass

    def tpc_vote(self, trans):
        pass

    def tpc_finish(self, trans):
        self.send()

    def tpc_abort(self, trans):
        # trytond ends every read-only transaction with a rollback, even one
        # whose work succeeded: there the calls go, unless an exception is
        # being handled, which is how an error ends such a transaction.
        if trans.readonly and sys.exc_info()[1] is None:
            self.send()
        else:
            self._drop()

    def sortKey(self):
        return 'async_sqs'

    def _drop(self):
        for _, _, handle, _ in self.entries:
            handle._set_state('dropped')
        self.entries.clear()

    def send(self):
        "Send every message kept, ten per SendMessageBatch call."
        entries, self.entries = self.entries, []
        if not entries:
            return
        transport = sqs.client()
        by_queue = defaultdict(list)
        for queue_name, body, handle, delay in entries:
            by_queue[queue_name].append((body, handle, delay))
        for queue_name, items in by_queue.items():
            url = transport.url(queue_name)
            batch = []
            for i, (body, handle, delay) in enumerate(items):
                entry = {'Id': str(i), 'MessageBody': body}
                if delay:
                    entry['DelaySeconds'] = delay
                batch.append(entry)
            try:
                transport.send_batch(url, batch)
            except Exception:
                logger.critical(
                    "%s deferred call(s) to %s could not be sent",
                    len(items), queue_name, exc_info=True)
                for _, handle, _ in items:
                    handle._set_state('unsent')
                continue
            for _, handle, _ in items:
                handle._set_state('sent')
            logger.debug("%s call(s) sent to %s", len(items), queue_name)
