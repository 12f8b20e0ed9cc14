# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Running one call: claim, run, finish, retry, reply; the messages it
gives back to SQS are requeue's.

A Runner holds what a worker process needs to settle the calls it receives;
the process feeds it messages, eager mode feeds it the calls of a commit."""
import datetime as dt
import logging
import time
import traceback
from contextlib import contextmanager, nullcontext

from trytond import backend, config
from trytond.exceptions import UserError, UserWarning
from trytond.pool import Pool
from trytond.status import processing
from trytond.transaction import Transaction, check_access

from . import links, settings, sqs, unique
from .backoff import Outages
from .exceptions import MessageError, TaskCancelled
from .limits import time_limits
from .message import CANCELLED, CHECK_ACCESS, encode_reply
from .payload import discard
from .replies import Replies
from .requeue import MAX_VISIBILITY, Requeue, task_name
from .resolve import check_user, resolve_method, resolve_records

logger = logging.getLogger(__name__)

#: Why a message without a task row is refused.
NO_ROW = "no task row: the call was never committed"
#: What run_call returns for a call that ran already.
SKIPPED = object()


def database_errors():
    "Return the exceptions that are the database's trouble, not the call's."
    return (backend.DatabaseOperationalError, backend.DatabaseTimeoutError)


def error_payload(exc):
    "Return the description of an exception that a reply carries."
    if isinstance(exc, (UserError, UserWarning)):
        return {
            'type': 'UserError',
            'message': exc.message,
            'description': exc.description or '',
            }
    return {
        'type': '%s.%s' % (type(exc).__module__, type(exc).__qualname__),
        'message': str(exc),
        'traceback': ''.join(traceback.format_exception(exc)),
        }


def refusal_payload(exc):
    "Return the description of a MessageError that a reply carries."
    return {'type': 'MessageError', 'message': exc.reason}


class Attempt:
    "One attempt at a call: its number, options and timing."

    def __init__(self, call, received, refusal=None):
        self.call = call
        self.received = received
        # why the call must not run, past its claim
        self.refusal = refusal
        self.receive_count = received.receive_count
        self.started_at = dt.datetime.now()
        self.started = time.monotonic()
        self.number = None
        self.state = None
        self.options = None

    def duration(self):
        return (time.monotonic() - self.started) * 1000


class Runner(Requeue):
    """Runs calls and settles them: row, reply, dead letter, release.

    delete() and the heartbeat are the process's: a runner without a
    process (eager mode) has neither messages to delete nor to keep."""

    def __init__(self, host, heartbeat, watch=None, stopper=None):
        self.host = host
        self.heartbeat = heartbeat
        # shared with the supervisor, which ends a call past its time limit
        self.watch = watch
        # told by the stop listeners which running call was cancelled
        self.stopper = stopper
        self.outages = Outages()
        self.replies = Replies(self.outages)

    def outage(self, what):
        "Return the Outage that tracks the calls of that kind."
        return self.outages.get(what)

    def try_sqs(self, what, function, *args, **kwargs):
        """Call function; tell whether it worked, a failure logged once per
        outage of that kind of call, never raised."""
        return self.outages.attempt(what, function, *args, **kwargs)

    def delete(self, received):
        "Delete the message once the calls it carries are settled."

    def attempt_call(self, call, received, packed, refusal=None):
        """Run one call of the message and record how it ended.

        Return whether the call is settled: its message may be deleted as
        far as it goes. A call of a packed message that must come back, or
        be parked, goes alone in a message of its own, so the others of its
        message are not held back. With refusal, a MessageError, the call
        is claimed and refused rather than run."""
        name = task_name(call)
        attempt = Attempt(call, received, refusal)
        logger.info("%s starts", name)
        try:
            with processing(name):
                reply = self.run_call(attempt)
        except database_errors() as exc:
            # the database's trouble, not the call's: no attempt is counted
            # and nothing is decided; the call comes back later
            logger.warning("%s released: the database failed for %i ms, "
                "the call is tried again later: %s", name,
                attempt.duration(), exc)
            return self.release(call, received, packed)
        except MessageError as exc:
            return self.refuse(call, received, attempt, exc, packed)
        except TaskCancelled:
            return self.cancelled(call, received, attempt, packed)
        except (UserError, UserWarning) as exc:
            logger.info("%s failed after %i ms: %s", name, attempt.duration(),
                exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            return self.fail(call, received, attempt, exc, True, packed)
        except Exception as exc:
            return self.fail(call, received, attempt, exc,
                self.failed_for_good(attempt), packed)
        if reply is SKIPPED:
            logger.info("%s skipped: %s already", name, attempt.state)
        else:
            logger.info("%s done in %i ms", name, attempt.duration())
            if call.reply:
                self.reply(call, received, reply)
        self.drop_payload(received)
        return True

    def failed_for_good(self, attempt):
        "Log the failure of the attempt; tell whether it was the call's last."
        retries = attempt.options.retries if attempt.options else 0
        logger.error("%s failed after %i ms (attempt %s of %s)",
            task_name(attempt.call), attempt.duration(),
            attempt.number or attempt.receive_count, retries + 1,
            exc_info=True)
        return self.last_attempt(attempt)

    def last_attempt(self, attempt):
        "Tell whether a failure of the attempt would be the call's last."
        retries = attempt.options.retries if attempt.options else 0
        number = attempt.number or attempt.receive_count
        # past max_receive_count SQS would park it before it ran again
        return (number > retries
            or attempt.receive_count >= settings.max_receive_count())

    def refuse(self, call, received, attempt, exc, packed):
        """Refuse a call the worker must not run: its row says failed, then
        the waiter and the dead-letter queue are told.

        Return whether the call is settled."""
        logger.error("%s refused: %s", task_name(call), exc.reason)
        payload = refusal_payload(exc)
        if attempt.number is not None or exc.reason != NO_ROW:
            if not self.record(call, 'failed', attempt, payload):
                return self.release(call, received, packed)
        if call.reply and exc.reason != NO_ROW:
            self.reply(call, received, encode_reply(call.task, error=payload))
        self.drop_payload(received)
        return self.dead_letter(
            received, exc.reason, call if packed else None)

    def fail(self, call, received, attempt, exc, final, packed):
        """Record a failed attempt; retry later, or fail the task for good.

        Return whether the call is settled. A call fails for good only once
        its row says so: the reply and the dead letter come after."""
        payload = error_payload(exc)
        if final:
            if not self.record(call, 'failed', attempt, payload):
                return self.release(call, received, packed)
            self.drop_payload(received)
            if call.reply:
                self.reply(
                    call, received, encode_reply(call.task, error=payload))
            if isinstance(exc, (UserError, UserWarning)):
                return True
            # parked for an administrator to look at, and requeue
            return self.dead_letter(
                received, payload['message'], call if packed else None)
        number = attempt.number or attempt.receive_count
        backoff = attempt.options.retry_backoff * 2 ** (number - 1)
        delay = int(min(backoff, MAX_VISIBILITY))
        # if the row cannot say so, the message still comes back
        self.record(call, 'queued', attempt, payload,
            eta=dt.datetime.now() + dt.timedelta(seconds=delay))
        logger.info("%s retries in %i s", task_name(call), delay)
        if packed:
            return self.send_alone(call, received, delay)
        self.heartbeat.release(received)
        self.try_sqs("retry (ChangeMessageVisibility)",
            sqs.client().change_visibility_batch,
            received.url, [received.receipt], delay)
        return False

    def cancelled(self, call, received, attempt, packed):
        """Record that a call cancelled while it ran was stopped, its
        transaction rolled back; tell its waiter.

        Return whether the call is settled."""
        logger.warning("%s cancelled after %i ms: rolled back",
            task_name(call), attempt.duration())
        if not self.record(call, 'cancelled', attempt,
                {'type': CANCELLED, 'message': "the task was cancelled"}):
            return self.release(call, received, packed)
        if call.reply:
            self.reply(call, received, encode_reply(call.task, error={
                        'type': CANCELLED,
                        'message': "task %s was cancelled" % call.task,
                        }))
        return True

    def record(self, call, state, attempt, payload=None, eta=None):
        """Write the outcome of an attempt on the task row, as root: the
        error payload that ended it, if any.

        Return whether it is written and committed."""
        payload = payload or {}
        retry = config.getint('database', 'retry')
        for count in range(retry + 1):
            try:
                with Transaction().start(call.database, 0):
                    Task = Pool(call.database).get('async_sqs.task')
                    Task.finish(call.task, state,
                        started_at=attempt.started_at,
                        error_type=payload.get('type'),
                        error=payload.get('message'),
                        error_description=payload.get('description'),
                        traceback=payload.get('traceback'),
                        attempts=attempt.number or attempt.receive_count,
                        worker=self.host, eta=eta)
                    if state in links.ENDS:
                        # the calls that wait for it are told with its end
                        links.abandon([call.task], state, payload)
                return True
            except database_errors():
                if count < retry:
                    time.sleep(0.02 * (count + 1))
                    continue
                logger.warning("%s: the task row could not be marked %s",
                    task_name(call), state, exc_info=True)
            except Exception:
                logger.error("%s: the task row could not be marked %s",
                    task_name(call), state, exc_info=True)
                break
        return False

    def run_call(self, attempt):
        """Run the call in its own transaction, committed before return.

        Return the reply body, or SKIPPED when the row says the call ran
        already. A lock or serialization conflict runs it again at once, up
        to [database] retry times."""
        # a call that runs holds its key no more, as everyone must see
        unique.release(attempt.call)
        retry = config.getint('database', 'retry')
        count = 0
        while True:
            try:
                with Transaction().start(attempt.call.database,
                        attempt.call.user, context=attempt.call.context):
                    return self.run_in_transaction(attempt)
            except backend.DatabaseOperationalError:
                if count < retry:
                    count += 1
                    logger.debug("%s retry %i", task_name(attempt.call),
                        count)
                    time.sleep(0.02 * count)
                    continue
                raise

    def run_in_transaction(self, attempt):
        """Claim the row, run the call and mark the row done, in the
        transaction of the call.

        The reply is encoded inside the transaction, where records still
        have their id."""
        call = attempt.call
        pool = Pool(call.database)
        Task = pool.get('async_sqs.task')
        # at-least-once delivery: the row lock and 'done' make a repeat a
        # no-op
        attempt.state, attempt.number = Task.claim(
            call.task, attempt.receive_count, self.host)
        if attempt.number is None:
            if attempt.state is None:
                raise MessageError(NO_ROW, task_id=call.task)
            return SKIPPED
        if attempt.refusal is not None:
            # its body in S3 is not the call's: the row says failed
            raise attempt.refusal
        with self.stoppable(call):
            result = self.run_method(pool, attempt)
        reply, error = None, {}
        if call.reply:
            reply, error = self.encode_result(call, result)
        # the outcome lasts with the row: any process can read it, as often
        # as it likes, once this commits
        Task.finish(call.task, 'done', started_at=attempt.started_at,
            attempts=attempt.number, worker=self.host, result=reply,
            error_type=error.get('type'), error=error.get('message'),
            traceback=error.get('traceback'))
        # exactly once: the calls that wait for this one are deferred with
        # its done, or not at all
        links.advance(call.task, result)
        return reply

    def run_method(self, pool, attempt):
        "Check the call, resolve its records and run its method."
        call = attempt.call
        check_user(pool, call)
        cls, attempt.options = resolve_method(pool, call)
        if attempt.options.visibility_timeout is not None:
            self.heartbeat.extend(
                attempt.received, attempt.options.visibility_timeout)
        args, kwargs, target = resolve_records(pool, call, cls)
        # a call deferred from an HTTP route is checked as the RPC call of
        # the Tryton client would be
        checks = (check_access() if call.context.get(CHECK_ACCESS)
            else nullcontext())
        with checks, time_limits(self.watch, attempt,
                self.last_attempt(attempt)):
            return getattr(target, call.method)(*args, **kwargs)

    @contextmanager
    def stoppable(self, call):
        """Let a cancel stop the call while the block runs.

        A call that was asked to stop does not commit, even if it swallowed
        TaskCancelled and returned."""
        if self.stopper is None:
            yield
            return
        self.stopper.start(call.database, call.task)
        try:
            yield
        finally:
            stopped = self.stopper.end()
        if stopped:
            raise TaskCancelled(call.task)

    def encode_result(self, call, result):
        """Return the reply body of a result, or of the error encoding it,
        and that error's payload (empty if none)."""
        try:
            return encode_reply(call.task, result), {}
        except (TypeError, ValueError) as exc:
            # the call's effects stand: only its result cannot travel
            logger.error("%s: the result cannot be sent: %s",
                task_name(call), exc)
            payload = error_payload(exc)
            return encode_reply(call.task, error=payload), payload

    def reply(self, call, received, body):
        """Send the reply body to the call's reply queue, or to the reply
        queue of the caller's process, now or later."""
        self.replies.send(task_name(call), call, received.url, body)

    def drop_payload(self, received):
        """Delete the body in S3 of a message whose call ended for good, or
        was skipped: a copy still in flight skips it too."""
        discard(received.message)

    def send_replies(self, force=False):
        "Send the replies not sent yet."
        self.replies.flush(force=force)
