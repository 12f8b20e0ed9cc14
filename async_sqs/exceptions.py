# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
from trytond.exceptions import UserError


class AsyncTaskError(Exception):
    "Base class of the errors raised by async_sqs."


class MessageError(AsyncTaskError, ValueError):
    "A message that is malformed, unsigned or names an undecorated method."

    def __init__(self, reason, message_id=None, task_id=None):
        super().__init__(reason)
        self.reason = reason
        self.message_id = message_id
        self.task_id = task_id


class PayloadRefused(MessageError):
    "A message whose body in S3 is missing or is not the one signed."


class PayloadUnavailable(AsyncTaskError):
    "S3 did not give or take a message body, for now."


class SigningKeyMissing(AsyncTaskError, RuntimeError):
    "No [async_sqs] secret to sign or check messages, and insecure is off."

    def __init__(self):
        super().__init__(
            "[async_sqs] secret is not set: messages cannot be signed or "
            "checked; set a secret, or insecure = True to run unsigned")


class SendFailed(AsyncTaskError):
    "SQS refused entries of a batch."

    def __init__(self, failures):
        super().__init__("SQS refused %s message(s): %s" % (
                len(failures), '; '.join(
                    '%s %s' % (f.get('Code'), f.get('Message', ''))
                    for f in failures)))
        self.failures = failures


class ResultTimeout(AsyncTaskError, TimeoutError):
    "The result of a task did not arrive within the time given to wait()."

    def __init__(self, task_id, timeout):
        super().__init__(
            "no result for task %s within %s s" % (task_id, timeout))
        self.task_id = task_id
        self.timeout = timeout


class ResultIgnored(AsyncTaskError, RuntimeError):
    "wait() on a task whose method was declared with ignore_result=True."

    def __init__(self, task_id):
        super().__init__(
            "task %s was deferred with ignore_result=True: "
            "it sends no result to wait for" % task_id)
        self.task_id = task_id


class TaskNotSent(AsyncTaskError, RuntimeError):
    "wait() on a task whose transaction has not committed, or rolled back."

    def __init__(self, task_id, state):
        super().__init__(
            "task %s is %s: a deferred call leaves when its transaction "
            "commits, and wait() needs it gone" % (task_id, state))
        self.task_id = task_id
        self.state = state


class TaskFailed(AsyncTaskError):
    "The task raised an exception in the worker."

    def __init__(self, task_id, exc_type, message, traceback=''):
        super().__init__(
            "task %s failed with %s: %s" % (task_id, exc_type, message))
        self.task_id = task_id
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback


class TaskTimeLimit(AsyncTaskError):
    "Raised inside a call that ran past its soft time limit."

    def __init__(self, limit):
        super().__init__("soft time limit of %s s exceeded" % limit)
        self.limit = limit


class TaskCancelled(AsyncTaskError):
    "The task was cancelled before it ran."

    def __init__(self, task_id):
        super().__init__("task %s was cancelled" % task_id)
        self.task_id = task_id


class TaskStateError(UserError):
    "A retry or cancel of a task in a state that does not allow it."


class RecordMissing(UserError):
    "A record that a deferred call names no longer exists."
