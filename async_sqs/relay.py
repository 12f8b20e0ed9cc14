# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The relay: the calls whose message was never sent, or was lost."""
import datetime as dt
import logging
from collections import defaultdict

from trytond.pool import Pool
from trytond.transaction import Transaction

from . import payload, sqs
from .message import message_group
from .rows import mark_queued

logger = logging.getLogger(__name__)


def relay_pending(database_name, before, stale_before=None):
    """Send the rows of the database left pending since before, and those
    left queued or running since stale_before.

    A pending row's message was never sent; a stale row's message may have
    been lost by any path. Sending one twice is harmless: the claim lets
    one delivery run the call."""
    transport = sqs.client()
    with Transaction().start(database_name, 0, readonly=True):
        Task = Pool(database_name).get('async_sqs.task')
        rows = Task.pending_since(before)
        stale = Task.stale_since(stale_before) if stale_before else []
    if not rows and not stale:
        return
    if rows:
        logger.warning("relay %s call(s) of %s left unsent", len(rows),
            database_name)
    if stale:
        logger.warning("relay %s call(s) of %s left queued or running "
            "since %s", len(stale), database_name, stale_before)
    by_queue = defaultdict(list)
    now = dt.datetime.now()
    for uuid, queue_name, body, eta in rows + stale:
        delay = 0
        if eta is not None and eta > now:
            delay = min(int((eta - now).total_seconds()) + 1, sqs.MAX_DELAY)
        by_queue[queue_name].append((uuid, body, delay))
    sent = []
    for queue_name, items in by_queue.items():
        url = transport.url(queue_name)
        entries = [payload.call_entry(str(i), body, delay, database_name,
                uuid, message_group(body))
            for i, (uuid, body, delay) in enumerate(items)]
        if sqs.is_fifo(queue_name):
            # the first send may have gone: SQS drops a second within its
            # five minutes of deduplication
            for entry, (uuid, _, _) in zip(entries, items):
                entry['MessageDeduplicationId'] = uuid
        for batch in sqs.batches(entries):
            transport.send_batch(url, batch)
            sent.append([items[int(e['Id'])][0] for e in batch])
    mark_queued(database_name, sent, touch=bool(stale))
