# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The console scripts."
# Nothing here may import trytond.pool, trytond.model or the module before
# the configuration is read: trytond picks its backend at first import.
import argparse
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
        metavar='NAME', default=[],
        help="listen on this queue only (repeat for more); default: the "
        "configured queue and every queue a decorated method names")
    return parser


def worker_main(argv=None):
    from trytond import commandline
    from trytond import config

    parser = worker_parser()
    options = parser.parse_args(argv)
    if not options.database_names:
        parser.error("at least one database is needed (-d)")
    config.update_etc(options.configfile)
    commandline.config_log(options)

    from trytond.pool import Pool

    from . import worker
    from .exceptions import SigningKeyMissing
    with commandline.pidfile(options):
        Pool.start()
        try:
            worker.work(options)
        except SigningKeyMissing as exc:
            print("trytond-async-worker: %s" % exc, file=sys.stderr)
            return 2
    return 0


if __name__ == '__main__':
    sys.exit(worker_main())
