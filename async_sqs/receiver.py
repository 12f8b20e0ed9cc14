# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Receiving: the threads that long-poll the queues, and the heartbeat that
keeps hidden the messages a process holds."""
import logging
import threading
import time
from collections import defaultdict

from . import settings, sqs
from .backoff import Outage

logger = logging.getLogger(__name__)


class Received:
    "A message received from a queue, and where it came from."
    __slots__ = ('database', 'queue_name', 'url', 'message', 'slots')

    def __init__(self, database, queue_name, url, message, slots):
        self.database = database
        self.queue_name = queue_name
        self.url = url
        self.message = message
        self.slots = slots

    @property
    def receipt(self):
        return self.message['ReceiptHandle']

    @property
    def group(self):
        "The MessageGroupId of the message, or None."
        return self.message.get('Attributes', {}).get('MessageGroupId')

    @property
    def receive_count(self):
        try:
            return int(self.message.get('Attributes', {}).get(
                    'ApproximateReceiveCount', 1))
        except ValueError:
            return 1


class Heartbeat:
    """Keeps the messages a process holds hidden from the other workers.

    A message waiting in the buffer or running gets its visibility timeout
    renewed every half timeout, so a long call is not started twice."""

    def __init__(self, stopping):
        self.stopping = stopping
        self.lock = threading.Lock()
        self.held = {}
        self.outage = Outage("heartbeat (ChangeMessageVisibility)")

    def hold(self, received, timeout):
        with self.lock:
            self.held[received.receipt] = [
                received.url, timeout, time.monotonic()]

    def extend(self, received, timeout):
        """Set the visibility timeout of a message held, from now.

        A failure is left to the next beat: the message is held anyway."""
        self.hold(received, timeout)
        try:
            sqs.client().change_visibility_batch(
                received.url, [received.receipt], timeout)
        except Exception as exc:
            self.outage.failed(exc)
            self.retry_soon(received)
        else:
            self.outage.succeeded()

    def retry_soon(self, received):
        "Make the next beat extend the message again."
        with self.lock:
            entry = self.held.get(received.receipt)
            if entry is not None:
                entry[2] = 0

    def release(self, received):
        with self.lock:
            self.held.pop(received.receipt, None)

    def run(self):
        transport = sqs.client()
        while not self.stopping.wait(1):
            if not self.outage.due():
                continue
            now = time.monotonic()
            due = defaultdict(list)
            with self.lock:
                for receipt, entry in self.held.items():
                    url, timeout, extended = entry
                    if now - extended >= timeout / 2:
                        entry[2] = now
                        due[(url, timeout)].append(receipt)
            for (url, timeout), receipts in due.items():
                try:
                    transport.change_visibility_batch(url, receipts, timeout)
                except Exception as exc:
                    self.outage.failed(exc)
                    # tried again at the next beat, not half a timeout later
                    with self.lock:
                        for receipt in receipts:
                            if receipt in self.held:
                                self.held[receipt][2] = 0
                else:
                    self.outage.succeeded()


class Receiver:
    """Long-polls one queue for a process, and hands each message received
    to its buffer, held by the heartbeat.

    It holds at most prefetch messages of its queue at a time: one busy
    queue must not starve the others, and receives of ten cost a tenth of
    receives of one."""

    def __init__(self, database_name, queue_name, url, prefetch, buffer,
            heartbeat, stopping):
        self.database_name = database_name
        self.queue_name = queue_name
        self.url = url
        self.prefetch = prefetch
        self.slots = threading.Semaphore(prefetch)
        self.buffer = buffer
        self.heartbeat = heartbeat
        self.stopping = stopping
        self.thread = threading.Thread(target=self.run,
            name='receive %s' % queue_name, daemon=True)

    def start(self):
        self.thread.start()

    def join(self, timeout):
        self.thread.join(timeout)

    def acquire(self):
        "Wait for a free slot, then take as many as one receive may fill."
        if not self.slots.acquire(timeout=0.5):
            return 0
        count = 1
        while (count < min(self.prefetch, sqs.MAX_BATCH)
                and self.slots.acquire(blocking=False)):
            count += 1
        return count

    def run(self):
        transport = sqs.client()
        timeout = settings.visibility_timeout()
        outage = Outage("receive from %s" % self.queue_name)
        while not self.stopping.is_set():
            count = self.acquire()
            if not count:
                continue
            try:
                messages = transport.receive(self.url, max_number=count)
            except Exception as exc:
                messages = []
                self.stopping.wait(outage.failed(exc))
            else:
                outage.succeeded()
            for _ in range(count - len(messages)):
                self.slots.release()
            for message in messages:
                received = Received(self.database_name, self.queue_name,
                    self.url, message, self.slots)
                self.heartbeat.hold(received, timeout)
                self.buffer.put(received)
