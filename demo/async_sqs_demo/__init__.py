# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"A demo module: invoices rendered on workers through async_sqs."
