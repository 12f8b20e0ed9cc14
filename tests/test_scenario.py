# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"The scenario_*.rst walk-throughs, run as trytond runs those of its modules."
import unittest

from trytond.tests.test_tryton import load_doc_tests


def load_tests(*args, **kwargs):
    return load_doc_tests(__name__, __file__, *args, **kwargs)


def test_scenarios():
    "Every scenario passes"
    suite = load_tests(unittest.TestLoader(), unittest.TestSuite(), None)
    assert suite.countTestCases() >= 1
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    assert result.wasSuccessful(), result.failures + result.errors
