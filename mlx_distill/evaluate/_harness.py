"""The sandbox child. Standard library only: it runs under ``python -I -S``.

Started by :mod:`mlx_distill.evaluate.sandbox` as ``python -I -S -B harness.py CTL``.
Before any untrusted text is compiled it, in this order:

1. reads the nonce (stdin), the spec and the answer from ``CTL`` and opens the
   result file (as the starting user);
2. enters a new network namespace (Linux: ``unshare(CLONE_NEWNET)`` as root,
   ``CLONE_NEWUSER|CLONE_NEWNET`` otherwise; no interfaces but a down loopback);
3. lowers the rlimits (CPU, address space, file size, open files, core);
4. as root, drops to ``nobody`` (uid/gid 65534, no groups, no_new_privs), so the
   kernel refuses writes outside the work dir (which the parent chowned) and
   reads of root-only files such as ``/proc/<parent>/environ``;
5. installs a Python audit hook (the portable layer, and the only network layer
   on macOS): no process creation, no signals to other pids, no ctypes, no
   sockets except AF_UNIX inside the work dir, no ``gc`` object walking, writes
   only inside the work dir, reads only of the work dir, the stdlib and a few
   device files.

Each step reports what it really achieved in the first result line; nothing is
assumed. Results are JSON lines prefixed with the nonce, so text an answer
prints cannot pass for a result (the result file also lives in CTL, which the
dropped uid cannot open and the audit hook refuses).
"""

import json
import linecache
import os
import resource
import signal
import sys
import time
import traceback
import types

NOBODY = 65534
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
_SELF = os.path.abspath(__file__)


