# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The replies a worker process sends to the callers that wait."""
import logging

from . import sqs
from .payload import reply_message

logger = logging.getLogger(__name__)

#: The kind of call whose outages the replies share.
WHAT = "reply (SendMessage)"


class Replies:
    """The replies of a process: sent at once, or kept while SQS fails.

    The waiter's timeout bounds how long a late reply is of use; the reply
    queue's retention bounds how long it is kept; the task row holds the
    outcome whatever becomes of the reply."""

    def __init__(self, outages):
        self.outages = outages
        self.unsent = []

    def send(self, name, call, task_queue_url, body):
        """Send the reply body of the task name to the reply queue of the
        call, or to the reply queue of the process the call names."""
        if call.reply_to:
            queue = call.reply_to
            if not sqs.is_process_reply_queue(queue):
                logger.warning("%s: no reply to %s, not a reply queue",
                    name, queue)
                return
        else:
            queue = sqs.reply_queue_name(call.task)
        # the reply queue lives beside the task queue: no GetQueueUrl
        url = task_queue_url.rsplit('/', 1)[0] + '/' + queue
        self.unsent.append(
            (name, queue, url, body, not call.reply_to, call.task))
        self.flush()

    def flush(self, force=False):
        "Send the replies not sent yet; keep those SQS did not take."
        if not self.unsent or not (force or self.outages.get(WHAT).due()):
            return
        replies, self.unsent = self.unsent, []
        for index, (_, queue, url, body, create, task_id) in enumerate(
                replies):
            if not self.outages.attempt(
                    WHAT, send_reply, queue, url, body, create, task_id):
                self.unsent.extend(replies[index:])
                if force:
                    for name, *_ in self.unsent:
                        logger.error("%s: the reply could not be sent", name)
                return


def send_reply(name, url, body, create=True, task_id=None):
    """Send a reply body to the reply queue name at url, created if missing
    and create; a large one of the task goes through S3."""
    transport = sqs.client()
    body, attributes = reply_message(body, task_id)
    try:
        transport.send(url, body, attributes=attributes)
    except Exception as exc:
        if not sqs.is_missing_queue(exc):
            raise
        if not create:
            # the process that waits has not waited yet, or has ended: the
            # task row holds the outcome for whoever reads it
            logger.info("reply queue %s is missing: reply dropped", name)
            return
        # the waiter has not created it yet: either side may
        url = transport.create(name, sqs.reply_queue_attributes())
        transport.send(url, body, attributes=attributes)
