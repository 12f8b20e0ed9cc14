# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
import datetime as dt
import hashlib
import os
import socket
import time
from decimal import Decimal

from trytond.model import ModelSQL, fields

from trytond.modules.async_sqs import async_task

#: Seconds one render pretends to spend on layout, as a real report would.
RENDER_TIME = 0.01


def worker_name():
    "Return the host and process id of the running process."
    return '%s:%s' % (socket.gethostname(), os.getpid())


class Invoice(ModelSQL):
    "An invoice whose document a worker renders."
    __name__ = 'async_sqs.demo.invoice'
    __string__ = "Demo Invoice"
    number = fields.Char("Number", required=True)
    amount = fields.Numeric("Amount", digits=(14, 2), required=True)
    state = fields.Selection([
            ('draft', "Draft"),
            ('rendered', "Rendered"),
            ], "State", required=True, readonly=True)
    checksum = fields.Char("Checksum", readonly=True)
    # a Timestamp keeps the microseconds that a DateTime drops
    rendered_at = fields.Timestamp("Rendered At", readonly=True)
    rendered_by = fields.Char("Rendered By", readonly=True,
        help="The host and process id of the worker.")

    @classmethod
    def default_state(cls):
        return 'draft'

    def get_document(self):
        "Return the text of the invoice document."
        lines = ["INVOICE %s" % self.number]
        for i in range(1, 51):
            lines.append("%3i  item %-20s %12s" % (
                    i, self.number, (self.amount / 50).quantize(
                        Decimal('0.01'))))
        lines.append("TOTAL %s" % self.amount)
        return '\n'.join(lines)

    @async_task()
    @classmethod
    def render(cls, invoices):
        "Render the document of the invoices and mark them rendered."
        for invoice in invoices:
            document = invoice.get_document()
            time.sleep(RENDER_TIME)
            invoice.checksum = hashlib.sha256(
                document.encode('utf-8')).hexdigest()
            invoice.state = 'rendered'
            invoice.rendered_at = dt.datetime.now()
            invoice.rendered_by = worker_name()
        cls.save(invoices)

    @async_task(ignore_result=False)
    @classmethod
    def summarize(cls):
        "Return the count and total of the rendered invoices."
        invoices = cls.search([('state', '=', 'rendered')])
        return {
            'rendered': len(invoices),
            'total': sum((i.amount for i in invoices), Decimal(0)),
            'by': worker_name(),
            }