class TestTimeout(BaseException):
    """Raised by SIGALRM when one test (or loading the answer) runs too long."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True), ctypes


def enter_netns():
    """A new, empty network namespace when the kernel allows it."""
    if not sys.platform.startswith("linux"):
        return "audit-hook", f"no network namespaces on {sys.platform}"
    try:
        libc, ctypes = _libc()
    except OSError as e:
        return "audit-hook", f"libc unavailable: {e}"
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) == 0:
        return (
            "namespace",
            "unshare(CLONE_NEWNET)"
            if flags == CLONE_NEWNET
            else "unshare(CLONE_NEWUSER|CLONE_NEWNET)",
        )
    err = ctypes.get_errno()
    return "audit-hook", f"unshare refused: {os.strerror(err)}"


def set_limits(spec):
    """Lower soft and hard limits; report the values the kernel now reports."""
    wanted = {
        "RLIMIT_CPU": (spec["cpu_s"], spec["cpu_s"] + 1),
        "RLIMIT_AS": (spec["memory_mb"] * 2**20,) * 2,
        "RLIMIT_FSIZE": (spec["fsize_mb"] * 2**20,) * 2,
        "RLIMIT_NOFILE": (spec["nofile"],) * 2,
        "RLIMIT_CORE": (0, 0),
    }
    out = {}
    for name, (soft, hard) in wanted.items():
        res = getattr(resource, name, None)
        if res is None:
            out[name] = "unsupported"
            continue
        try:
            cur_soft, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(res, (soft, hard))
            out[name] = resource.getrlimit(res)[0]
        except (ValueError, OSError) as e:
            out[name] = f"failed: {e}"
    return out


def drop_privileges(spec):
    if os.geteuid() != 0:
        return {"uid": os.getuid(), "dropped": False, "why": "not root"}
    if not spec.get("drop_uid"):
        return {"uid": 0, "dropped": False, "why": spec.get("drop_note") or "disabled"}
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except OSError as e:
        return {"uid": os.getuid(), "dropped": False, "why": str(e)}
    nnp = False
    if sys.platform.startswith("linux"):
        try:
            libc, _ = _libc()
            nnp = libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
        except OSError:
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (spec["nproc"], spec["nproc"]))
    except (ValueError, OSError, AttributeError):
        pass
    return {"uid": os.getuid(), "dropped": os.getuid() == NOBODY, "no_new_privs": nnp}


def _real(path, base):
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = os.fspath(path)
    return os.path.realpath(os.path.join(base, path))


def _fd_dir(dir_fd):
    if dir_fd is None:
        return None
    try:
        return os.readlink(f"/proc/self/fd/{dir_fd}")
    except OSError:
        return ""


def install_audit_hook(work, ctl, blocked_log):
    """The portable layer. Raises PermissionError on anything outside the rules."""
    work = os.path.realpath(work)
    ctl = os.path.realpath(ctl)
    pid = os.getpid()
    read_roots = [work, f"/proc/{pid}", "/proc/self", "/usr/share/zoneinfo"]
    for p in sys.path:
        if p:
            read_roots.append(os.path.realpath(p))
    read_roots = tuple(sorted(set(r for r in read_roots if r and r != "/")))
    read_files = frozenset(
        ("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero", "/etc/localtime")
    )
    write_roots = (work,)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    forbidden = frozenset(
        (
            "subprocess.Popen",
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.fork",
            "os.forkpty",
            "os.link",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "socket.getaddrinfo",
            "socket.gethostbyname",
            "socket.gethostbyaddr",
            "socket.gethostbyname_ex",
            "socket.getnameinfo",
            "webbrowser.open",
            "os.startfile",
        )
    )
    path_write_events = {
        "os.remove": (0, 1),
        "os.rmdir": (0, 1),
        "os.mkdir": (0, 2),
        "os.chmod": (0, 2),
        "os.chown": (0, 3),
        "os.truncate": (0, None),
        "os.utime": (0, 3),
        "os.symlink": (1, 2),
        "shutil.rmtree": (0, None),
        "shutil.chown": (0, None),
    }

    def inside(path, roots):
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def deny(event, detail):
        blocked_log.append(f"{event} {detail}"[:200])
        raise PermissionError(f"sandbox: {event} blocked ({detail})")

    def resolve(path, dir_fd=None):
        # Events pass dir_fd as None or as AT_FDCWD (negative) when relative to the cwd.
        base = _fd_dir(dir_fd) if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
        return _real(path, base or "/nonexistent")

    def hook(event, args):
        if event in forbidden:
            deny(event, "not allowed in the sandbox")
        if event.startswith("ctypes."):
            deny(event, "ctypes is not allowed in the sandbox")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            real = resolve(path)
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & write_flags
            )
            if inside(real, (ctl,)):
                deny(event, f"{real}: sandbox control files")
            if writing:
                if not (inside(real, write_roots) or real == "/dev/null"):
                    deny(event, f"write to {real} outside the work dir")
            elif not (inside(real, read_roots) or real in read_files):
                deny(event, f"read of {real}")
            return
        if event in path_write_events:
            i, fd_i = path_write_events[event]
            path = args[i]
            if isinstance(path, int):
                return
            dir_fd = args[fd_i] if fd_i is not None and fd_i < len(args) else None
            real = resolve(path, dir_fd)
            if not inside(real, write_roots):
                deny(event, f"{real} is outside the work dir")
            return
        if event in ("os.rename", "shutil.move", "shutil.copytree"):
            for p in args[:2]:
                if not isinstance(p, int) and not inside(resolve(p), write_roots):
                    deny(event, f"{resolve(p)} is outside the work dir")
            return
        if event in ("os.listdir", "os.scandir"):
            path = args[0]
            if path is None or isinstance(path, int):
                return
            real = resolve(path)
            if not inside(real, read_roots):
                deny(event, f"listing {real}")
            return
        if event in ("os.kill", "os.killpg"):
            if args[0] not in (pid, 0):
                deny(event, f"signal to pid {args[0]}")
            return
        if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            sock, addr = args[0], args[1] if len(args) > 1 else None
            family = getattr(sock, "family", None)
            if family == getattr(__import__("socket"), "AF_UNIX", -1) and isinstance(
                addr, (str, bytes)
            ):
                if isinstance(addr, bytes) and addr.startswith(b"\0"):
                    deny(event, "abstract unix socket")
                if inside(resolve(addr), write_roots):
                    return
            deny(event, f"network access to {addr!r}")
        if event == "sqlite3.connect":
            db = args[0]
            if isinstance(db, (str, bytes)) and os.fsdecode(db) not in (":memory:", ""):
                real = resolve(db)
                if not inside(real, write_roots):
                    deny(event, f"database {real} outside the work dir")

    sys.addaudithook(hook)


def _register_source(name, text):
    """Let tracebacks show answer/test lines without opening files (the hook would refuse)."""
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)


def _exc_text(e, limit=4):
    """The exception with its last frames, the harness's own frames left out."""
    walk = [(f, n) for f, n in traceback.walk_tb(e.__traceback__) if f.f_code.co_filename != _SELF]
    frames = traceback.StackSummary.extract(walk[-limit:], lookup_lines=False)
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(e), e)
    return "".join(lines).strip()[-1500:]


def _alarm(seconds):
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, max(0.0, seconds))


