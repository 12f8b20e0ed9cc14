# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"Sphinx configuration, in the shape of the doc/conf.py of Tryton's modules."
import os

base_url = os.environ.get('DOC_BASE_URL')
if base_url:
    trytond_url = base_url + '/server/'
else:
    trytond_url = 'https://docs.tryton.org/{series}/server/'


def get_info():
    import configparser
    import subprocess
    import sys

    module_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    config = configparser.ConfigParser()
    with open(os.path.join(module_dir, 'tryton.cfg')) as fp:
        config.read_file(fp)
    info = dict(config.items('tryton'))

    result = subprocess.run(
        [sys.executable, 'setup.py', '--name', '--description'],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True,
        cwd=module_dir, encoding='utf-8')
    info['name'], info['description'] = (
        result.stdout.strip().splitlines()[-2:])

    major_version, minor_version, _ = info['version'].split('.', 2)
    major_version = int(major_version)
    minor_version = int(minor_version)
    # odd minor versions are development series, as in Tryton
    if minor_version % 2:
        info['series'] = 'latest'
    else:
        info['series'] = '%s.%s' % (major_version, minor_version)
    return info


info = get_info()

html_theme = 'sphinx_book_theme'
html_theme_options = {
    'home_page_in_toc': True,
    'use_download_button': False,
    }
html_title = info['description']
master_doc = 'index'
project = info['name']
release = version = info['series']
default_role = 'ref'
highlight_language = 'none'
exclude_patterns = ['**/*.inc.rst']
extensions = [
    'sphinx_copybutton',
    'sphinx.ext.intersphinx',
    ]
# Tryton's modules link to the server's documentation through intersphinx;
# the inventory is fetched over the network, so only when asked
# (DOC_INTERSPHINX=1): the test command builds offline, warnings as errors.
intersphinx_mapping = {}
if os.environ.get('DOC_INTERSPHINX'):
    intersphinx_mapping['trytond'] = (
        trytond_url.format(series=version), None)
linkcheck_ignore = [r'/.*']
linkcheck_workers = 1

del get_info, info, base_url, trytond_url
