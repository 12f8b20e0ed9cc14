# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Run Tryton methods later, on workers, through Amazon SQS."
import sys

from .chain import TaskGroup, group
from .decorator import async_task
from .exceptions import (
    AsyncTaskError, MessageError, ResultIgnored, ResultTimeout, TaskCancelled,
    TaskFailed, TaskNotSent, TaskTimeLimit)
from .result import TaskHandle

# The server imports trytond.wsgi, then the modules: that is when the app
# learns the routes. A console script imports this package before it reads
# its configuration, and trytond.wsgi picks the database backend at import.
if 'trytond.wsgi' in sys.modules:
    from . import routes  # noqa: F401

__all__ = [
    'async_task', 'TaskHandle', 'TaskGroup', 'group', 'AsyncTaskError',
    'MessageError', 'ResultIgnored', 'ResultTimeout', 'TaskCancelled',
    'TaskFailed', 'TaskNotSent', 'TaskTimeLimit']
