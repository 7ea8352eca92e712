"""vLLM stops when the `livetrain serve` that started it is gone.

`livetrain serve` starts vLLM in a session of its own, so that vLLM's engine processes
can be stopped as one process group; that group gets none of the signals sent to the
supervisor's group, and a supervisor that is SIGKILLed (a process manager's final kill,
``kill -9``, the OOM killer) cannot stop it. So the launcher passes the supervisor's pid
in ``LIVETRAIN_SUPERVISOR_PID``, and in the process that leads vLLM's group (the API
server, the supervisor's child) a daemon thread waits for the supervisor to exit; then it
SIGTERMs the group (vLLM's own shutdown: engine stopped, port and memory freed) and
SIGKILLs whatever is still there ``GRACE_S`` later.

The wait is on a pidfd: the kernel wakes the thread the moment the supervisor exits, with
no polling, and a pidfd cannot be confused by a reused pid. (``PR_SET_PDEATHSIG`` would
signal the API server alone, once, with no escalation, and fires when the *thread* that
started vLLM exits, not the process.) Where ``pidfd_open`` is missing (Linux before 5.3,
some sandboxes) the thread watches for this process being re-parented instead.

Imported by the general plugin in every vLLM process: it must stay cheap (no vLLM, no torch).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

SUPERVISOR_PID_ENV = "LIVETRAIN_SUPERVISOR_PID"
GRACE_S = 5.0  # after the SIGTERM, before the SIGKILL: vLLM's own shutdown takes a second or two
REPARENT_POLL_S = 0.2  # only without pidfd_open

_watching = False


def watch_supervisor(env: Mapping[str, str] = os.environ, grace_s: float = GRACE_S) -> bool:
    """Start the watchdog if this process leads its process group and ``env`` names a
    supervisor (at most once per process); whether it was started."""
    global _watching
    supervisor = env.get(SUPERVISOR_PID_ENV)
    if _watching or not supervisor or os.getpid() != os.getpgrp():
        return False
    threading.Thread(target=stop_group_when_gone, args=(int(supervisor), grace_s),
                     name="livetrain-supervisor-watch", daemon=True).start()
    _watching = True
    return True


def wait_for_parent_exit(parent: int) -> None:
    """Return once ``parent`` (this process's parent) has exited; at once if it already has."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except OSError:
        while os.getppid() == parent:
            time.sleep(REPARENT_POLL_S)
        return
    try:
        # Checked after opening: if this process is still the child, the pidfd is its parent's;
        # if it was re-parented, the parent exited before (and the pid may be another's by now).
        if os.getppid() == parent:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()
    finally:
        os.close(fd)


def stop_group_when_gone(supervisor: int, grace_s: float) -> None:
    """Wait for ``supervisor`` to exit, then SIGTERM this process group; SIGKILL it if
    anything of it is left after ``grace_s``."""
    wait_for_parent_exit(supervisor)
    group = os.getpgrp()
    log.warning("livetrain: the livetrain serve that started vLLM (pid %d) is gone; stopping vLLM "
                "(process group %d)", supervisor, group)
    os.killpg(group, signal.SIGTERM)
    time.sleep(grace_s)  # this thread dies with its process if vLLM exits sooner, as it should
    os.killpg(group, signal.SIGKILL)
