"""The worker registry thread and the prefork pool: a fork waits until the thread is out of the store."""

from __future__ import annotations

import os
import threading
import time

from worker import tasks


def test_a_fork_waits_while_the_registry_thread_is_inside_the_store() -> None:
    """A child forked while the thread held SQLite's mutexes would hang on its first store call."""
    inside, hold_s = threading.Event(), 0.5

    def registry_call() -> None:
        with tasks._store_calls:
            inside.set()
            time.sleep(hold_s)

    thread = threading.Thread(target=registry_call)
    thread.start()
    assert inside.wait(10)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: its lock is a fresh one, free at once
        os._exit(0 if tasks._store_calls.acquire(timeout=1) else 3)
    waited = time.monotonic() - t0
    _, status = os.waitpid(pid, 0)
    thread.join()
    assert waited >= hold_s * 0.8, waited  # the fork waited for the thread to leave the store
    assert os.waitstatus_to_exitcode(status) == 0
