"""OS processes with no orphans: spawn, wait, signal, sweep (Linux).

Four measures, because each covers a gap in the others:

* every child leads its own session and process group, and is signalled as a
  group, so TEI's own children (a python backend) stop with it;
* every child carries ``PR_SET_PDEATHSIG(SIGKILL)``, so it dies if the manager
  is SIGKILLed. The kernel ties that signal to the *thread* that forked the
  child, and trio's ``open_process`` forks from a cached worker thread that
  exits after 10 s idle, which would kill the child then. So `ProcessSpawner`
  forks from one dedicated thread that lives until the spawner closes, after
  every child is gone;
* every child is the subreaper shim (`teisup.instances.shim`) running the
  real command: when the manager dies it kills the whole tree, grandchildren
  that left the process group included, which neither of the above reaches;
* the manager is a child subreaper, so orphaned grandchildren come back to it
  to be reaped, and a start-up sweep kills whatever a previous manager left
  (found by the marker variables in ``/proc/<pid>/environ``).

Whether a pid is alive is read from ``/proc/<pid>/stat``: ``kill -0`` succeeds
on zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .launch import INSTANCE_MARKER
from .shim import FORWARDED, MANAGER_GONE, shim_argv

__all__ = [
    "ProcessSpawner",
    "descendants",
    "find_marked_processes",
    "kill_group",
    "kill_tree",
    "proc_state",
    "reap_adopted_orphans",
    "set_child_subreaper",
    "sweep_leftovers",
    "wait_for_exit",
]

logger = logging.getLogger("teisup.instances.process")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent_pid: int) -> None:  # pragma: no cover - runs in the forked child
    # Between fork and exec: only async-signal-safe work. If the parent died
    # before prctl took effect, no signal would ever come, so check.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _shim_setup(parent_pid: int) -> None:  # pragma: no cover - runs in the forked child
    # What the shim needs from prctl, made here where ctypes is loaded already;
    # both settings survive the exec. Its parent-death signal is one it
    # catches, to kill its tree before it goes.
    # Blocked across the exec, so that they wait for the shim, pending: the
    # parent-death signal, and a stop the manager sends the group while the
    # shim starts (the shim passes that on to the instance once it runs).
    signal.pthread_sigmask(signal.SIG_BLOCK, [MANAGER_GONE, *FORWARDED])
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _libc.prctl(_PR_SET_PDEATHSIG, MANAGER_GONE, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def set_child_subreaper() -> bool:
    """Make this process a child subreaper; False where the kernel refuses."""
    return bool(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


@dataclass
class _SpawnRequest:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None
    stdin: bool
    done: trio.Event
    token: trio.lowlevel.TrioToken
    process: subprocess.Popen[bytes] | None = None
    error: BaseException | None = None


def _check_executable(name: str, env: Mapping[str, str]) -> None:
    """Raise what exec would (FileNotFoundError, PermissionError) for a
    command that cannot run, before anything is forked for it."""
    if shutil.which(name, path=env.get("PATH", os.defpath)) is not None:
        return
    if os.sep in name and os.path.exists(name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


class ProcessSpawner:
    """Forks children from one long-lived thread so PDEATHSIG stays armed.

    Each child runs under the subreaper shim (``shim=False`` runs the command
    itself, as before the shim, for comparison): the pid, the exit status,
    the process group and the pipes are the shim's, which passes them
    through.

    Use as an async context manager; leaving it stops the thread, so leave it
    only once every child it spawned has exited.
    """

    def __init__(self, *, shim: bool = True) -> None:
        self.shim = shim
        self._requests: queue.SimpleQueue[_SpawnRequest | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen[bytes]] = []

    def owned_pids(self) -> set[int]:
        """Pids of spawned children not reaped yet: an orphan reaper must leave
        them to their owners, or it would steal their exit status."""
        with self._lock:
            return self._owned()

    def reap_adopted_orphans(self) -> list[int]:
        """`reap_adopted_orphans` with this spawner's children left alone,
        one being forked included: the scan and a spawn's fork-and-register
        exclude each other, so a child just exec'd (carrying the instance
        marker, not yet registered) is never taken for an orphan."""
        with self._lock:
            return reap_adopted_orphans(self._owned())

    def _owned(self) -> set[int]:
        self._children = [p for p in self._children if p.returncode is None]
        return {p.pid for p in self._children}

    async def __aenter__(self) -> ProcessSpawner:
        self._thread = threading.Thread(target=self._serve, name="teisup-spawner", daemon=True)
        self._thread.start()
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._requests.put(None)
        self._thread = None
        await trio.lowlevel.checkpoint()

    def _serve(self) -> None:
        parent = os.getpid()
        while (request := self._requests.get()) is not None:
            argv = list(request.argv)
            setup = _child_setup
            try:
                if self.shim:
                    _check_executable(argv[0], request.env)
                    argv = shim_argv(parent, argv)
                    setup = _shim_setup
                # Forked and registered under the lock: an orphan scan sees the
                # child either not at all or as owned (see reap_adopted_orphans).
                with self._lock:
                    request.process = subprocess.Popen(
                        argv,
                        env=dict(request.env),
                        cwd=request.cwd,
                        stdin=subprocess.PIPE if request.stdin else subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                        preexec_fn=functools.partial(setup, parent),
                    )
                    self._children.append(request.process)
            except BaseException as exc:  # reported to the caller, never lost here
                request.error = exc
            try:
                request.token.run_sync_soon(request.done.set)
            except trio.RunFinishedError:
                if request.process is not None:
                    kill_group(request.process.pid, signal.SIGKILL)
                    request.process.wait()

    async def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None = None,
        *,
        stdin: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session with pipes on stdout and stderr.

        ``stdin`` gives it a pipe on stdin too (a helper process the manager
        talks to: the multiplexer's workers); otherwise stdin is /dev/null.

        Raises what `subprocess.Popen` raises (FileNotFoundError for a missing
        binary, PermissionError, ...).
        """
        if self._thread is None:
            raise RuntimeError("ProcessSpawner is not open")
        request = _SpawnRequest(
            argv, env, cwd, stdin, trio.Event(), trio.lowlevel.current_trio_token()
        )
        self._requests.put(request)
        # Not cancellable: a process forked for a caller that went away would
        # have no owner. Forking takes milliseconds.
        with trio.CancelScope(shield=True):
            await request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.process is not None
        return request.process


