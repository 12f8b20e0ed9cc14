# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The no-op methods bench/run.py defers through async_sqs and ir.queue."
