# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The weights of the queues of a worker process: how they are written, and
the buffer that hands out the messages held in proportion to them."""
import itertools
import queue as queue_module
import re
import threading
from collections import deque

#: The weight of a queue that no option names.
DEFAULT_WEIGHT = 1
#: The largest weight of a queue.
MAX_WEIGHT = 100

_SEPARATORS = re.compile(r'[,\n]')


def parse_weight(text, where):
    "Return the weight written as text; where names it in the error."
    try:
        weight = int(text.strip())
    except ValueError:
        raise ValueError("%s: the weight must be a whole number, not %r"
            % (where, text.strip())) from None
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError("%s: the weight must be within 1 to %s, not %s"
            % (where, MAX_WEIGHT, weight))
    return weight


def parse_queue(text):
    """Return the name and the weight of NAME[:WEIGHT], as --queue takes it;
    the weight is None when not written."""
    name, colon, weight = text.strip().partition(':')
    name = name.strip()
    if not name:
        raise ValueError("%r has no queue name (NAME[:WEIGHT])" % text)
    if not colon:
        return name, None
    return name, parse_weight(weight, "queue %s" % name)


def parse_weights(text, option='[async_sqs] queue_weights'):
    """Return the weight of each queue named in text: NAME:WEIGHT entries
    separated by commas or lines."""
    weights = {}
    for entry in map(str.strip, _SEPARATORS.split(text or '')):
        if not entry:
            continue
        try:
            name, weight = parse_queue(entry)
        except ValueError as exc:
            raise ValueError("%s: %s" % (option, exc)) from None
        if weight is None:
            raise ValueError("%s: %r has no weight (NAME:WEIGHT)"
                % (option, entry))
        if name in weights:
            raise ValueError("%s: queue %s is named twice" % (option, name))
        weights[name] = weight
    return weights


class SmoothWeighted:
    """Smooth weighted round robin, as nginx shares requests between its
    upstream servers.

    Among the keys that have something to give, each pick adds to every one
    its weight and takes the one that has most, which then gives back the
    weights of all: over the weights' sum of picks, each key is picked as
    many times as its weight, spread out (3:1 is a a b a), and a key of
    weight 1 is picked at least once. A key that has nothing to give is
    left out and keeps its count: it gains nothing while it waits."""

    def __init__(self, weights):
        self.weights = dict(weights)
        self.current = dict.fromkeys(self.weights, 0)

    def pick(self, eligible):
        "Return the key of eligible (in order, ties to the first) to serve."
        best, total = None, 0
        for key in eligible:
            self.current[key] += self.weights[key]
            total += self.weights[key]
            if best is None or self.current[key] > self.current[best]:
                best = key
        if best is not None:
            self.current[best] -= total
        return best


class Lane:
    "What a receiver puts its messages in: its queue's part of the buffer."
    __slots__ = ('buffer', 'key')

    def __init__(self, buffer, key):
        self.buffer = buffer
        self.key = key

    def put(self, item):
        self.buffer.put(self.key, item)


class WeightedBuffer:
    """The messages a process holds and has not started, a lane per queue.

    With weights that differ, the next message comes from the lanes that
    hold some by smooth weighted round robin; with equal weights, it is the
    first one received, as from one shared queue. get and get_nowait raise
    queue.Empty as queue.Queue does."""

    def __init__(self):
        self.condition = threading.Condition()
        self.lanes = {}
        self.weights = {}
        self.picker = None
        self.arrivals = itertools.count()

    def lane(self, key, weight=DEFAULT_WEIGHT):
        "Return the lane of key, of that weight, to put messages in."
        with self.condition:
            self.lanes.setdefault(key, deque())
            self.weights[key] = weight
            if len(set(self.weights.values())) > 1:
                self.picker = SmoothWeighted(self.weights)
            else:
                self.picker = None
        return Lane(self, key)

    @property
    def weighted(self):
        "Tell whether the lanes are taken from by weight."
        return self.picker is not None

    def put(self, key, item):
        with self.condition:
            self.lanes[key].append((next(self.arrivals), item))
            self.condition.notify()

    def get(self, timeout=None):
        "Return the next message to run, waiting at most timeout for one."
        with self.condition:
            if not self.condition.wait_for(self._held, timeout):
                raise queue_module.Empty
            return self._take()

    def get_nowait(self):
        with self.condition:
            if not self._held():
                raise queue_module.Empty
            return self._take()

    def take_out(self, predicate):
        """Remove the messages held for which predicate is true and return
        them; the others keep their places and the turns are unchanged."""
        taken = []
        with self.condition:
            for lane in self.lanes.values():
                kept = []
                for entry in lane:
                    (taken if predicate(entry[1]) else kept).append(entry)
                lane.clear()
                lane.extend(kept)
        return [item for _, item in sorted(taken, key=lambda e: e[0])]

    def empty(self):
        with self.condition:
            return not self._held()

    def _held(self):
        return any(self.lanes.values())

    def _take(self):
        eligible = [k for k, lane in self.lanes.items() if lane]
        if self.picker is not None:
            key = self.picker.pick(eligible)
        else:
            key = min(eligible, key=lambda k: self.lanes[k][0][0])
        return self.lanes[key].popleft()[1]
