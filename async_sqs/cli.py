# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The console scripts."
# Nothing here may import trytond.pool, trytond.model or the module before
# the configuration is read: trytond picks its backend at first import.
import argparse
import os
import sys


def worker_parser():
    from trytond import commandline
    parser = commandline.get_parser_daemon()
    parser.prog = 'trytond-async-worker'
    parser.description = (
        "Receive the calls deferred with async_task from SQS and run them.")
    for action in parser._actions:
        if action.dest == 'database_names':
            # -d DB1 -d DB2 adds up, as -d DB1 DB2 does
            action.__class__ = argparse._ExtendAction
    parser.add_argument('--queue', dest='queues', action='append',
        metavar='NAME[:WEIGHT]', default=[], type=_queue,
        help="listen on this queue only (repeat for more), with this weight "
        "(1 to 100) among the queues; default: the configured queue and "
        "every queue a decorated method names")
    return parser


def _queue(value):
    from .weights import parse_queue
    try:
        parse_queue(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    # the worker processes read it again, with the configured weights
    return value


def worker_main(argv=None):
    from trytond import commandline, config

    parser = worker_parser()
    options = parser.parse_args(argv)
    if not options.database_names:
        parser.error("at least one database is needed (-d)")
    config.update_etc(options.configfile)
    commandline.config_log(options)

    from . import settings
    try:
        settings.queue_weights()
    except ValueError as exc:
        parser.error(str(exc))

    from trytond.pool import Pool

    from . import supervisor
    from .exceptions import SigningKeyMissing
    with commandline.pidfile(options):
        Pool.start()
        try:
            supervisor.work(options)
        except SigningKeyMissing as exc:
            print("trytond-async-worker: %s" % exc, file=sys.stderr)
            return 2
    return 0


def _positive(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("%s is not a positive number" % value)
    return number


def _seconds(value):
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(
            "%s is not a number of seconds" % value)
    return number


def admin_parser():
    from trytond import commandline
    parser = commandline.get_base_parser()
    parser.prog = 'trytond-async-admin'
    parser.description = (
        "Inspect and repair the queues and the deferred tasks of a database.")
    parser.add_argument("-v", "--verbose", action='count', dest="verbose",
        default=0, help="increase verbosity")
    parser.add_argument("--logconf", dest="logconf", metavar='FILE',
        default=os.environ.get('TRYTOND_LOGGING_CONFIG'),
        help="set logging configuration file (ConfigParser format)")
    # one database: the command that follows must not be read as a second
    parser.add_argument("-d", "--database", dest="database_name",
        required=True, metavar='DATABASE', help="specify the database name")
    commands = parser.add_subparsers(
        dest='command', metavar='COMMAND', required=True)
    status = commands.add_parser('status',
        help="depths of the queues and dead-letter queues, tasks by state")
    status.add_argument('--json', action='store_true',
        help="write one JSON object")
    stats = commands.add_parser('stats',
        help="calls, rates and times per queue and method, from the rows")
    stats.add_argument('--since', type=_positive, metavar='MINUTES',
        help="the calls enqueued in the last MINUTES (default: 60)")
    stats.add_argument('--json', action='store_true',
        help="write one JSON object")
    commands.add_parser('create-queues',
        help="create every task queue and its dead-letter queue")
    requeue = commands.add_parser('requeue-dead',
        help="send the dead letters back to their queue, to run again")
    requeue.add_argument('--queue', metavar='NAME',
        help="this queue only (as the worker's --queue names it)")
    requeue.add_argument('--limit', type=_positive, metavar='N',
        help="requeue at most N dead letters")
    sweep = commands.add_parser('sweep-replies',
        help="delete the reply queues older than the reply_ttl")
    sweep.add_argument('--older-than', dest='older_than', type=_seconds,
        metavar='SECONDS', help="age of the queues to delete "
        "(default: the configured reply_ttl)")
    for name, text in [
            ('retry', "run failed or cancelled tasks again"),
            ('cancel', "cancel pending or queued tasks")]:
        command = commands.add_parser(name, help=text)
        command.add_argument('uuids', nargs='+', metavar='UUID',
            help="the id of a task")
    return parser


def admin_main(argv=None):
    from trytond import commandline, config

    parser = admin_parser()
    options = parser.parse_args(argv)
    config.update_etc(options.configfile)
    commandline.config_log(options)

    from botocore.exceptions import BotoCoreError, ClientError

    from trytond.exceptions import UserError
    from trytond.pool import Pool

    from . import admin
    from .exceptions import AsyncTaskError

    def fail(reason):
        print("%s: %s" % (parser.prog, reason), file=sys.stderr)
        return 1
    Pool.start()
    try:
        return admin.run(options)
    except (AsyncTaskError, ValueError) as exc:
        return fail(exc)
    except UserError as exc:
        return fail(exc.message)
    except ClientError as exc:
        error = exc.response.get('Error', {})
        return fail("SQS refused: %s %s" % (
                error.get('Code'), error.get('Message', '')))
    except BotoCoreError as exc:
        return fail("SQS: %s" % exc)


if __name__ == '__main__':
    sys.exit(worker_main())
