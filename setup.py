#!/usr/bin/env python3
# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
import io
import os
from configparser import ConfigParser

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = 'async_sqs'


def read(fname):
    with io.open(os.path.join(HERE, fname), 'r', encoding='utf-8') as fp:
        return fp.read()


config = ConfigParser()
config.read_file(open(os.path.join(HERE, 'tryton.cfg')))
info = dict(config.items('tryton'))
for key in ('depends', 'extras_depend', 'xml'):
    if key in info:
        info[key] = info[key].strip().splitlines()
version = info.get('version', '0.0.1')
major_version, minor_version, _ = version.split('.', 2)
major_version, minor_version = int(major_version), int(minor_version)

setup(
    name='trytond_async_sqs',
    version=version,
    description="Run Tryton methods later, on workers, through Amazon SQS",
    long_description=read('README.rst'),
    long_description_content_type='text/x-rst',
    license='GPL-3.0-or-later',
    package_dir={'trytond.modules.async_sqs': 'async_sqs'},
    packages=['trytond.modules.async_sqs'],
    package_data={
        'trytond.modules.async_sqs': (info.get('xml', [])
            + ['tryton.cfg', 'view/*.xml']),
        },
    python_requires='>=3.10',
    install_requires=[
        'trytond >= 8.0, < 8.3',
        'boto3',
        'wrapt',
        ],
    extras_require={
        'test': ['moto[server]', 'pytest', 'hypothesis', 'proteus',
            'psycopg2-binary'],
        },
    zip_safe=False,
    entry_points={
        'trytond.modules': ['async_sqs = trytond.modules.async_sqs'],
        'console_scripts': [
            'trytond-async-worker = '
            'trytond.modules.async_sqs.cli:worker_main',
            'trytond-async-admin = '
            'trytond.modules.async_sqs.cli:admin_main',
            ],
        },
    )
