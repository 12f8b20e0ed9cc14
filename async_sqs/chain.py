# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Chains and groups: a call deferred once others are done, given their
results.

handle.then() and group(...).then() describe the next call as defer()
does, in the transaction that deferred the calls it waits for, before it
commits; its row is written with theirs, waiting, and the worker that
marks the last of them done defers it (see links)."""
import time

#: Keyword arguments of a deferred call that a call that waits refuses.
TIMED_OPTIONS = ('_delay_', '_eta_')


def check_deferrable(method):
    "Raise TypeError unless method is a deferrable method of a class."
    from .decorator import BoundAsyncTask

    # type(), not isinstance(): a wrapt proxy passes for what it wraps
    if not issubclass(type(method), BoundAsyncTask):
        raise TypeError("then() takes a method decorated with async_task, "
            "as Model.method or record.method, not %r" % (method,))


def then(handles, method, args, kwargs, gather=False):
    """Defer method once the calls of handles are done, and return its
    handle.

    Its first argument is the result of the one call, or with gather the
    list of the results of the calls, in their order."""
    from trytond.transaction import Transaction

    from .links import add_link
    from .outbox import Outbox
    check_deferrable(method)
    for name in TIMED_OPTIONS:
        if name in kwargs:
            raise TypeError("then() takes no %s: a call that waits runs "
                "with the delay of its method, once it is due" % name)
    transaction = Transaction()
    if transaction.database is None:
        raise RuntimeError("then() can be called only inside the Tryton "
            "transaction that deferred the calls it follows")
    outbox = Outbox.of(transaction)
    rows = {row['uuid']: row for row, *_ in outbox.entries}
    for handle in handles:
        if handle.task_id not in rows:
            raise RuntimeError("then() follows only calls deferred in the "
                "same transaction, before it commits: task %s is %s"
                % (handle.task_id, handle.state))
    link = method.defer(*args, **kwargs)
    row, = [r for r, *_ in outbox.entries[-1:] if r['uuid'] == link.task_id]
    # due once those it waits for are done: written waiting, not sent
    row.update(state='waiting', waiting_for=len(handles), eta=None)
    for index, handle in enumerate(handles):
        add_link(rows[handle.task_id], link.task_id,
            index if gather else None)
    return link


class TaskGroup:
    """Deferred calls waited for, or followed, as one.

    wait() returns their results in order; then() defers a call once every
    one of them is done, with the list of their results as first
    argument."""

    def __init__(self, handles):
        self.handles = list(handles)

    def __repr__(self):
        return '<TaskGroup %s>' % ' '.join(h.task_id for h in self.handles)

    def __iter__(self):
        return iter(self.handles)

    def __len__(self):
        return len(self.handles)

    def ready(self):
        "Tell whether the result of every call is in, without waiting."
        return all(h.ready() for h in self.handles)

    def wait(self, timeout=None):
        """Return the results of the calls, in order, waiting up to timeout
        seconds in all.

        Raise what wait() of the first call that failed raises, in their
        order, or ResultTimeout for the first not in by then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for handle in self.handles:
            remaining = None
            if deadline is not None:
                remaining = max(0, deadline - time.monotonic())
            results.append(handle.wait(remaining))
        return results

    def then(self, method, *args, **kwargs):
        """Defer method once every call of the group is done, with the list
        of their results as first argument, and return its handle.

        Called in the transaction that deferred the calls, before it
        commits. Each of them done gathers its result on the row of the
        call, under its lock; the last defers it, once. If one fails for
        good, or is cancelled, so is the call."""
        if not self.handles:
            check_deferrable(method)
            return method.defer([], *args, **kwargs)
        return then(self.handles, method, args, kwargs, gather=True)


def group(*handles):
    "Return the TaskGroup of the handles of deferred calls."
    return TaskGroup(handles)
