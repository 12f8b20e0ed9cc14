# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Giving messages back to SQS: to the dead-letter queue, released for the
database's trouble, sent again alone, or postponed until due."""
import datetime as dt
import logging
import math

from . import settings, sqs
from .message import encode_call, message_entry, payload_attributes

logger = logging.getLogger(__name__)

#: Longest visibility timeout SQS allows, in seconds.
MAX_VISIBILITY = 43200
#: Message attribute counting how often the database kept a call from
#: running: it sets the delay of the next try, not the call's attempts.
RELEASED_ATTRIBUTE = 'async_sqs.released'
#: Seconds before a call the database kept from running is tried again,
#: doubled at each release, up to RELEASE_LONGEST.
RELEASE_FIRST = 1
RELEASE_LONGEST = 300
RELEASE_DOUBLINGS = 16


def task_name(call):
    "Return how the logs name a call."
    return '<Task %s %s.%s@%s>' % (
        call.task, call.model, call.method, call.database)


class Requeue:
    """What a runner does with a message it does not delete: try_sqs,
    delete and the heartbeat are the runner's."""

    def dead_letter(self, received, reason, call=None):
        """Copy a message the worker refuses to the dead-letter queue.

        With call, only that call of a packed message goes there, alone.
        Return whether it went: if not, the message stays where it is, to
        be judged again when it comes back."""
        transport = sqs.client()
        body = received.message.get('Body') or ' '
        # the pointer of a body in S3 keeps its SHA-256, to requeue it
        attributes = payload_attributes(received.message)
        if call is not None:
            body, attributes = encode_call(call), {}
        attributes['refused'] = {
            'DataType': 'String', 'StringValue': reason[:1000]}

        def send():
            url = transport.dead_letter_url(received.queue_name)
            transport.send(url, body, attributes=attributes)
        return self.try_sqs("dead letter (SendMessage)", send)

    def release(self, call, received, packed):
        """Give a call the database kept from running back to its queue.

        It comes back after a delay that doubles with each release. A fresh
        copy is sent, so that neither SQS's receive count, which the
        redrive policy and the attempts go by, nor the row count it.
        Return whether the call is settled."""
        attributes = received.message.get('MessageAttributes') or {}
        try:
            released = int(attributes.get(
                    RELEASED_ATTRIBUTE, {}).get('StringValue', 0))
        except ValueError:
            released = 0
        if sqs.is_fifo(received.url):
            # the message itself comes back: its receives count the releases
            released = received.receive_count - 1
        # unsigned, so bounded before it is used
        released = min(max(released, 0), RELEASE_DOUBLINGS)
        delay = min(RELEASE_FIRST * 2 ** released, RELEASE_LONGEST)
        if packed:
            return self.send_alone(call, received, delay, released + 1)
        self.heartbeat.release(received)
        if sqs.is_fifo(received.url):
            # a copy would go behind the others of its group: the message
            # keeps its place, at the cost of a receive
            self.try_sqs("release (ChangeMessageVisibility)",
                sqs.client().change_visibility_batch,
                received.url, [received.receipt], delay)
            return False
        entry = message_entry('0', received.message['Body'], delay,
            payload_attributes(received.message), received.group)
        entry.setdefault('MessageAttributes', {})[RELEASED_ATTRIBUTE] = {
            'DataType': 'Number', 'StringValue': str(released + 1)}
        if self.try_sqs("release (SendMessageBatch)",
                sqs.client().send_batch, received.url, [entry]):
            return True
        # not copied: the message itself comes back after its timeout
        return False

    def send_alone(self, call, received, delay, released=0):
        """Send a call of a packed message again, alone, in delay seconds.

        Beyond what SQS delays, the call carries its due time and the
        worker that receives it holds it back. Return whether it went."""
        eta = call.eta
        if delay:
            eta = dt.datetime.now() + dt.timedelta(seconds=delay)
        elif eta is not None:
            delay = max(0, (eta - dt.datetime.now()).total_seconds())
        if delay <= sqs.MAX_DELAY:
            eta = None
        body = encode_call(call._replace(eta=eta))
        delay = min(math.ceil(delay), sqs.MAX_DELAY)
        entry = message_entry('0', body, delay, group=call.tenant)
        if released:
            entry.setdefault('MessageAttributes', {})[RELEASED_ATTRIBUTE] = {
                'DataType': 'Number', 'StringValue': str(released)}
        return self.try_sqs("send a call alone (SendMessageBatch)",
            sqs.client().send_batch, received.url, [entry])

    def postpone(self, call, received):
        "Hold back a call not yet due; tell whether it was."
        remaining = (call.eta - dt.datetime.now()).total_seconds()
        if remaining <= 1:
            return False
        transport = sqs.client()
        self.heartbeat.release(received)
        if received.receive_count >= settings.max_receive_count() - 1:
            # a fresh copy, lest the redrive policy count this one dead
            if self.try_sqs("postpone (SendMessageBatch)",
                    transport.send_batch, received.url, [message_entry(
                            '0', received.message['Body'],
                            min(int(remaining), sqs.MAX_DELAY),
                            payload_attributes(received.message),
                            received.group)]):
                self.delete(received)
        else:
            self.try_sqs("postpone (ChangeMessageVisibility)",
                transport.change_visibility_batch,
                received.url, [received.receipt],
                int(min(remaining, MAX_VISIBILITY)))
        logger.info("%s postponed, due in %i s", task_name(call), remaining)
        return True
