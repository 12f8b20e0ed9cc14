# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Outages of a service the worker depends on: SQS or the database.

A failed call is logged once when an outage starts and once when it ends,
not once per message, and is tried again after a delay that doubles with
each failure."""
import logging
import threading
import time

logger = logging.getLogger(__name__)

#: Seconds before the first new try after a failure.
FIRST_DELAY = 1
#: Longest delay between two tries, in seconds.
LONGEST_DELAY = 30


class Outage:
    "The failures of one kind of call, in a row, and when to try again."

    def __init__(self, what, first=FIRST_DELAY, longest=LONGEST_DELAY):
        self.what = what
        self.first = first
        self.longest = longest
        self.failures = 0
        self.since = None
        self.retry_at = 0
        self.lock = threading.Lock()

    def __repr__(self):
        return '<Outage %s %s>' % (self.what, self.failures)

    @property
    def active(self):
        return self.failures > 0

    def due(self):
        "Tell whether a call may be tried now."
        return time.monotonic() >= self.retry_at

    def delay(self):
        "Return the seconds to wait before the next try."
        return max(0, self.retry_at - time.monotonic())

    def failed(self, exc):
        "Record a failure; log it if it starts an outage."
        with self.lock:
            self.failures += 1
            now = time.monotonic()
            if self.failures == 1:
                self.since = now
                logger.error("%s failed, trying again until it works: %s",
                    self.what, exc,
                    exc_info=logger.isEnabledFor(logging.DEBUG))
            else:
                logger.debug("%s failed again (%i): %s", self.what,
                    self.failures, exc)
            delay = min(self.first * 2 ** (self.failures - 1), self.longest)
            self.retry_at = now + delay
            return delay

    def succeeded(self):
        "Record a success; log it if it ends an outage."
        if not self.failures:
            return
        with self.lock:
            if self.failures:
                logger.warning("%s works again after %i failure(s) in %i s",
                    self.what, self.failures,
                    time.monotonic() - self.since)
            self.failures = 0
            self.since = None
            self.retry_at = 0


class Outages:
    "The outages of a process, one per kind of call."

    def __init__(self):
        self.outages = {}

    def get(self, what):
        "Return the Outage that tracks the calls of that kind."
        outage = self.outages.get(what)
        if outage is None:
            outage = self.outages[what] = Outage(what)
        return outage

    def attempt(self, what, function, *args, **kwargs):
        """Call function; tell whether it worked.

        A failure is logged once per outage of that kind of call, never
        raised: what it did not do is done again by whoever calls later
        or by the message coming back."""
        outage = self.get(what)
        try:
            function(*args, **kwargs)
        except Exception as exc:
            outage.failed(exc)
            return False
        outage.succeeded()
        return True
