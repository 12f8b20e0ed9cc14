# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Every option of the [async_sqs] section of trytond.conf and its default."
from trytond import config

SECTION = 'async_sqs'


def _get(option, default=None):
    value = config.get(SECTION, option, default=default)
    if value == '':
        return default
    return value


def endpoint_url():
    "URL of the SQS endpoint (boto3's default endpoint of the region if unset)."
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
    value = config.getint(SECTION, 'visibility_timeout', default=60)
    if not 0 <= value <= 43200:
        raise ValueError(
            "[async_sqs] visibility_timeout must be within 0 to 43200, "
            "not %s" % value)
    return value


def wait_time():
    "Seconds one receive call long-polls (SQS allows 0 to 20)."
    value = config.getint(SECTION, 'wait_time', default=20)
    if not 0 <= value <= 20:
        raise ValueError(
            "[async_sqs] wait_time must be within 0 to 20, not %s" % value)
    return value


def max_receive_count():
    "Receives of one message before SQS moves it to the dead-letter queue."
    value = config.getint(SECTION, 'max_receive_count', default=10)
    if not 1 <= value <= 1000:
        raise ValueError(
            "[async_sqs] max_receive_count must be within 1 to 1000, "
            "not %s" % value)
    return value


def reply_ttl():
    "Seconds an unread result is kept in its reply queue (60 to 1209600)."
    value = config.getint(SECTION, 'reply_ttl', default=24 * 60 * 60)
    if not 60 <= value <= 1209600:
        raise ValueError(
            "[async_sqs] reply_ttl must be within 60 to 1209600, "
            "not %s" % value)
    return value


def max_attempts():
    "Attempts of one SQS call before boto3 gives up (its retry config)."
    return config.getint(SECTION, 'max_attempts', default=5)


def relay_grace():
    "Seconds a committed call may stay unsent before the relay sends it."
    value = config.getint(SECTION, 'relay_grace', default=60)
    if not 1 <= value <= 86400:
        raise ValueError(
            "[async_sqs] relay_grace must be within 1 to 86400, not %s"
            % value)
    return value


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
