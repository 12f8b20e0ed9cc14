# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
from trytond.modules.async_sqs.sqs import queue_name, task_queue_name
from trytond.tests.test_tryton import ModuleTestCase


class AsyncSqsTestCase(ModuleTestCase):
    "Test Async SQS module"
    module = 'async_sqs'

    def test_queue_name_fits_sqs(self):
        "Test a long database name still gives a valid queue name"
        name = queue_name('x' * 200, 'reports')
        self.assertRegex(name, r'^[A-Za-z0-9_-]{1,75}$')
        self.assertNotEqual(name, queue_name('x' * 201, 'reports'))

    def test_queue_name_alphabet(self):
        "Test characters SQS refuses are replaced"
        self.assertEqual(
            queue_name('pre', 'my.db', 'rép orts'), 'pre-my_db-r_p_orts')

    def test_worker_databases_add_up(self):
        "Test -d given twice serves both databases"
        from trytond.modules.async_sqs.cli import worker_parser
        options = worker_parser().parse_args(
            ['-d', 'one', '-d', 'two', '--queue', 'a', '--queue', 'b'])
        self.assertEqual(options.database_names, ['one', 'two'])
        self.assertEqual(options.queues, ['a', 'b'])

    def test_task_queue_name_default(self):
        "Test the default queue name of a database"
        self.assertEqual(task_queue_name('db'), 'db-trytond-async')


del ModuleTestCase
