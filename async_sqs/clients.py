# This file is part of async_sqs.  The COPYRIGHT file at the top level of
# this repository contains the full copyright notices and license terms.
"""botocore sessions that share one data loader, and the clients of a
process: what SQS and S3 clients are made of is read once per process, and
a process forked can take over the clients of its parent."""
import os
import threading

import botocore.loaders
import botocore.session

#: The services whose endpoints the clients of async_sqs resolve: SQS, S3,
#: and those botocore's credential chain calls (assume role, SSO).
ENDPOINT_SERVICES = ('sqs', 's3', 'sts', 'sso', 'sso-oidc', 'signin')

_loader = None
_loader_lock = threading.Lock()
_caches = []


class LeanFileLoader(botocore.loaders.JSONFileLoader):
    """botocore's JSON file loader, which keeps of the endpoints file the
    services in ENDPOINT_SERVICES only, of a service model all but its
    documentation, and gives plain dicts.

    A client resolves the endpoint of its own service, but botocore keeps
    the endpoints of every AWS service in every partition: some 7 MiB once
    parsed, in each worker process. The documentation of a model, a third
    of it, only makes the docstrings of the client's methods. botocore
    parses into OrderedDicts, twice the size of a dict, whose order is the
    same."""

    def load_file(self, file_path):
        data = super().load_file(file_path)
        if not isinstance(data, dict):
            return data
        name = os.path.basename(file_path)
        if name == 'endpoints':
            for partition in data.get('partitions', []):
                services = partition.get('services', {})
                # a new dict: one that had keys deleted keeps its size
                partition['services'] = {name: services[name]
                    for name in ENDPOINT_SERVICES if name in services}
        elif name == 'service-2':
            _drop_documentation(data)
        return _plain(data)


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _drop_documentation(model):
    model.pop('documentation', None)
    for section in ('operations', 'shapes'):
        for definition in model.get(section, {}).values():
            definition.pop('documentation', None)
            for member in definition.get('members', {}).values():
                member.pop('documentation', None)


def data_loader():
    "Return the data loader of this process, made on first use."
    global _loader
    with _loader_lock:
        if _loader is None:
            # the search path botocore's own session would give its loader
            _loader = botocore.loaders.create_loader(
                botocore.session.get_session().get_config_variable(
                    'data_path'))
            _loader.file_loader = LeanFileLoader()
        return _loader


def session():
    "Return a new botocore session with the data loader of this process."
    session = botocore.session.get_session()
    session.register_component('data_loader', data_loader())
    return session


class ProcessCache:
    """One object per process and settings, made on first use by factory
    from the settings: a forked process, or new settings, make another."""

    def __init__(self, factory):
        self.factory = factory
        self.lock = threading.Lock()
        self.objects = {}
        _caches.append(self)

    def get(self, *settings_values):
        key = (os.getpid(),) + settings_values
        value = self.objects.get(key)
        if value is None:
            with self.lock:
                value = self.objects.get(key)
                if value is None:
                    self.objects.clear()
                    value = self.objects[key] = self.factory(
                        *settings_values)
        return value

    def clear(self):
        self.objects.clear()

    def inherit(self, parent_pid):
        """Take over the objects the parent process made, their connections
        closed: a socket is never shared between two processes."""
        with self.lock:
            for key in list(self.objects):
                if key[0] == parent_pid:
                    value = self.objects.pop(key)
                    value.close()
                    self.objects[(os.getpid(),) + key[1:]] = value


def inherit_from_parent():
    """Take over, in a process just forked, the clients its parent made.

    A client costs each process that makes one some 2 MiB of resident
    memory, most of it OpenSSL's code run by a new SSL context: made once
    before the fork, it is shared. No thread of the parent may be using
    them as it forks: a lock held then stays held in the child."""
    parent_pid = os.getppid()
    for cache in _caches:
        cache.inherit(parent_pid)
