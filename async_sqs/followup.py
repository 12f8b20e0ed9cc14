# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""What a retry or a cancel of the task model sends once its transaction
has committed."""
import logging
from collections import defaultdict

from . import payload, settings, sqs
from .datamanager import JoinedDataManager
from .message import message_group, signature_attributes
from .rows import mark_queued

logger = logging.getLogger(__name__)


class Followup(JoinedDataManager):
    """What a retry or a cancel sends once its transaction has committed:
    kept during the transaction, sent in tpc_finish, dropped on abort."""
    sort_key = 'async_sqs.followup'

    def __init__(self):
        self.resends = []
        self.replies = []

    def resend(self, uuid, queue_name, body, reply):
        """Send the body again to the queue after the commit; with reply,
        empty the reply queue of the call first."""
        self.resends.append((uuid, queue_name, body, reply))

    def reply(self, uuid, body, reply_to=None):
        """Send the reply body to the reply queue of the call, or to the
        queue reply_to, after the commit."""
        self.replies.append((uuid, body, reply_to))

    def tpc_finish(self, trans):
        resends, self.resends = self.resends, []
        replies, self.replies = self.replies, []
        if replies:
            send_replies(replies)
        if resends:
            resend(trans.database.name, resends)

    def _drop(self):
        self.resends.clear()
        self.replies.clear()


def resend(database_name, items):
    """Send the calls again, each alone, and mark their rows queued.

    items are (uuid, queue name, body, reply). An old reply still in the
    reply queue of a call is deleted before its message goes, so that a
    waiter reads the outcome of the new attempt. A failure is logged: the
    rows stay pending for the relay. In eager mode they run here."""
    if settings.eager():
        from . import eager
        eager.run_rows(
            database_name, [(u, q, b) for u, q, b, _ in items])
        return
    transport = sqs.client()
    by_queue = defaultdict(list)
    for item in items:
        by_queue[item[1]].append(item)
    sent = []
    for queue_name, queue_items in by_queue.items():
        try:
            for uuid, _, _, reply in queue_items:
                if reply:
                    transport.drain(sqs.reply_queue_name(uuid))
            url = transport.url(queue_name)
            entries = [payload.call_entry(
                    str(i), body, 0, database_name, uuid, message_group(body))
                for i, (uuid, _, body, _) in enumerate(queue_items)]
            for batch in sqs.batches(entries):
                transport.send_batch(url, batch)
                sent.append([queue_items[int(e['Id'])][0] for e in batch])
        except Exception:
            logger.critical(
                "retried calls to %s could not be sent, "
                "the relay will send them", queue_name, exc_info=True)
    if sent:
        mark_queued(database_name, sent)


def send_replies(replies):
    """Send each reply body, signed, to the reply queue of its call, or to
    the reply queue of a process that the call names.

    The queue of a process that is gone is not created again: the row
    tells the outcome."""
    transport = sqs.client()
    for uuid, body, reply_to in replies:
        try:
            if reply_to:
                if not sqs.is_process_reply_queue(reply_to):
                    continue
                try:
                    url = transport.url(reply_to, create=False)
                except Exception as exc:
                    if sqs.is_missing_queue(exc):
                        continue
                    raise
            else:
                url = transport.open(
                    sqs.reply_queue_name(uuid), sqs.reply_queue_attributes())
            transport.send(url, body, attributes=signature_attributes(body))
        except Exception:
            logger.error("the reply of cancelled task %s could not be sent",
                uuid, exc_info=True)