def _exited_unreaped(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped already
    return info is not None


async def wait_for_exit(
    process: subprocess.Popen[bytes], *, before_reap: Callable[[], object] | None = None
) -> int:
    """Wait for ``process`` to exit and reap it; return its return code.

    Uses a pidfd where the kernel has them: woken by the exit itself, with no
    polling. ``before_reap`` runs after the exit and before the reaping, while
    the pid still cannot be reused (to signal the rest of its group, say).
    """
    if process.returncode is not None:
        return process.returncode
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is None:  # pragma: no cover - kernels before 5.3
            while not _exited_unreaped(process.pid):  # noqa: ASYNC110 - no pidfd: only time
                await trio.sleep(0.05)
        elif not _exited_unreaped(process.pid):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if before_reap is not None and process.returncode is None:
        before_reap()
    return process.wait()


def kill_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to a process group; False if no member is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("not allowed to signal process group %d", pgid)
        return False
    return True


def kill_tree(leader: int) -> bool:
    """SIGKILL the process group of ``leader`` and every descendant of it,
    those that left the group (``setsid``, a double fork) included.

    A SIGKILL of the group alone would take the instance's shim with it before
    it could clean up, leaving such descendants to the manager. Each is held by
    a pidfd, opened while its parent is still one of the tree's, so a pid that
    exits and is reused in between is never signalled. False if nothing of the
    group was left.
    """
    found = descendants(leader)
    tree = {leader, *found}
    held: list[int] = []
    for pid in found:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        if _parent_of(pid) in tree:
            held.append(pidfd)
        else:  # exited and its pid reused since the reading
            os.close(pidfd)
    alive = kill_group(leader, signal.SIGKILL)
    for pidfd in held:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return alive


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from ``/proc`` (``Z`` for a zombie), or
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain ") ".
    return stat.rsplit(")", 1)[1].split()[0]


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, theirs, ...), from one
    reading of ``/proc``; a snapshot, so racing forks may be missed."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        parent = _parent_of(child)
        if parent is not None:
            children.setdefault(parent, []).append(child)
    found: list[int] = []
    stack = list(children.get(pid, ()))
    while stack:
        child = stack.pop()
        if _alive(child):
            found.append(child)
        stack.extend(children.get(child, ()))
    return sorted(found)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _ancestors() -> set[int]:
    found = set()
    pid: int | None = os.getpid()
    while pid and pid not in found:
        found.add(pid)
        pid = _parent_of(pid)
    return found


