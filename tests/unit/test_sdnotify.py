"""The notify protocol against a real unix datagram socket: what arrives, when, and nothing without systemd."""

import os
import socket
import uuid

import pytest

from icldaemon.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def receiver():
    """An abstract-namespace datagram socket, as systemd's; yields (receiver, NOTIFY_SOCKET value)."""
    name = f"icld-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind("\0" + name)
        listening.settimeout(5)
        yield listening, "@" + name


def received(listening: socket.socket) -> list[str]:
    messages = []
    listening.setblocking(False)
    try:
        while True:
            messages.append(listening.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        listening.settimeout(5)


def test_ready_status_watchdog_and_stopping_arrive_as_key_value_lines(receiver):
    listening, address = receiver
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"})

    assert notifier.ready("waiting for prompts")
    notifier.status("waiting for prompts")  # unchanged: not sent again
    notifier.status("measuring prompt 7")
    assert notifier.watchdog(now=100.0)
    assert not notifier.watchdog(now=101.9)  # half of 4 s has not passed
    assert notifier.watchdog(now=102.0)
    notifier.stopping()
    notifier.close()

    assert notifier.watchdog_interval == 2.0
    assert received(listening) == ["READY=1\nSTATUS=waiting for prompts", "STATUS=measuring prompt 7", "WATCHDOG=1",
                                   "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})

    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("waiting") and not notifier.watchdog() and not notifier.stopping()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["set", "for this process", "for another process", "zero", "not a number", "unset"],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process_only(environ, interval):
    assert watchdog_interval(environ) == interval


def test_a_vanished_socket_is_reported_not_raised(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})

    assert notifier.enabled
    assert not notifier.ready("waiting for prompts")
    assert not notifier.watchdog()  # no watchdog asked for
    notifier.close()
