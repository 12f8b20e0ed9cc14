# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Every option of the [async_sqs] section of trytond.conf and its default."
from trytond import config

from .weights import parse_weights

SECTION = 'async_sqs'


def _get(option, default=None):
    value = config.get(SECTION, option, default=default)
    if value == '':
        return default
    return value


def _getint(option, default, low, high):
    # an option left empty is unset, as _get has it
    value = _get(option)
    try:
        value = default if value is None else int(value)
    except ValueError:
        raise ValueError(
            "[async_sqs] %s must be a whole number, not %r" % (option, value))
    if not low <= value <= high:
        raise ValueError(
            "[async_sqs] %s must be within %s to %s, not %s"
            % (option, low, high, value))
    return value


def endpoint_url():
    "URL of the SQS endpoint (boto3's endpoint of the region if unset)."
    return _get('endpoint_url')


def region():
    "AWS region of the queues (boto3's own configuration if unset)."
    return _get('region')


def access_key():
    "AWS access key id (boto3's own credential chain if unset)."
    return _get('access_key')


def secret_key():
    "AWS secret access key (boto3's own credential chain if unset)."
    return _get('secret_key')


def queue():
    "Name of the queue that tasks without a queue of their own go to."
    return _get('queue', default='trytond-async')


def queue_prefix():
    "Prefix of every queue name, to share one AWS account between sites."
    return _get('queue_prefix', default='')


def queue_owner():
    "AWS account id that owns the queues, when it is not the caller's."
    return _get('queue_owner')


def visibility_timeout():
    "Seconds a received task stays hidden from other workers (0 to 43200)."
    return _getint('visibility_timeout', 60, 0, 43200)


def wait_time():
    "Seconds one receive call long-polls (SQS allows 0 to 20)."
    return _getint('wait_time', 20, 0, 20)


def max_receive_count():
    "Receives of one message before SQS moves it to the dead-letter queue."
    return _getint('max_receive_count', 10, 1, 1000)


def reply_ttl():
    "Seconds an unread result is kept in its reply queue (60 to 1209600)."
    return _getint('reply_ttl', 24 * 60 * 60, 60, 1209600)


def reply_queue():
    """Where the replies of the calls a process defers come back: task, a
    queue per call, or process, one queue per waiting process."""
    value = _get('reply_queue', default='task')
    if value not in ('task', 'process'):
        raise ValueError(
            "[async_sqs] reply_queue must be task or process, not %r"
            % value)
    return value


def clean_days():
    """Days a finished task row is kept before the cron deletes it
    (0 keeps them forever, up to 36500)."""
    return _getint('clean_days', 30, 0, 36500)


def max_attempts():
    "Attempts of one SQS call before boto3 gives up (its retry config)."
    return _getint('max_attempts', 5, 1, 20)


def relay_grace():
    "Seconds a committed call may stay unsent before the relay sends it."
    return _getint('relay_grace', 60, 1, 86400)


def prefetch():
    """Messages a worker process holds at most per queue, received and not
    finished (1 to 100)."""
    return _getint('prefetch', 10, 1, 100)


def queue_weights():
    """Weight of each queue named, read from NAME:WEIGHT entries separated
    by commas or lines (1 to 100): a worker process takes the messages of
    its queues in proportion; a queue not named weighs 1."""
    return parse_weights(_get('queue_weights'))


def calls_per_message():
    """How many calls of one transaction to one queue a message may carry
    (1 to 100), for the methods that do not say."""
    return _getint('calls_per_message', 1, 1, 100)


def secret():
    "The key that signs every message and reply (HMAC-SHA256)."
    return _get('secret')


def previous_secrets():
    "Keys of before a rotation, one per line: still accepted, never used."
    return [s.strip() for s in (_get('previous_secrets') or '').splitlines()
        if s.strip()]


def insecure():
    "True to run without a secret: messages unsigned and unchecked."
    return config.getboolean(SECTION, 'insecure', default=False)


def stale_after():
    """Seconds a row may stay queued or running, unchanged, before the
    relay sends its call again (at least twice the visibility timeout)."""
    return _getint('stale_after', 6 * 60 * 60,
        2 * visibility_timeout(), 14 * 24 * 60 * 60)


def eager():
    """True to run every deferred call in the caller's process once its
    transaction commits, without SQS (for tests and small sites)."""
    return config.getboolean(SECTION, 'eager', default=False)


def time_limit():
    """Seconds a call may run before its worker process is ended (0 for
    none, up to 43200), for the methods that do not say."""
    return _getint('time_limit', 0, 0, 43200)


def cancel_grace():
    """Seconds a call cancelled while it runs has to stop before its
    worker process is ended (1 to 43200)."""
    return _getint('cancel_grace', 30, 1, 43200)


#: What the tenant option names: the MessageGroupId of the calls is the
#: company of the caller's context, the calling user, or the database.
TENANTS = ('company', 'user', 'database')


def tenant():
    """What the calls of the methods that do not say are grouped by, for
    SQS's fair queues: one of TENANTS, or None."""
    value = _get('tenant')
    if value is not None and value not in TENANTS:
        raise ValueError("[async_sqs] tenant must be one of %s, not %r"
            % (', '.join(TENANTS), value))
    return value


def s3_bucket():
    """S3 bucket that holds the messages and replies over
    large_message_threshold (none if unset: such a call is refused)."""
    return _get('s3_bucket')


def s3_prefix():
    "Start of the key of every object the module writes in s3_bucket."
    return _get('s3_prefix', default='async_sqs/')


def s3_endpoint_url():
    "URL of the S3 endpoint (endpoint_url, then boto3's, if unset)."
    return _get('s3_endpoint_url') or endpoint_url()


def large_message_threshold():
    """Bytes of a message body past which, with s3_bucket, it goes to S3
    and SQS carries a pointer (1024 to 1048064)."""
    # the most SQS takes, less what the attributes of a message count
    return _getint('large_message_threshold', 256 * 1024, 1024,
        1024 * 1024 - 512)
