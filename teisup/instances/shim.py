"""The per-instance subreaper shim: no process of an instance outlives its manager.

The manager runs every instance as ``python -I -S shim.py MANAGER_PID --
ARGV...`` (`shim_argv`); the shim is the process the manager sees (its pid,
its exit status, its process group), and the instance is the shim's only
child, in the shim's process group, with the shim's stdin, stdout and stderr.
The manager's spawner makes it, between fork and exec (`prepare_shim`, both
settings outlive the exec), a child subreaper whose parent-death signal is
`MANAGER_GONE`. The shim:

* as a child subreaper, gets back every descendant that loses its parent (a
  double fork, a ``setsid`` daemon: TEI's Python backend), so "descendant of
  the shim" stays true for all of them;
* catches `MANAGER_GONE`, and also notices its parent pid changing: when the
  manager dies, even by SIGKILL, it SIGKILLs every descendant and then
  itself. (The spawner blocks that signal before the exec: should the
  manager die while the shim starts, it waits, pending);
* forwards the usual signals to the instance, unless they come from the
  manager: the manager signals the whole process group, which the instance
  is in already, and a second SIGTERM could end its graceful shutdown early.
  The exception is a signal sent while the shim starts, before the instance
  is in the group: the spawner blocks these too before the exec, and the
  shim passes on whatever is pending once the instance runs, so a stop
  right after a start is not lost (the instance would live out the grace);
* when the instance exits, kills what is left of its tree (detached
  grandchildren included) and exits as the instance did: the same code, or
  killed by the same signal, so the manager's exit readings stay right.

A command that cannot be executed is reported on stderr as ``Error: cannot
run ...`` and the shim exits 127.

Only modules built into the interpreter, and ``-S``: the shim must start in
milliseconds (importing ctypes would cost more than the rest, hence the settings made by the
spawner). It is single-threaded and waits with ``sigwaitinfo`` on blocked
signals; the instance starts by ``posix_spawn`` with the original mask.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence

__all__ = ["FORWARDED", "MANAGER_GONE", "main", "shim_argv"]

#: The parent-death signal the shim arms: one nobody else sends.
MANAGER_GONE = signal.SIGRTMIN

#: Signals passed on to the instance when someone other than the manager
#: sends them to the shim.
FORWARDED = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCONT,
    }
)

#: How long killing a tree may take before the shim gives up on stragglers
#: (a process in uninterruptible sleep dies when the kernel lets it).
_KILL_BUDGET = 10.0


def shim_argv(manager_pid: int, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` under the shim for ``manager_pid``."""
    return [sys.executable, "-I", "-S", __file__, str(manager_pid), "--", *argv]


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    return None if fields[0] == b"Z" else int(fields[1])


def _live_descendants(root: int) -> list[int]:
    """Live descendants of ``root``, from one reading of ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _reap_all() -> Iterator[tuple[int, int]]:
    """(pid, status) of every exited child; stops when none is waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def kill_tree(me: int) -> None:
    """SIGKILL every descendant until none is left (or the budget is spent).

    As a subreaper, every orphan of the tree is our child, so "no children"
    means "no descendants" and the usual case (nothing left) reads no
    ``/proc`` at all. Signals go through pidfds, after checking that the
    process is still in the tree, so a reused pid is never hit.
    """
    deadline = time.monotonic() + _KILL_BUDGET
    while time.monotonic() < deadline:
        for _ in _reap_all():
            pass
        if not _has_children():
            return
        for pid in _live_descendants(me):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _parent_of(pid) is not None:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        signal.sigtimedwait([signal.SIGCHLD], 0.05)


def _exit_like(status: int) -> None:
    """Exit the way a child with wait status ``status`` did."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    sig = -code
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled at all
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is not to terminate


def _die_with_manager(me: int) -> None:
    kill_tree(me)
    os.kill(me, signal.SIGKILL)


def _spawn(argv: Sequence[str], mask: set[int | signal.Signals]) -> int:
    try:
        return os.posix_spawnp(argv[0], list(argv), os.environ, setsigmask=mask)
    except OSError as exc:
        print(f"Error: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        os._exit(127)


def _forward(instance: int, signo: int) -> None:
    try:  # noqa: SIM105 - contextlib is not built in: slower to start
        os.kill(instance, signo)
    except ProcessLookupError:
        pass


def main(args: Sequence[str]) -> None:
    """``MANAGER_PID -- ARGV...``: run ARGV as described above; never returns."""
    if len(args) < 3 or args[1] != "--":
        print("usage: shim.py MANAGER_PID -- ARGV...", file=sys.stderr, flush=True)
        os._exit(2)
    manager, argv = int(args[0]), args[2:]
    me = os.getpid()
    waited = {signal.SIGCHLD, MANAGER_GONE, *FORWARDED}
    # Blocked, a signal is never lost, only left pending until sigwaitinfo
    # takes it; the instance gets the mask the manager gave us.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited) - {MANAGER_GONE, *FORWARDED}
    instance = _spawn(argv, mask)
    # The spawner blocked these across the exec. One sent while the shim
    # started (the manager stopping an instance just spawned) found the group
    # without the instance in it, so whatever is pending now is passed on.
    while (early := signal.sigtimedwait(FORWARDED, 0)) is not None:
        _forward(instance, early.si_signo)
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == MANAGER_GONE or os.getppid() != manager:
            _die_with_manager(me)
        if info.si_signo == signal.SIGCHLD:
            for pid, status in _reap_all():
                if pid == instance:
                    kill_tree(me)
                    _exit_like(status)
        elif info.si_pid != manager:
            _forward(instance, info.si_signo)


if __name__ == "__main__":
    main(sys.argv[1:])
