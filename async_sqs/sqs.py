# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The SQS transport: one boto3 client per process, queue names and URLs."
import hashlib
import json
import logging
import re
import time
import uuid

from botocore.config import Config
from botocore.exceptions import ClientError

from . import clients, settings
from .exceptions import SendFailed

logger = logging.getLogger(__name__)

#: SQS takes at most ten entries in one batch call and receive.
MAX_BATCH = 10
#: SQS queue names are at most 80 characters.
MAX_QUEUE_NAME = 80
#: Suffix of the dead-letter queue of a queue.
DEAD_LETTER_SUFFIX = '-dead'
#: Suffix SQS requires of the name of a FIFO queue.
FIFO_SUFFIX = '.fifo'
#: The MessageGroupId of the calls to a FIFO queue that have no tenant.
DEFAULT_GROUP = 'default'
#: Longest delay SQS applies to one message, in seconds.
MAX_DELAY = 900
#: Largest message body SQS accepts, in bytes; a whole batch call too.
MAX_MESSAGE_SIZE = 1024 * 1024
#: Most queue URLs one ListQueues call returns.
MAX_LIST_RESULTS = 1000

_NOT_IN_ALPHABET = re.compile(r'[^A-Za-z0-9_-]')
_TASK_ID = re.compile(r'^[0-9a-f]{32}$')
_MISSING_QUEUE_CODES = {
    'AWS.SimpleQueueService.NonExistentQueue', 'QueueDoesNotExist'}


def entry_size(entry):
    "Return the bytes a SendMessageBatch entry counts in SQS's limit."
    size = len(entry['MessageBody'].encode('utf-8'))
    for name, value in entry.get('MessageAttributes', {}).items():
        size += len(name) + len(value['DataType']) + len(
            value.get('StringValue', ''))
    return size


def batches(entries):
    "Yield the entries in batches SendMessageBatch takes: ten, 1 MiB."
    batch, size = [], 0
    for entry in entries:
        entry_bytes = entry_size(entry)
        if batch and (len(batch) >= MAX_BATCH
                or size + entry_bytes > MAX_MESSAGE_SIZE):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_bytes
    if batch:
        yield batch


def queue_name(*parts, limit=MAX_QUEUE_NAME - len(DEAD_LETTER_SUFFIX)):
    """Return the SQS name made of the non-empty parts.

    Characters SQS refuses become '_'; a name over the limit keeps its head
    and ends with a hash of the whole, so two long names stay distinct. The
    limit leaves room for the dead-letter suffix. A last part that ends in
    .fifo names a FIFO queue: the suffix stays last."""
    parts = [p for p in parts if p]
    fifo = bool(parts) and parts[-1].endswith(FIFO_SUFFIX)
    if fifo:
        parts[-1] = parts[-1][:-len(FIFO_SUFFIX)]
        limit -= len(FIFO_SUFFIX)
    name = '-'.join(parts)
    name = _NOT_IN_ALPHABET.sub('_', name)
    if len(name) > limit:
        digest = hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]
        name = name[:limit - len(digest) - 1] + '-' + digest
    return name + FIFO_SUFFIX if fifo else name


def is_fifo(name_or_url):
    "Tell whether the queue of the name or URL is a FIFO queue."
    return name_or_url.endswith(FIFO_SUFFIX)


def dead_letter_name(name):
    "Return the name of the dead-letter queue of a task queue."
    if is_fifo(name):
        return name[:-len(FIFO_SUFFIX)] + DEAD_LETTER_SUFFIX + FIFO_SUFFIX
    return name + DEAD_LETTER_SUFFIX


def fifo_entry(entry):
    """Return a SendMessageBatch entry as a FIFO queue takes it: with a
    group, a deduplication id (a new one unless the entry has its own) and
    no delay, which FIFO queues refuse per message."""
    entry = dict(entry)
    entry.pop('DelaySeconds', None)
    entry.setdefault('MessageGroupId', DEFAULT_GROUP)
    entry.setdefault('MessageDeduplicationId', uuid.uuid4().hex)
    return entry


def task_queue_name(database, queue=None):
    "Return the name of the task queue of the database."
    return queue_name(
        settings.queue_prefix(), database, queue or settings.queue())


