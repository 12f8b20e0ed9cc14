# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""Bodies past large_message_threshold, kept in S3.

With [async_sqs] s3_bucket, a call or a reply whose body is larger goes to
S3, and its SQS message carries a pointer in the layout of SQS's Extended
Client: the body is ["software.amazon.payloadoffloading.PayloadS3Pointer",
{"s3BucketName": ..., "s3Key": ...}] and the ExtendedPayloadSize attribute
holds the size of the object. The async_sqs.sha256 attribute holds its
SHA-256, signed with the pointer: an object changed after the send is
refused. The keys are

    <s3_prefix>call/<database>/<task id>/<token>
    <s3_prefix>reply/<task id>/<token>

with a token per send, so that the object of one message is never the
object of another message of the same call, and can go with it."""
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections import namedtuple

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from . import clients, settings
from .exceptions import MessageError, PayloadRefused, PayloadUnavailable
from .message import (
    DIGEST_ATTRIBUTE, MAX_PACKED_SIZE, SIZE_ATTRIBUTE, decode_reply,
    message_entry, signature_attributes, verify)

logger = logging.getLogger(__name__)

#: The first item of a pointer, as SQS's Extended Client writes it.
POINTER_CLASS = 'software.amazon.payloadoffloading.PayloadS3Pointer'
#: The size attribute of the first versions of the Extended Client.
LEGACY_SIZE_ATTRIBUTE = 'SQSLargePayloadSize'
#: Most keys one DeleteObjects call takes.
MAX_DELETE = 1000
#: Error codes of S3 for an object that is not there.
_MISSING_CODES = {'NoSuchKey', '404', 'NotFound'}
_DIGEST = re.compile(r'^[0-9a-f]{64}$')
_CALL_KEY = re.compile(
    r'call/(?P<database>[^/]+)/(?P<task>[0-9a-f]{32})/[0-9a-f]{32}$')
_TASK_KEY = re.compile(r'/(?P<task>[0-9a-f]{32})/[0-9a-f]{32}$')


Pointer = namedtuple('Pointer', ['bucket', 'key', 'digest'])
Pointer.__doc__ = "Where the body of a message is in S3, and its SHA-256."


def client():
    "Return the botocore S3 client of this process, made on first use."
    return _clients.get(settings.s3_endpoint_url(), settings.region(),
        settings.access_key(), settings.secret_key(), settings.max_attempts())


def _create_client(endpoint_url, region, access_key, secret_key,
        max_attempts):
    # botocore's session, as sqs.Transport: boto3 would add s3transfer
    return clients.session().create_client('s3',
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            retries={'mode': 'standard', 'max_attempts': max_attempts},
            # a server of one's own (moto, MinIO) has no bucket host names
            s3={'addressing_style': 'path'} if endpoint_url else None,
            tcp_keepalive=True))


_clients = clients.ProcessCache(_create_client)


def _code(exc):
    return exc.response.get('Error', {}).get('Code')


def is_large(body):
    "Tell whether the body goes to S3: past the threshold, with a bucket."
    if not settings.s3_bucket():
        return False
    threshold = settings.large_message_threshold()
    # a character is 1 to 4 bytes of UTF-8: encode only when in doubt
    if len(body) > threshold:
        return True
    if len(body) * 4 <= threshold:
        return False
    return len(body.encode('utf-8')) > threshold


def packed_limit():
    "Return the most bytes of the calls one message packs: all in SQS."
    if settings.s3_bucket():
        return min(MAX_PACKED_SIZE, settings.large_message_threshold())
    return MAX_PACKED_SIZE


def call_prefix(database_name):
    "Return the start of the keys of the calls of a database."
    return '%scall/%s/' % (settings.s3_prefix(), database_name)


def store(key, body):
    """Put the body in S3 under key; return the pointer that replaces it
    and the attributes of its message, unsigned.

    Raise PayloadUnavailable when S3 does not take it."""
    bucket = settings.s3_bucket()
    data = body.encode('utf-8')
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data,
            ContentType='application/json')
    except (BotoCoreError, ClientError) as exc:
        raise PayloadUnavailable("s3://%s/%s could not be written: %s"
            % (bucket, key, exc)) from exc
    logger.debug("%s bytes written to s3://%s/%s", len(data), bucket, key)
    pointer = json.dumps(
        [POINTER_CLASS, {'s3BucketName': bucket, 's3Key': key}],
        separators=(',', ':'))
    return pointer, {
        SIZE_ATTRIBUTE: {'DataType': 'Number', 'StringValue': str(len(data))},
        DIGEST_ATTRIBUTE: {'DataType': 'String',
            'StringValue': hashlib.sha256(data).hexdigest()},
        }


def call_entry(id_, body, delay, database_name, task_id, group=None):
    """Return the SendMessageBatch entry of the call of a task, signed,
    with its group; a large body is written to S3 first."""
    if not is_large(body):
        return message_entry(id_, body, delay, group=group)
    key = call_prefix(database_name) + '%s/%s' % (task_id, uuid.uuid4().hex)
    pointer, attributes = store(key, body)
    return message_entry(id_, pointer, delay, attributes, group)


def reply_message(body, task_id):
    """Return the body and the signed attributes of the reply message of a
    task; a large reply is written to S3 first."""
    attributes = None
    if is_large(body):
        key = '%sreply/%s/%s' % (
            settings.s3_prefix(), task_id, uuid.uuid4().hex)
        body, attributes = store(key, body)
    return body, signature_attributes(body, attributes)


def pointer_of(message):
    """Return the Pointer of a message whose body is in S3, None for one
    that carries its body; raise MessageError for a malformed pointer."""
    attributes = message.get('MessageAttributes') or {}
    body = message.get('Body')
    if not (attributes.keys() & {
                SIZE_ATTRIBUTE, LEGACY_SIZE_ATTRIBUTE, DIGEST_ATTRIBUTE}
            or (isinstance(body, str)
                and body.startswith('["%s"' % POINTER_CLASS))):
        return None
    message_id = message.get('MessageId')
    try:
        kind, location = json.loads(body)
        bucket, key = location['s3BucketName'], location['s3Key']
    except (TypeError, ValueError, KeyError) as exc:
        raise MessageError(
            "the pointer to S3 is malformed", message_id) from exc
    if (kind != POINTER_CLASS or not isinstance(bucket, str)
            or not isinstance(key, str)):
        raise MessageError("the pointer to S3 is malformed", message_id)
    digest = attributes.get(DIGEST_ATTRIBUTE, {}).get('StringValue')
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise MessageError(
            "the pointer to S3 has no SHA-256 of its object", message_id)
    return Pointer(bucket, key, digest)


def task_of(key):
    "Return the task id the key of an object names, None if it names none."
    match = _TASK_KEY.search(key)
    return match.group('task') if match else None


def call_of(key):
    "Return (database, task id) the key of a call's object names, or None."
    match = _CALL_KEY.search(key)
    return (match.group('database'), match.group('task')) if match else None


def fetch(pointer, message_id=None):
    """Return the body the pointer names, checked against its SHA-256.

    Raise PayloadRefused when the object is missing, not in s3_bucket or
    not the one signed; PayloadUnavailable when S3 fails."""
    task_id = task_of(pointer.key)
    location = 's3://%s/%s' % (pointer.bucket, pointer.key)
    if pointer.bucket != settings.s3_bucket():
        raise PayloadRefused("the body is in %s, outside [async_sqs] "
            "s3_bucket" % location, message_id, task_id)
    try:
        response = client().get_object(
            Bucket=pointer.bucket, Key=pointer.key)
        data = response['Body'].read()
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            raise PayloadRefused("the body in %s is missing" % location,
                message_id, task_id) from exc
        raise PayloadUnavailable(
            "%s could not be read: %s" % (location, exc)) from exc
    except BotoCoreError as exc:
        raise PayloadUnavailable(
            "%s could not be read: %s" % (location, exc)) from exc
    if not hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), pointer.digest):
        raise PayloadRefused("the body in %s is not the one signed"
            % location, message_id, task_id)
    return data.decode('utf-8')


def read_body(message):
    """Return the body of a message checked by verify(), and its Pointer:
    the body it carries and None, or the body in S3 it points to.

    Raise MessageError, PayloadRefused or PayloadUnavailable."""
    pointer = pointer_of(message)
    if pointer is None:
        return message.get('Body'), None
    return fetch(pointer, message.get('MessageId')), pointer


def read_reply(message):
    """Return the Reply of a reply message, signed and sound; the object of
    a reply in S3 is deleted once read.

    Raise MessageError, or PayloadUnavailable when S3 fails."""
    # a reply anyone could have written must not pass for a result
    verify(message)
    body, pointer = read_body(message)
    reply = decode_reply(body, message.get('MessageId'))
    if pointer is not None:
        delete(pointer)
    return reply


def delete(pointer):
    """Delete the object of a message that is needed no more; tell whether
    it went. A failure is logged: the sweep deletes it later."""
    if pointer.bucket != settings.s3_bucket():
        return False
    try:
        client().delete_object(Bucket=pointer.bucket, Key=pointer.key)
    except (BotoCoreError, ClientError):
        logger.warning("s3://%s/%s could not be deleted, the sweep will",
            pointer.bucket, pointer.key, exc_info=True)
        return False
    return True


def discard(message):
    "Delete the object a message points to, if it points to one."
    try:
        pointer = pointer_of(message)
    except MessageError:
        return
    if pointer is not None:
        delete(pointer)


def _list(bucket, prefix, before):
    "Yield the keys under the prefix of the objects written before then."
    kwargs = {'Bucket': bucket, 'Prefix': prefix}
    while True:
        response = client().list_objects_v2(**kwargs)
        for item in response.get('Contents', []):
            if item['LastModified'].timestamp() <= before:
                yield item['Key']
        token = response.get('NextContinuationToken')
        if not response.get('IsTruncated') or not token:
            return
        kwargs['ContinuationToken'] = token


def _delete_keys(bucket, keys):
    "Delete the objects of the keys; return how many went."
    deleted = 0
    for start in range(0, len(keys), MAX_DELETE):
        batch = keys[start:start + MAX_DELETE]
        response = client().delete_objects(Bucket=bucket, Delete={
                'Objects': [{'Key': k} for k in batch], 'Quiet': True})
        errors = response.get('Errors', [])
        for error in errors:
            logger.warning("s3://%s/%s could not be deleted: %s", bucket,
                error.get('Key'), error.get('Message') or error.get('Code'))
        deleted += len(batch) - len(errors)
    return deleted


def sweep(database_name=None, older_than=None):
    """Delete the objects of s3_prefix older than older_than seconds
    (default reply_ttl) that no message needs any more; return how many.

    Those of the replies, which their reply queue keeps no longer, and
    with database_name, those of the calls of that database whose task
    row is finished or gone: a message that still points to one skips
    its call, as any redelivery."""
    from .rows import read_rows
    from .task import FINISHED
    bucket = settings.s3_bucket()
    if not bucket:
        return 0
    if older_than is None:
        older_than = settings.reply_ttl()
    before = time.time() - older_than
    keys = list(_list(bucket, settings.s3_prefix() + 'reply/', before))
    if database_name is not None:
        calls = {}
        for key in _list(bucket, call_prefix(database_name), before):
            named = call_of(key)
            if named and named[0] == database_name:
                calls.setdefault(named[1], []).append(key)
        rows = read_rows(database_name, list(calls), columns=('uuid', 'state'))
        for task_id, task_keys in calls.items():
            row = rows.get(task_id)
            if row is None or row['state'] in FINISHED:
                keys.extend(task_keys)
    deleted = _delete_keys(bucket, keys)
    if deleted:
        logger.info("swept %s object(s) of s3://%s/%s older than %s s",
            deleted, bucket, settings.s3_prefix(), older_than)
    return deleted


def holds(pointer, body):
    "Tell whether the pointer's SHA-256 is the one of the body."
    return hmac.compare_digest(
        hashlib.sha256(body.encode('utf-8')).hexdigest(), pointer.digest)