def find_marked_processes(markers: Mapping[str, str], *, required: Sequence[str] = ()) -> list[int]:
    """Live (non-zombie) processes whose environment holds every marker (and
    every ``required`` name), never this process or one of its ancestors."""
    found = []
    excluded = _ancestors()
    for pid in _pids():
        if pid in excluded:
            continue
        env = _environ(pid)
        if not env or any(env.get(k) != v for k, v in markers.items()):
            continue
        if any(name not in env for name in required):
            continue
        if _alive(pid):
            found.append(pid)
    return sorted(found)


async def sweep_leftovers(
    markers: Mapping[str, str], *, required: Sequence[str] = (), grace: float = 5.0
) -> list[int]:
    """Kill what a previous manager with these markers left running.

    SIGTERM to each leftover (and its process group, when it leads one), up
    to ``grace`` seconds for them to go, then SIGKILL. Signals go through
    pidfds opened before the markers are re-checked, so a pid reused in the
    meantime is never hit. Returns the pids that were found.
    """
    pidfds: dict[int, int] = {}
    try:
        for pid in find_marked_processes(markers, required=required):
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except OSError:
                continue
        # Re-check now that the pidfds pin the processes.
        still = set(find_marked_processes(markers, required=required))
        for pid in [p for p in pidfds if p not in still]:
            os.close(pidfds.pop(pid))
        if not pidfds:
            return []
        leftovers = sorted(pidfds)
        logger.warning(
            "sweeping %d leftover process(es) of a previous manager: %s", len(leftovers), leftovers
        )
        for pid, pidfd in pidfds.items():
            _signal_leftover(pid, pidfd, signal.SIGTERM)
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                for pidfd in pidfds.values():
                    nursery.start_soon(trio.lowlevel.wait_readable, pidfd)
        for pid, pidfd in pidfds.items():
            if _alive(pid):
                _signal_leftover(pid, pidfd, signal.SIGKILL)
        return leftovers
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def _alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state != "Z"


def _signal_leftover(pid: int, pidfd: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, sig)
    # A leader of its own group (as our instances are): its group goes too.
    # The pidfd keeps the pid from being reused while the group is signalled.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid and pid != os.getpgid(0):
            os.killpg(pid, sig)


def reap_adopted_orphans(owned: set[int]) -> list[int]:
    """Reap zombie children of ours that nobody else waits for; kill live
    ones that come from an instance.

    As a subreaper (or as PID 1 in a container) the manager inherits orphaned
    grandchildren; their zombies are reaped here. A live one carrying the
    instance marker lost its shim (a fork that raced ``kill_tree``) and gets
    SIGKILL, as its shim would have done. ``owned`` are the pids of children
    whose owners wait for them themselves; a spawner's own children are best
    left through `ProcessSpawner.reap_adopted_orphans`, which excludes a spawn
    in progress too.
    """
    me = os.getpid()
    reaped = []
    for pid in _pids():
        if pid in owned or _parent_of(pid) != me:
            continue
        if proc_state(pid) != "Z":
            if INSTANCE_MARKER in _environ(pid):
                _kill_adopted(pid)
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        except OSError as exc:  # pragma: no cover - defensive
            if exc.errno != errno.ECHILD:
                raise
            continue
        reaped.append(pid)
    return reaped


def _kill_adopted(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # Still ours once pinned: a child of ours cannot be reused under us.
        if _parent_of(pid) == os.getpid():
            logger.warning("killing pid %d, left by an instance whose shim was killed", pid)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)