def run_python(spec, answer, work, emit):
    """Load the answer as module ``answer``, then call each ``test_*`` of the test code."""
    module = types.ModuleType("answer")
    module.__file__ = os.path.join(work, "answer.py")
    _register_source("answer.py", answer)
    _register_source("tests.py", spec["code"])
    sys.modules["answer"] = module
    t0 = time.perf_counter()
    _alarm(spec["test_timeout_s"])
    try:
        code = compile(answer, "answer.py", "exec")
        exec(code, module.__dict__)
    except TestTimeout:
        _alarm(0)
        emit(
            {
                "phase": "load",
                "ok": False,
                "timeout": True,
                "error": f"loading the answer took over {spec['test_timeout_s']} s",
            }
        )
        return
    except BaseException as e:  # SystemExit and KeyboardInterrupt from answers too
        _alarm(0)
        sys.stderr.write("--- loading the answer failed\n" + _exc_text(e, 8) + "\n")
        emit({"phase": "load", "ok": False, "error": _exc_text(e)})
        return
    _alarm(0)
    emit({"phase": "load", "ok": True, "duration_s": round(time.perf_counter() - t0, 4)})
    entry = spec.get("entrypoint")
    if entry and entry not in module.__dict__:
        emit({"phase": "entrypoint", "ok": False, "error": f"the answer does not define {entry!r}"})
        return
    ns = dict(module.__dict__)
    ns["__name__"] = "answer_tests"
    try:
        exec(compile(spec["code"], "tests.py", "exec"), ns)
    except BaseException as e:
        emit(
            {"phase": "tests", "ok": False, "error": "the test code itself failed: " + _exc_text(e)}
        )
        return
    tests = [(k, v) for k, v in ns.items() if k.startswith("test_") and callable(v)]
    emit({"phase": "collect", "total": len(tests)})
    hung = None
    for name, fn in tests:
        if hung:  # a hung answer would cost test_timeout_s per test; one is enough to know
            emit(
                {"test": name, "ok": False, "not_run": True, "error": f"not run: {hung} timed out"}
            )
            continue
        t0 = time.perf_counter()
        _alarm(spec["test_timeout_s"])
        try:
            fn()
            _alarm(0)
            emit({"test": name, "ok": True, "duration_s": round(time.perf_counter() - t0, 4)})
        except TestTimeout:
            _alarm(0)
            hung = name
            emit(
                {
                    "test": name,
                    "ok": False,
                    "timeout": True,
                    "error": f"timed out after {spec['test_timeout_s']} s",
                }
            )
        except BaseException as e:
            _alarm(0)
            sys.stderr.write(f"--- {name} failed\n{_exc_text(e, 6)}\n")
            emit(
                {
                    "test": name,
                    "ok": False,
                    "error": _exc_text(e, 3),
                    "duration_s": round(time.perf_counter() - t0, 4),
                }
            )


def _jsonable(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and v != v:
        return None
    return v


def run_sql(spec, query, emit):
    """Each case: fresh in-memory DB, trusted setup, then the answer's query read-only."""
    import sqlite3

    allowed = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
    allowed.add(getattr(sqlite3, "SQLITE_RECURSIVE", 33))

    def authorizer(action, *args):
        return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY

    cases = spec["cases"]
    emit({"phase": "collect", "total": len(cases)})
    for case in cases:
        t0 = time.perf_counter()
        db = sqlite3.connect(":memory:")
        try:
            db.executescript(case["setup"])
            db.set_authorizer(authorizer)
            _alarm(spec["test_timeout_s"])
            cur = db.execute(query)
            rows = cur.fetchmany(spec.get("max_rows", 10000) + 1)
            _alarm(0)
            cols = [d[0] for d in (cur.description or [])]
            emit(
                {
                    "case": case["name"],
                    "columns": cols,
                    "rows": [[_jsonable(v) for v in r] for r in rows],
                    "duration_s": round(time.perf_counter() - t0, 4),
                }
            )
        except TestTimeout:
            db.interrupt()
            emit(
                {
                    "case": case["name"],
                    "ok": False,
                    "timeout": True,
                    "error": f"timed out after {spec['test_timeout_s']} s",
                }
            )
        except BaseException as e:
            _alarm(0)
            sys.stderr.write(f"--- {case['name']}: {type(e).__name__}: {e}\n")
            emit({"case": case["name"], "ok": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            db.close()


def main():
    ctl = sys.argv[1]
    nonce = sys.stdin.readline().strip()
    with open(os.path.join(ctl, "spec.json"), encoding="utf-8") as f:
        spec = json.load(f)
    with open(os.path.join(ctl, "answer.txt"), encoding="utf-8") as f:
        answer = f.read()
    fd = os.open(os.path.join(ctl, "result.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    out = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    work = spec["work"]

    def emit(obj):
        out.write(nonce + json.dumps(obj) + "\n")
        out.flush()

    if spec["kind"] == "sql":
        import sqlite3  # noqa: F401  (before the uid drop and the hook)
    net, net_why = enter_netns() if spec.get("netns", True) else ("audit-hook", "disabled")
    limits = set_limits(spec)
    user = drop_privileges(spec)
    os.chdir(work)
    signal.signal(signal.SIGALRM, _on_alarm)
    blocked = []
    hooked = bool(spec.get("audit_hook", True))
    if hooked:
        install_audit_hook(work, ctl, blocked)
    elif net != "namespace":
        net = "none"
    emit(
        {
            "layers": {
                "network": net,
                "network_detail": net_why,
                "rlimits": limits,
                "user": user,
                "audit_hook": hooked,
                "python": sys.version.split()[0],
            }
        }
    )
    try:
        if spec["kind"] == "python":
            run_python(spec, answer, work, emit)
        else:
            run_sql(spec, answer, emit)
    finally:
        emit({"done": True, "blocked": blocked[:20]})
        out.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # answer threads must not keep the process alive


if __name__ == "__main__":
    main()
