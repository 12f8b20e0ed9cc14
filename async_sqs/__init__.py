# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Run Tryton methods later, on workers, through Amazon SQS."
from .decorator import async_task
from .exceptions import (
    AsyncTaskError, MessageError, ResultIgnored, ResultTimeout, TaskCancelled,
    TaskFailed, TaskNotSent)
from .result import TaskHandle

__all__ = [
    'async_task', 'TaskHandle', 'AsyncTaskError', 'MessageError',
    'ResultIgnored', 'ResultTimeout', 'TaskCancelled', 'TaskFailed',
    'TaskNotSent']
