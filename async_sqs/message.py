# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""The wire format of deferred calls and of their results.

A message is JSON written by Tryton's own encoder, so datetime, date, time,
timedelta, Decimal and bytes keep their type; records travel as a reference
(model name and id) and are browsed again by the reader."""
import datetime as dt
import functools
import hashlib
import hmac
import json
import re
from collections import namedtuple

from . import settings
from .exceptions import MessageError, SigningKeyMissing
from .sqs import MAX_MESSAGE_SIZE

#: Version of the format, refused when unknown.
FORMAT_VERSION = 1
#: Type tag of a record reference.
RECORD_CLASS = 'async_sqs.Record'
#: Pool types a call may name.
KINDS = ('model', 'wizard', 'report')

#: Context key of a call that runs with the access checks of an RPC call,
#: as the HTTP routes defer them.
CHECK_ACCESS = 'async_sqs_check_access'

#: Most calls one message may carry.
MAX_CALLS_PER_MESSAGE = 100
#: Most bytes of the calls packed in one message: one 64 KiB chunk, which
#: SQS bills as one request.
MAX_PACKED_SIZE = 64 * 1024

_TASK_ID = re.compile(r'^[0-9a-f]{32}$')
_MODEL = re.compile(r'^[A-Za-z0-9_.]{1,128}$')
_METHOD = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,127}$')
_DATABASE = re.compile(r'^[^\x00-\x1f/\\]{1,128}$')
_QUEUE_NAME = re.compile(r'^[A-Za-z0-9_-]{1,80}$')
_CALL_KEYS = {
    'v', 'task', 'database', 'user', 'context', 'model', 'kind', 'method',
    'instance', 'args', 'kwargs', 'reply', 'queue', 'eta'}
#: Keys of a call that only some calls have: older callers never wrote
#: them, and a call without one is as an older caller meant it.
_OPTIONAL_CALL_KEYS = {'reply_to', 'tenant'}
#: What SQS allows in a MessageGroupId.
_GROUP_ID = re.compile(r'^[!-~]{1,128}$')
_REPLY_KEYS = {'v', 'task', 'ok', 'result', 'error'}


class RecordRef(namedtuple('RecordRef', ['model', 'id'])):
    "A record as it travels: its model name and id."
    __slots__ = ()


Call = namedtuple('Call', [
        'task', 'database', 'user', 'context', 'model', 'kind', 'method',
        'instance', 'args', 'kwargs', 'reply', 'queue', 'eta', 'reply_to',
        'tenant'],
    defaults=[None, None, None])
Call.__doc__ = """The description of one deferred call: eta is naive UTC;
reply_to the name of the queue the reply goes to, None for the reply queue
of the call; tenant the MessageGroupId its messages carry, if any."""

Reply = namedtuple('Reply', ['task', 'ok', 'result', 'error'])
Reply.__doc__ = "The outcome of one call: its result, or its error."


@functools.cache
def _codec():
    # trytond.protocols imports trytond.backend, which picks the database
    # backend from the configuration: not before the console script read it
    from trytond.model import Model
    from trytond.protocols.jsonrpc import JSONDecoder, JSONEncoder

    class Encoder(JSONEncoder):

        def default(self, obj):
            if isinstance(obj, Model):
                if obj.id is None or obj.id < 0:
                    raise TypeError(
                        "%s is not saved: only stored records can travel"
                        % obj)
                return {'__class__': RECORD_CLASS,
                    'model': obj.__name__, 'id': obj.id}
            if isinstance(obj, RecordRef):
                return {'__class__': RECORD_CLASS,
                    'model': obj.model, 'id': obj.id}
            return super().default(obj)

    tryton_decoder = JSONDecoder()

    def object_hook(dct):
        if dct.get('__class__') == RECORD_CLASS:
            model, id_ = dct.get('model'), dct.get('id')
            if (not isinstance(model, str) or not _MODEL.match(model)
                    or type(id_) is not int or id_ < 0):
                raise ValueError("malformed record reference")
            return RecordRef(model, id_)
        return tryton_decoder(dct)
    return Encoder, object_hook


def _refuse_constant(name):
    raise ValueError("%s is not a number JSON allows" % name)


def dumps(value):
    "Return the JSON text of value, with Tryton's types and records."
    encoder, _ = _codec()
    return json.dumps(
        value, cls=encoder, separators=(',', ':'), allow_nan=False)


def canonical(value):
    """Return the JSON text of value, its keys sorted: equal values give
    equal texts."""
    encoder, _ = _codec()
    return json.dumps(value, cls=encoder, separators=(',', ':'),
        sort_keys=True, allow_nan=False)


def loads(text):
    "Return the value of the JSON text, records as RecordRef."
    _, object_hook = _codec()
    return json.loads(
        text, object_hook=object_hook, parse_constant=_refuse_constant)


#: Bytes kept for the message attributes, which count in SQS's limit.
ATTRIBUTES_SIZE = 512


#: Largest body a message may point to in S3, as SQS's Extended Client.
MAX_PAYLOAD_SIZE = 2 * 1024 ** 3


def check_size(body):
    """Raise ValueError if the body is over the size SQS accepts, or with
    [async_sqs] s3_bucket over what a message may point to."""
    size = len(body.encode('utf-8')) + ATTRIBUTES_SIZE
    if settings.s3_bucket():
        if size > MAX_PAYLOAD_SIZE:
            raise ValueError(
                "the message is %s bytes, over the limit of %s bytes of a "
                "payload in S3" % (size, MAX_PAYLOAD_SIZE))
    elif size > MAX_MESSAGE_SIZE:
        raise ValueError(
            "the message is %s bytes, over the SQS limit of %s bytes "
            "([async_sqs] s3_bucket sends it through S3)"
            % (size, MAX_MESSAGE_SIZE))


def encode_call(call):
    "Return the message body of the call."
    body = dumps({
            'v': FORMAT_VERSION,
            'task': call.task,
            'database': call.database,
            'user': call.user,
            'context': call.context,
            'model': call.model,
            'kind': call.kind,
            'method': call.method,
            'instance': call.instance,
            'args': call.args,
            'kwargs': call.kwargs,
            'reply': call.reply,
            'queue': call.queue,
            'eta': call.eta,
            # absent rather than null: workers of before it refuse a key
            # they do not know
            **({'reply_to': call.reply_to} if call.reply_to else {}),
            **({'tenant': call.tenant} if call.tenant else {}),
            })
    check_size(body)
    return body


def pack_bodies(bodies):
    "Return the body of a message that carries several calls."
    return '[' + ','.join(bodies) + ']'


def _load(body, message_id):
    if not isinstance(body, str):
        raise MessageError("body is not text", message_id)
    try:
        return loads(body)
    except Exception as exc:
        # Tryton's decoders raise what their types raise on bad input
        raise MessageError(
            "body is not valid JSON: %s" % exc, message_id) from exc


def _parse(body, keys, message_id):
    return _check_object(_load(body, message_id), keys, message_id)


def _check_object(data, keys, message_id, optional=frozenset()):
    if not isinstance(data, dict):
        raise MessageError("body is not a JSON object", message_id)
    task_id = data.get('task')
    if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
        raise MessageError("task id is missing or malformed", message_id)
    if data.get('v') != FORMAT_VERSION or type(data['v']) is not int:
        raise MessageError(
            "unknown format version %r" % (data.get('v'),),
            message_id, task_id)
    if not keys <= set(data) <= keys | optional:
        raise MessageError(
            "fields %s are missing or unknown" % ', '.join(
                sorted((set(data) ^ keys) - optional)), message_id, task_id)
    return data, task_id


def is_plain(value, depth=0):
    "Tell whether value holds no record and stays within a sane depth."
    from trytond.model import Model
    if depth > 32 or isinstance(value, (RecordRef, Model)):
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v, depth + 1)
            for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v, depth + 1) for v in value)
    return True


def decode_call(body, message_id=None):
    "Return the Call of a message body or raise MessageError."
    return _call_of(_load(body, message_id), message_id)


def decode_calls(body, message_id=None):
    """Return (calls, packed) of a message body or raise MessageError.

    packed tells whether the body is a list of calls rather than one."""
    data = _load(body, message_id)
    if not isinstance(data, list):
        return [_call_of(data, message_id)], False
    if not 1 <= len(data) <= MAX_CALLS_PER_MESSAGE:
        raise MessageError("a packed message holds 1 to %s calls, not %s"
            % (MAX_CALLS_PER_MESSAGE, len(data)), message_id)
    calls = [_call_of(item, message_id) for item in data]
    if len({c.task for c in calls}) != len(calls):
        raise MessageError("a packed message names a task twice", message_id)
    return calls, True


def _call_of(data, message_id):
    data, task_id = _check_object(
        data, _CALL_KEYS, message_id, _OPTIONAL_CALL_KEYS)

    def check(ok, reason):
        if not ok:
            raise MessageError(reason, message_id, task_id)
    database = data['database']
    check(isinstance(database, str) and _DATABASE.match(database),
        "database name is malformed")
    user = data['user']
    check(type(user) is int and 0 <= user < 2 ** 63, "user id is malformed")
    check(isinstance(data['context'], dict) and is_plain(data['context']),
        "context is not plain data")
    check(isinstance(data['model'], str) and _MODEL.match(data['model']),
        "model name is malformed")
    check(data['kind'] in KINDS, "kind is not one of %s" % ', '.join(KINDS))
    check(isinstance(data['method'], str) and _METHOD.match(data['method'])
        and not data['method'].startswith('__'), "method name is malformed")
    instance = data['instance']
    check(instance is None
        or (type(instance) is int and 0 <= instance < 2 ** 63),
        "instance id is malformed")
    check(isinstance(data['args'], list), "args is not a list")
    check(isinstance(data['kwargs'], dict), "kwargs is not an object")
    check(all(_METHOD.match(k) for k in data['kwargs']),
        "a keyword argument name is malformed")
    check(type(data['reply']) is bool, "reply is not a boolean")
    check(isinstance(data['queue'], str), "queue is not text")
    check(data['eta'] is None or isinstance(data['eta'], dt.datetime),
        "eta is not a datetime")
    reply_to = data.get('reply_to')
    check(reply_to is None
        or (isinstance(reply_to, str) and _QUEUE_NAME.match(reply_to)),
        "reply_to is not a queue name")
    tenant = data.get('tenant')
    check(tenant is None or is_group_id(tenant), "tenant is malformed")
    return Call(task=task_id, database=database, user=user,
        context=data['context'], model=data['model'], kind=data['kind'],
        method=data['method'], instance=instance, args=data['args'],
        kwargs=data['kwargs'], reply=data['reply'], queue=data['queue'],
        eta=data['eta'], reply_to=reply_to, tenant=tenant)


def is_group_id(value):
    "Tell whether value can be the MessageGroupId of a message."
    return isinstance(value, str) and bool(_GROUP_ID.match(value))


def message_group(body):
    """Return the tenant of the call a stored body carries, or None.

    For the calls sent again from their row, rarely: it decodes the
    body."""
    try:
        return decode_call(body).tenant
    except MessageError:
        return None


def encode_reply(task_id, result=None, error=None):
    """Return the message body of a result, or of an error.

    error is a dict with type, message, description and traceback."""
    body = {
        'v': FORMAT_VERSION,
        'task': task_id,
        'ok': error is None,
        'result': result if error is None else None,
        'error': error,
        }
    text = dumps(body)
    check_size(text)
    return text


def decode_reply(body, message_id=None):
    "Return the Reply of a message body or raise MessageError."
    data, task_id = _parse(body, _REPLY_KEYS, message_id)
    if type(data['ok']) is not bool:
        raise MessageError("ok is not a boolean", message_id, task_id)
    error = data['error']
    if not data['ok'] and not (isinstance(error, dict)
            and all(isinstance(error.get(k), str)
                for k in ('type', 'message'))):
        raise MessageError("error is malformed", message_id, task_id)
    return Reply(task=task_id, ok=data['ok'], result=data['result'],
        error=error)


def walk(value, function):
    "Return value with every RecordRef in it replaced by function(ref)."
    if isinstance(value, RecordRef):
        return function(value)
    if isinstance(value, list):
        return [walk(v, function) for v in value]
    if isinstance(value, dict):
        return {k: walk(v, function) for k, v in value.items()}
    return value


#: Error type of the reply that tells a waiter its task was cancelled.
CANCELLED = 'TaskCancelled'
#: Message attribute that names the signing key.
KEY_ID_ATTRIBUTE = 'async_sqs.key'
#: Message attribute that holds the HMAC-SHA256 of the body.
SIGNATURE_ATTRIBUTE = 'async_sqs.signature'
#: Message attribute of a body stored in S3: the SHA-256 of the object,
#: signed with the pointer that the body is.
DIGEST_ATTRIBUTE = 'async_sqs.sha256'
#: Message attribute of a body stored in S3, as SQS's Extended Client
#: writes it: the size of the object.
SIZE_ATTRIBUTE = 'ExtendedPayloadSize'


def key_id(key):
    "Return the public id of a key: the start of its SHA-256."
    return hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]


def _keys():
    "Return {key id: key} of the current and previous keys."
    keys = {}
    for key in [settings.secret()] + settings.previous_secrets():
        if key:
            keys.setdefault(key_id(key), key)
    return keys


def check_signing():
    "Raise SigningKeyMissing unless a secret is set or insecure is allowed."
    if not settings.secret() and not settings.insecure():
        raise SigningKeyMissing()


def _signed(body, digest):
    # SQS bodies cannot hold NUL: no body passes for a pointer and digest
    text = body if digest is None else body + '\x00' + digest
    return text.encode('utf-8')


def payload_attributes(message):
    "Return the attributes of a message that describe its body in S3."
    attributes = message.get('MessageAttributes') or {}
    return {name: {'DataType': attributes[name].get('DataType', 'String'),
            'StringValue': attributes[name].get('StringValue', '')}
        for name in (SIZE_ATTRIBUTE, DIGEST_ATTRIBUTE) if name in attributes}


def signature_attributes(body, attributes=None):
    """Return the attributes, with the message attributes that sign the
    body with the secret: the digest of a body in S3 is signed with it."""
    attributes = dict(attributes or {})
    key = settings.secret()
    if not key:
        check_signing()
        return attributes
    digest = attributes.get(DIGEST_ATTRIBUTE, {}).get('StringValue')
    signature = hmac.new(
        key.encode('utf-8'), _signed(body, digest), hashlib.sha256)
    attributes.update({
        KEY_ID_ATTRIBUTE: {'DataType': 'String', 'StringValue': key_id(key)},
        SIGNATURE_ATTRIBUTE: {
            'DataType': 'String', 'StringValue': signature.hexdigest()},
        })
    return attributes


def verify(message):
    """Raise MessageError unless the SQS message is signed with a known key.

    Without a secret, in insecure mode, every message passes."""
    message_id = message.get('MessageId')
    keys = _keys()
    if not keys:
        check_signing()
        return
    attributes = message.get('MessageAttributes') or {}
    kid = attributes.get(KEY_ID_ATTRIBUTE, {}).get('StringValue')
    signature = attributes.get(SIGNATURE_ATTRIBUTE, {}).get('StringValue')
    if not kid or not signature:
        raise MessageError("message is not signed", message_id)
    key = keys.get(kid)
    if key is None:
        raise MessageError("message is signed with unknown key %s" % kid[:16],
            message_id)
    body = message.get('Body')
    if not isinstance(body, str):
        raise MessageError("body is not text", message_id)
    digest = attributes.get(DIGEST_ATTRIBUTE, {}).get('StringValue')
    expected = hmac.new(
        key.encode('utf-8'), _signed(body, digest), hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest(), signature):
        raise MessageError("signature does not match the body", message_id)


def message_entry(id_, body, delay=0, attributes=None, group=None):
    """Return a SendMessageBatch entry, signed; attributes are the
    payload_attributes of a body in S3, group its MessageGroupId: SQS
    shares the workers fairly between groups."""
    entry = {'Id': id_, 'MessageBody': body,
        'MessageAttributes': signature_attributes(body, attributes)}
    if not entry['MessageAttributes']:
        del entry['MessageAttributes']
    if delay:
        entry['DelaySeconds'] = delay
    if group:
        entry['MessageGroupId'] = group
    return entry