def reply_queue_name(task_id):
    "Return the name of the reply queue of the task."
    return queue_name(settings.queue_prefix(), 'reply', task_id)


def reply_queue_prefix():
    "Return the start of the name of every reply queue."
    return queue_name(settings.queue_prefix(), 'reply') + '-'


#: Word that tells a process reply queue from the reply queue of a call.
PROCESS_REPLY = 'process'
#: Tag of a process reply queue: when its process last said it is alive.
ALIVE_TAG = 'async_sqs.alive'
_TOKEN = re.compile(r'-[0-9a-f]{8}$')


def process_reply_queue_name(host, pid, token):
    """Return the name of the reply queue of a waiting process: its host,
    its pid and a random token of 8 hex digits."""
    # the token last, as queue_name hashes a long name's tail away
    name = queue_name(settings.queue_prefix(), 'reply', PROCESS_REPLY, host,
        str(pid), limit=MAX_QUEUE_NAME - 9)
    return name + '-' + token


def is_process_reply_queue(name):
    "Tell whether the queue name is the name of a process reply queue."
    prefix = reply_queue_prefix() + PROCESS_REPLY + '-'
    return name.startswith(prefix) and _TOKEN.search(name) is not None


def alive_interval():
    "Seconds between two tags of a process reply queue as alive."
    return max(60, settings.reply_ttl() // 4)


def is_reply_queue(name):
    "Tell whether the queue name is the name of a reply queue."
    prefix = reply_queue_prefix()
    # a database named 'reply' has task queues that start the same way
    return (name.startswith(prefix)
        and _TASK_ID.match(name[len(prefix):]) is not None)


def sweep_reply_queues(older_than=None):
    """Delete the reply queues of the prefix created more than older_than
    seconds ago (default reply_ttl), read or not; return how many.

    A waiter deletes the reply queue it read; the queues of the calls whose
    result nobody waited for, or stopped waiting for, stay until swept. A
    queue deleted meanwhile by its waiter is not an error. The reply queue
    of a process goes only when its process has not tagged it alive for
    that long: it died without deleting it."""
    if older_than is None:
        older_than = settings.reply_ttl()
    if older_than < 0:
        raise ValueError(
            "older_than must be 0 seconds or more, not %s" % older_than)
    transport = client()
    before = time.time() - older_than
    deleted = 0
    for url in transport.list_queues(reply_queue_prefix()):
        name = url.rsplit('/', 1)[-1]
        process = is_process_reply_queue(name)
        if not process and not is_reply_queue(name):
            continue
        created = transport.created_at(url)
        if created is None or created > before:
            continue
        if process and transport.alive_at(url, created) > before:
            continue
        if transport.delete_queue(name, url=url):
            deleted += 1
    if deleted:
        logger.info("swept %s reply queue(s) older than %s s",
            deleted, older_than)
    return deleted


def reply_queue_attributes():
    "Return the attributes every reply queue is created with."
    # worker and waiter may each create it: SQS wants the same attributes
    return {'MessageRetentionPeriod': str(settings.reply_ttl())}


def is_missing_queue(exc):
    "Tell whether a ClientError says the queue does not exist."
    return (isinstance(exc, ClientError)
        and exc.response.get('Error', {}).get('Code') in _MISSING_QUEUE_CODES)


def client():
    "Return the boto3 SQS client of this process."
    return _transports.get(settings.endpoint_url(), settings.region(),
        settings.access_key(), settings.secret_key(), settings.max_attempts())


class Transport:
    "A boto3 SQS client and the queue URLs it has resolved."

    def __init__(self, endpoint_url, region, access_key, secret_key,
            max_attempts):
        # botocore's session, as boto3's wraps it: boto3's own import adds
        # s3transfer and its resources, megabytes per worker process
        self.sqs = clients.session().create_client('sqs',
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                retries={'mode': 'standard', 'max_attempts': max_attempts},
                max_pool_connections=32,
                tcp_keepalive=True))
        self._urls = {}

    def __repr__(self):
        return '<Transport %s>' % self.sqs.meta.endpoint_url

    def close(self):
        "Close the connections of the client: it opens new ones when used."
        self.sqs.close()

    def url(self, name, create=True, attributes=None):
        "Return the URL of the queue, created on first use."
        url = self._urls.get(name)
        if url is not None:
            return url
        kwargs = {'QueueName': name}
        owner = settings.queue_owner()
        if owner:
            kwargs['QueueOwnerAWSAccountId'] = owner
        try:
            url = self.sqs.get_queue_url(**kwargs)['QueueUrl']
        except ClientError as exc:
            if not create or not is_missing_queue(exc):
                raise
            url = self.create(name, attributes)
        self._urls[name] = url
        return url

    def open(self, name, attributes):
        "Return the URL of the queue, created with attributes if missing."
        # CreateQueue answers with the URL of an existing queue of the same
        # attributes: one call, where GetQueueUrl then CreateQueue is two
        url = self._urls.get(name)
        if url is None:
            url = self._urls[name] = self.create(name, attributes)
        return url

    def forget(self, name):
        "Drop the cached URL of a queue that was deleted."
        self._urls.pop(name, None)

    def create(self, name, attributes=None):
        """Create the task queue and its dead-letter queue; return its URL.

        A name that ends in .fifo makes both FIFO queues."""
        fifo = {'FifoQueue': 'true'} if is_fifo(name) else {}
        if attributes is None:
            dead_name = dead_letter_name(name)
            dead_url = self.sqs.create_queue(
                QueueName=dead_name,
                Attributes={
                    'MessageRetentionPeriod': str(14 * 24 * 3600), **fifo},
                )['QueueUrl']
            dead_arn = self.sqs.get_queue_attributes(
                QueueUrl=dead_url, AttributeNames=['QueueArn'],
                )['Attributes']['QueueArn']
            self._urls[dead_name] = dead_url
            attributes = {
                **fifo,
                'VisibilityTimeout': str(settings.visibility_timeout()),
                'MessageRetentionPeriod': str(14 * 24 * 3600),
                'RedrivePolicy': json.dumps({
                        'deadLetterTargetArn': dead_arn,
                        'maxReceiveCount': str(settings.max_receive_count()),
                        }),
                }
        logger.info("create queue %s", name)
        try:
            return self.sqs.create_queue(
                QueueName=name, Attributes=attributes)['QueueUrl']
        except ClientError as exc:
            # another process created it first, with other attributes
            if exc.response.get('Error', {}).get('Code') not in {
                    'QueueAlreadyExists', 'QueueNameExists'}:
                raise
            return self.sqs.get_queue_url(QueueName=name)['QueueUrl']

    def dead_letter_url(self, name):
        "Return the URL of the dead-letter queue of a task queue."
        self.url(name)
        return self.url(dead_letter_name(name))

    def send_batch(self, url, entries):
        """Send the entries (dicts of SendMessageBatch) in as few calls as
        SQS's limits allow.

        Entries that fail inside a successful call are sent again once, then
        raise."""
        if is_fifo(url):
            entries = [fifo_entry(e) for e in entries]
        for batch in batches(entries):
            for attempt in range(3):
                response = self.sqs.send_message_batch(
                    QueueUrl=url, Entries=batch)
                failed = response.get('Failed')
                if not failed:
                    break
                retry = {f['Id'] for f in failed if not f.get('SenderFault')}
                fatal = [f for f in failed if f.get('SenderFault')]
                if fatal:
                    raise SendFailed(fatal)
                batch = [e for e in batch if e['Id'] in retry]
            else:
                raise SendFailed(failed)

    def send(self, url, body, delay=0, attributes=None):
        "Send one message."
        kwargs = {'QueueUrl': url, 'MessageBody': body}
        if is_fifo(url):
            kwargs['MessageGroupId'] = DEFAULT_GROUP
            kwargs['MessageDeduplicationId'] = uuid.uuid4().hex
        elif delay:
            kwargs['DelaySeconds'] = delay
        if attributes:
            kwargs['MessageAttributes'] = attributes
        return self.sqs.send_message(**kwargs)

    def receive(self, url, max_number=MAX_BATCH, wait_time=None,
            visibility_timeout=None):
        "Long-poll the queue and return the messages received."
        kwargs = {
            'QueueUrl': url,
            'MaxNumberOfMessages': max_number,
            'WaitTimeSeconds': (
                settings.wait_time() if wait_time is None else wait_time),
            'AttributeNames': ['ApproximateReceiveCount', 'MessageGroupId'],
            'MessageAttributeNames': ['All'],
            }
        if visibility_timeout is not None:
            kwargs['VisibilityTimeout'] = visibility_timeout
        return self.sqs.receive_message(**kwargs).get('Messages', [])

    def delete_batch(self, url, receipts):
        "Delete the messages of the receipt handles, ten per call."
        receipts = list(receipts)
        for start in range(0, len(receipts), MAX_BATCH):
            batch = receipts[start:start + MAX_BATCH]
            response = self.sqs.delete_message_batch(QueueUrl=url, Entries=[
                    {'Id': str(i), 'ReceiptHandle': r}
                    for i, r in enumerate(batch)])
            for failure in response.get('Failed', []):
                logger.warning("delete failed on %s: %s", url,
                    failure.get('Message') or failure.get('Code'))

    def change_visibility_batch(self, url, receipts, timeout):
        "Set the visibility timeout of the messages, ten per call."
        receipts = list(receipts)
        for start in range(0, len(receipts), MAX_BATCH):
            batch = receipts[start:start + MAX_BATCH]
            response = self.sqs.change_message_visibility_batch(
                QueueUrl=url, Entries=[
                    {'Id': str(i), 'ReceiptHandle': r,
                        'VisibilityTimeout': timeout}
                    for i, r in enumerate(batch)])
            for failure in response.get('Failed', []):
                logger.warning("visibility change failed on %s: %s", url,
                    failure.get('Message') or failure.get('Code'))

    def delete_queue(self, name, url=None):
        "Delete the queue if it exists; tell whether it did."
        cached = self._urls.pop(name, None)
        url = url or cached
        try:
            if url is None:
                url = self.sqs.get_queue_url(QueueName=name)['QueueUrl']
            self.sqs.delete_queue(QueueUrl=url)
        except ClientError as exc:
            if not is_missing_queue(exc):
                raise
            return False
        return True

    def list_queues(self, prefix, page_size=MAX_LIST_RESULTS):
        "Yield the URL of every queue whose name starts with prefix."
        # without MaxResults SQS returns the first 1,000 and no NextToken
        kwargs = {'QueueNamePrefix': prefix, 'MaxResults': page_size}
        while True:
            response = self.sqs.list_queues(**kwargs)
            yield from response.get('QueueUrls', [])
            token = response.get('NextToken')
            if not token:
                return
            kwargs['NextToken'] = token

    def created_at(self, url):
        "Return when the queue was created (epoch seconds), None if gone."
        try:
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=['CreatedTimestamp'],
                )['Attributes']
        except ClientError as exc:
            if not is_missing_queue(exc):
                raise
            return None
        return float(attributes['CreatedTimestamp'])

    def alive_at(self, url, default):
        "Return when the process of a reply queue tagged it alive."
        try:
            tags = self.sqs.list_queue_tags(QueueUrl=url).get('Tags') or {}
        except ClientError as exc:
            if not is_missing_queue(exc):
                raise
            return default
        try:
            return float(tags.get(ALIVE_TAG, default))
        except ValueError:
            return default

    def drain(self, name, wait_time=1):
        """Delete every message of the queue, if it exists; return how many.

        Used where the queue must be emptied and kept: after DeleteQueue,
        SQS refuses to create a queue of that name for 60 s, and PurgeQueue
        may still delete, for up to 60 s, messages sent after it."""
        try:
            url = self.url(name, create=False)
        except ClientError as exc:
            if not is_missing_queue(exc):
                raise
            return 0
        deleted = 0
        while True:
            try:
                # long polling asks every server: a short poll can miss one
                messages = self.receive(url, wait_time=wait_time)
            except ClientError as exc:
                if not is_missing_queue(exc):
                    raise
                self.forget(name)
                return deleted
            if not messages:
                return deleted
            self.delete_batch(url, [m['ReceiptHandle'] for m in messages])
            deleted += len(messages)


_transports = clients.ProcessCache(Transport)
