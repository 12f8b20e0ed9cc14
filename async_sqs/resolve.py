# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""What a call names, looked up again where it runs: its user, its method
and its records."""
from collections import defaultdict

from trytond import backend
from trytond.i18n import gettext
from trytond.tools import grouped_slice
from trytond.transaction import Transaction, inactive_records

from .exceptions import MessageError, RecordMissing
from .message import RecordRef, walk


def check_user(pool, call):
    "Refuse a call recorded for a user that is missing or inactive."
    # root (0) is inactive in res_user, yet cron and scripts run as it
    if call.user == 0:
        return
    User = pool.get('res.user')
    table = User.__table__()
    cursor = Transaction().connection.cursor()
    cursor.execute(*table.select(table.active,
            where=table.id == call.user))
    row = cursor.fetchone()
    if not row or not row[0]:
        raise MessageError(
            "user %s does not exist or is inactive" % call.user,
            task_id=call.task)


def resolve_method(pool, call):
    "Return the pool class and TaskOptions of the call, or refuse it."
    try:
        cls = pool.get(call.model, type=call.kind)
    except KeyError:
        raise MessageError(
            "unknown %s %s" % (call.kind, call.model), task_id=call.task)
    options = getattr(cls, '__async_tasks__', {}).get(call.method)
    if options is None:
        raise MessageError(
            "%s.%s is not an async_task" % (call.model, call.method),
            task_id=call.task)
    if call.instance is not None and call.kind != 'model':
        raise MessageError(
            "only records of models can be instances",
            task_id=call.task)
    return cls, options


def resolve_records(pool, call, cls):
    "Return args, kwargs and target with records browsed again."
    wanted = defaultdict(set)

    def collect(ref):
        wanted[ref.model].add(ref.id)
        return ref
    walk(call.args, collect)
    walk(call.kwargs, collect)
    if call.instance is not None:
        collect(RecordRef(call.model, call.instance))
    models = {model: existing_model(pool, call, model, ids)
        for model, ids in wanted.items()}

    def browse(ref):
        return models[ref.model](ref.id)
    args = walk(call.args, browse)
    kwargs = walk(call.kwargs, browse)
    if call.instance is not None:
        target = cls(call.instance)
    else:
        target = cls
    return args, kwargs, target


def existing_model(pool, call, model, ids):
    """Return the pool class of the model, once its records of ids are
    known to exist (inactive ones too)."""
    from trytond.model import ModelStorage
    try:
        Model = pool.get(model)
    except KeyError:
        raise MessageError(
            "a record of unknown model %s" % model, task_id=call.task)
    if not issubclass(Model, ModelStorage):
        raise MessageError(
            "%s does not store records" % model, task_id=call.task)
    found = set()
    with inactive_records():
        for sub_ids in grouped_slice(ids, backend.MAX_QUERY_PARAMS):
            found.update(map(int, Model.search(
                        [('id', 'in', list(sub_ids))], order=[])))
    if missing := ids - found:
        raise RecordMissing(gettext(
                'async_sqs.msg_task_record_missing',
                model=model,
                ids=', '.join(map(str, sorted(missing)[:10]))))
    return Model
