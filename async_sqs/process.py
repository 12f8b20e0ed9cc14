# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""One worker process: receivers feed a buffer, the process runs what it
holds one call at a time, deletes in batches and relays."""
import datetime as dt
import logging
import os
import queue as queue_module
import socket
import threading
import time
from collections import defaultdict

from trytond.pool import Pool
from trytond.transaction import Transaction

from . import settings, sqs
from .backoff import Outage
from .exceptions import MessageError, PayloadRefused, PayloadUnavailable
from .message import decode_call, decode_calls, verify
from .payload import read_body
from .receiver import Heartbeat, Receiver
from .relay import relay_pending
from .rows import read_rows, task_queues
from .runner import Runner, database_errors
from .stopping import Stopper, start_listeners
from .weights import DEFAULT_WEIGHT, WeightedBuffer, parse_queue

logger = logging.getLogger(__name__)


class WorkerProcess(Runner):
    """One worker process: receiver threads feeding one executor.

    queue_names are NAME or NAME:WEIGHT, as --queue takes them."""

    def __init__(self, database_names, queue_names=None, prefetch=None,
            relay=False, watch=None):
        self.database_names = database_names
        self.queue_names, self.weights = self.read_weights(queue_names)
        self.prefetch = prefetch or settings.prefetch()
        self.relay = relay
        self.stopping = threading.Event()
        super().__init__('%s:%s' % (socket.gethostname(), os.getpid()),
            Heartbeat(self.stopping), watch, Stopper(watch))
        self.buffer = WeightedBuffer()
        self.to_delete = defaultdict(list)
        self.next_relay = 0

    def stop(self, *args):
        self.stopping.set()

    def init_pools(self):
        database_list = Pool.database_list()
        for database_name in self.database_names:
            pool = Pool(database_name)
            if database_name not in database_list:
                with Transaction().start(database_name, 0, readonly=True):
                    pool.init()

    @staticmethod
    def read_weights(queue_specs):
        """Return the queue names of the specs (None for none) and the
        weight of each queue: that of its spec, else of queue_weights."""
        weights = settings.queue_weights()
        if not queue_specs:
            return None, weights
        names = []
        for name, weight in map(parse_queue, queue_specs):
            names.append(name)
            if weight is not None:
                weights[name] = weight
        return names, weights

    def queues(self):
        "Return (database, queue name) of every queue to listen on."
        result = []
        for database_name in self.database_names:
            if self.queue_names:
                names = list(self.queue_names)
            else:
                names = task_queues(database_name)
            for name in names:
                result.append((database_name, name))
        return result

    def run(self):
        self.init_pools()
        self.stopper.install()
        start_listeners(self.database_names, self.stopper, self.stopping)
        receivers = self.start_receivers()
        if receivers is None:
            return
        threading.Thread(
            target=self.heartbeat.run, name='heartbeat', daemon=True).start()
        logger.info("ready, pid %s listens on %s", os.getpid(),
            self.listening(receivers))
        try:
            while not self.stopping.is_set():
                self.run_once()
        finally:
            # calls in flight are done; give back what was not started
            for receiver in receivers:
                receiver.join(settings.wait_time() + 5)
            self.release_buffer()
            self.flush_deletes(force=True)
            self.send_replies(force=True)

    def start_receivers(self):
        "Start a receiver per queue; None if stopped before all could."
        transport = sqs.client()
        receivers = []
        for database_name, name in self.queues():
            queue_name = sqs.task_queue_name(database_name, name)
            url = self.queue_url(transport, queue_name)
            if url is None:
                return None
            # a lane each: the buffer takes from them by weight
            lane = self.buffer.lane((database_name, queue_name),
                self.weights.get(name, DEFAULT_WEIGHT))
            receiver = Receiver(database_name, queue_name, url,
                self.prefetch, lane, self.heartbeat, self.stopping)
            receiver.start()
            receivers.append(receiver)
        return receivers

    def listening(self, receivers):
        "Return the queues of the receivers, with their weights if any."
        if not self.buffer.weighted:
            return ', '.join(r.queue_name for r in receivers)
        return ', '.join('%s (weight %s)' % (r.queue_name,
                self.buffer.weights[(r.database_name, r.queue_name)])
            for r in receivers)

    def run_once(self):
        "Relay if due, then handle the next message held, if any."
        if self.relay and time.monotonic() >= self.next_relay:
            self.relay_due()
        self.send_replies()
        try:
            received = self.buffer.get(timeout=0.5)
        except queue_module.Empty:
            self.flush_deletes()
            return
        try:
            self.handle(received)
        except Exception:
            # the message comes back after its visibility timeout
            logger.critical("message %s could not be handled",
                received.message.get('MessageId'), exc_info=True)
        finally:
            self.heartbeat.release(received)
            received.slots.release()
        if self.buffer.empty():
            self.flush_deletes()

    def queue_url(self, transport, queue_name):
        "Return the URL of the queue, waiting for SQS; None if stopped."
        outage = Outage("open queue %s" % queue_name)
        while not self.stopping.is_set():
            try:
                url = transport.url(queue_name)
            except Exception as exc:
                self.stopping.wait(outage.failed(exc))
            else:
                outage.succeeded()
                return url

    def release_buffer(self):
        "Make the messages received but not started visible again."
        released = defaultdict(list)
        while True:
            try:
                received = self.buffer.get_nowait()
            except queue_module.Empty:
                break
            self.heartbeat.release(received)
            released[received.url].append(received.receipt)
        transport = sqs.client()
        for url, receipts in released.items():
            logger.info("release %s message(s) of %s", len(receipts), url)
            # not released, they come back after their visibility timeout
            self.try_sqs("release (ChangeMessageVisibility)",
                transport.change_visibility_batch, url, receipts, 0)

    def flush_deletes(self, force=False):
        """Delete the messages of the calls settled.

        What SQS did not delete is kept for the next flush: a message that
        comes back meanwhile is skipped by its row."""
        outage = self.outage("delete (DeleteMessageBatch)")
        if not self.to_delete or not (force or outage.due()):
            return
        to_delete, self.to_delete = self.to_delete, defaultdict(list)
        transport = sqs.client()
        for url, receipts in to_delete.items():
            if not self.try_sqs(outage.what,
                    transport.delete_batch, url, receipts):
                self.to_delete[url].extend(receipts)

    def delete(self, received):
        self.to_delete[received.url].append(received.receipt)
        if len(self.to_delete[received.url]) >= sqs.MAX_BATCH:
            self.flush_deletes()

    def handle(self, received):
        "Run the calls of a message received, and settle it."
        calls, packed = self.decode(received)
        if calls is None:
            return
        if not packed:
            call, = calls
            if call.eta is not None and self.postpone(call, received):
                self.hold_back_group(received)
                return
            if self.attempt_call(call, received, packed=False):
                self.delete(received)
            else:
                self.hold_back_group(received)
        elif self.run_packed(calls, received):
            self.delete(received)

    def hold_back_group(self, received):
        """Give back the messages held of the FIFO group of a message that
        comes back later, so that they run after it, in their order: SQS
        delivers none of the group while it is hidden."""
        if not received.group or not sqs.is_fifo(received.url):
            return
        back = self.buffer.take_out(lambda other:
            (other.url, other.group) == (received.url, received.group))
        for other in back:
            self.heartbeat.release(other)
            other.slots.release()
        if back:
            self.try_sqs("hold back (ChangeMessageVisibility)",
                sqs.client().change_visibility_batch, received.url,
                [other.receipt for other in back], 0)

    def decode(self, received):
        """Return the calls of the message and whether it packs several;
        None for calls refused, and parked in the dead-letter queue."""
        message = received.message
        message_id = message.get('MessageId')
        try:
            # the signature first: nothing of an unsigned body is read
            verify(message)
            body = self.read_body(received)
            if body is None:
                return None, False
            calls, packed = decode_calls(body, message_id)
            for call in calls:
                if call.database != received.database:
                    raise MessageError(
                        "database %s is not the queue's" % call.database,
                        message_id, call.task)
        except PayloadRefused as exc:
            self.refuse_payload(received, exc)
            return None, False
        except MessageError as exc:
            logger.error("message %s refused (task %s): %s",
                message_id, exc.task_id, exc.reason)
            # no row to write: the dead-letter queue is its only record
            if self.dead_letter(received, exc.reason):
                self.delete(received)
            return None, False
        return calls, packed

    def read_body(self, received):
        """Return the body of a message, read from S3 if it is there; None
        when S3 fails: the message is released, to come back later."""
        outage = self.outage("read a body (S3 GetObject)")
        try:
            body, _ = read_body(received.message)
        except PayloadUnavailable as exc:
            # S3's trouble, not the call's: as an outage of the database
            outage.failed(exc)
            logger.info("message %s released: its body is not read",
                received.message.get('MessageId'))
            if self.release(None, received, False):
                self.delete(received)
            return None
        outage.succeeded()
        return body

    def refuse_payload(self, received, exc):
        """Refuse the call of a message whose body in S3 is missing or not
        the one signed, as any refusal: once its row says failed, to the
        dead-letter queue. A row that ended already makes it a redelivery,
        skipped; a body deleted with its call is one."""
        try:
            row = read_rows(received.database, [exc.task_id] if exc.task_id
                else [], columns=('uuid', 'body')).get(exc.task_id)
        except database_errors():
            if self.release(None, received, False):
                self.delete(received)
            return
        call = None
        if row is not None:
            try:
                call = decode_call(row['body'])
            except MessageError:
                pass
        if call is None or call.database != received.database:
            logger.error("message %s refused (task %s): %s",
                received.message.get('MessageId'), exc.task_id, exc.reason)
            # no row to write: the dead-letter queue is its only record
            if self.dead_letter(received, exc.reason):
                self.drop_payload(received)
                self.delete(received)
        elif self.attempt_call(call, received, False, refusal=exc):
            self.delete(received)

    def run_packed(self, calls, received):
        "Run the calls that share a message; tell whether all are settled."
        settled = True
        for call in calls:
            if self.stopping.is_set():
                # the calls that ran are skipped when it comes back
                logger.info("message %s released part done",
                    received.message.get('MessageId'))
                self.release_now(received)
                return False
            if call.eta is not None and call.eta > dt.datetime.now():
                settled &= self.send_alone(call, received, 0)
                continue
            settled &= self.attempt_call(call, received, packed=True)
        return settled

    def release_now(self, received):
        "Make a message held visible again at once."
        self.heartbeat.release(received)
        self.try_sqs("release (ChangeMessageVisibility)",
            sqs.client().change_visibility_batch,
            received.url, [received.receipt], 0)

    def relay_due(self):
        "Send again the calls committed but left unsent, and those lost."
        grace = settings.relay_grace()
        self.next_relay = time.monotonic() + max(1, grace / 2)
        now = dt.datetime.now()
        before = now - dt.timedelta(seconds=grace)
        for database_name in self.database_names:
            outage = self.outage("relay on %s" % database_name)
            if not outage.due():
                continue
            try:
                stale_before = now - dt.timedelta(
                    seconds=settings.stale_after())
                relay_pending(database_name, before, stale_before)
            except Exception as exc:
                outage.failed(exc)
            else:
                outage.succeeded()
