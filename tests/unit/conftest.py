import pytest

from pdserve.kv_transfer.receiver import KVSocketReceiver

from .test_kv_transfer import make_caches


@pytest.fixture
def receiver():
    """A KV receiver (both connectors) on this process's loopback, into fresh caches."""
    receiver = KVSocketReceiver(make_caches(), pair_timeout=10)
    yield receiver
    receiver.close()
