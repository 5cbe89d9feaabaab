"""The sandbox contains what a model answer might do: read secrets, write outside, hang, hog, phone home.

Every containment claim is checked twice where the OS allows: with the audit
hook (the portable layer, the only one on macOS), and with the hook off to see
the kernel layers alone (network namespace, uid drop, rlimits). Kernel-layer
tests skip, with the reason, where the layer is not available.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_distill.evaluate.sandbox import SandboxLimits, child_env, run_in_sandbox, scrub_env

FAST = SandboxLimits(timeout_s=10, test_timeout_s=3)
KERNEL_ONLY = SandboxLimits(timeout_s=10, test_timeout_s=3, audit_hook=False)
SECRET = "sk-ant-api03-SANDBOX-secret-value-0123456789"


def run_py(
    answer: str, tests: str = "def test_noop():\n    pass\n", limits: SandboxLimits = FAST, **kw
):
    return run_in_sandbox("python", answer, {"code": tests}, limits, **kw)


def outcome(res) -> tuple[str, str]:
    """(load outcome, error text) of a run whose answer does its thing at import time."""
    load = next(r for r in res.records if r.get("phase") == "load")
    return ("ok" if load["ok"] else "error"), load.get("error", "")


def kernel_layers() -> dict:
    return run_py("").containment


def needs(layer: str):
    layers = kernel_layers()
    if layer == "netns" and layers.get("network") != "namespace":
        pytest.skip(f"no network namespace here: {layers.get('network_detail')}")
    if layer == "uid" and not (layers.get("user") or {}).get("dropped"):
        pytest.skip(f"uid not dropped here: {layers.get('user')}")


def test_scrub_env_drops_secret_looking_names() -> None:
    env = {
        "ANTHROPIC_API_KEY": "x",
        "HF_TOKEN": "x",
        "DB_PASSWORD": "x",
        "AWS_REGION": "x",
        "GITHUB_SHA": "x",
        "my_secret": "x",
        "SESSION_ID": "x",
        "LANG": "C",
        "COLUMNS": "80",
    }
    assert scrub_env(env) == {"LANG": "C", "COLUMNS": "80"}
    child = child_env(Path("/w"), {"ANTHROPIC_API_KEY": "x", "FOO": "bar"})
    assert child["FOO"] == "bar" and "ANTHROPIC_API_KEY" not in child and child["HOME"] == "/w"


def test_reports_every_layer_it_applied() -> None:
    layers = kernel_layers()
    assert layers["audit_hook"] is True
    assert layers["rlimits"]["RLIMIT_NOFILE"] == FAST.nofile
    assert layers["network"] in ("namespace", "audit-hook")
    if sys.platform.startswith("linux"):
        assert layers["rlimits"]["RLIMIT_AS"] == FAST.memory_mb * 2**20


def test_answer_cannot_see_the_api_key_in_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    answer = "import os\nprint(dict(os.environ))\nKEY = os.environ.get('ANTHROPIC_API_KEY')\n"
    tests = (
        "def test_no_key():\n    import os\n    assert KEY is None\n"
        "    assert not any('sk-ant' in v for v in os.environ.values())\n"
        "    assert os.environ['HOME'] == os.getcwd()\n"
    )
    res = run_py(answer, tests, extra_env={"ANTHROPIC_API_KEY": SECRET, "HARMLESS": "1"})
    assert [r.get("ok") for r in res.records if "test" in r] == [True]
    assert SECRET not in res.stdout_tail and "'HARMLESS': '1'" in res.stdout_tail


PARENT_SCRIPT = r"""
import json, sys
from mlx_distill.evaluate.sandbox import SandboxLimits, run_in_sandbox
answer = '''
import os
try:
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        print("READ", f.read().decode("latin-1"))
except OSError as e:
    print("DENIED", type(e).__name__, e)
'''
out = {}
for hook in (True, False):
    r = run_in_sandbox("python", answer, {"code": "def test_x():\n    pass\n"},
                       SandboxLimits(timeout_s=10, audit_hook=hook))
    out[str(hook)] = {"stdout": r.stdout_tail, "stderr": r.stderr_tail, "records": r.records,
                      "layers": r.containment}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_answer_cannot_read_the_key_from_the_parents_proc_environ(tmp_path: Path) -> None:
    """The compare process starts with the key in its environment, as a user's shell gives it."""
    env = {**os.environ, "ANTHROPIC_API_KEY": SECRET}
    proc = subprocess.run(
        [sys.executable, "-c", PARENT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert SECRET not in proc.stdout
    hooked = out["True"]
    assert "DENIED PermissionError sandbox: open blocked" in hooked["stdout"]
    kernel = out["False"]
    if not (kernel["layers"].get("user") or {}).get("dropped"):
        pytest.skip(f"kernel layer not available here: {kernel['layers'].get('user')}")
    assert "DENIED PermissionError [Errno 13]" in kernel["stdout"]


def test_writes_outside_the_work_dir_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "escaped.txt"
    answer = (
        "import os\nresults = {}\n"
        f"for target in [{str(outside)!r}, '../escaped.txt', '/tmp/mlxd-escaped-{os.getpid()}.txt']:\n"
        "    try:\n        open(target, 'w').write('x')\n        results[target] = 'WROTE'\n"
        "    except OSError as e:\n        results[target] = type(e).__name__\n"
        f"os.symlink({str(outside)!r}, 'link')\n"
        "try:\n    open('link', 'w').write('x')\n    results['link'] = 'WROTE'\n"
        "except OSError as e:\n    results['link'] = type(e).__name__\n"
        "open('inside.txt', 'w').write('fine')\nresults['inside'] = open('inside.txt').read()\n"
        "print(results)\n"
    )
    res = run_py(answer)
    assert outcome(res)[0] == "ok", res.stderr_tail
    assert "WROTE" not in res.stdout_tail and "'inside': 'fine'" in res.stdout_tail
    assert not outside.exists() and not Path(f"/tmp/mlxd-escaped-{os.getpid()}.txt").exists()
    assert any("outside the work dir" in b for b in res.blocked)


def test_kernel_alone_refuses_writes_to_the_users_files(tmp_path: Path) -> None:
    needs("uid")
    outside = tmp_path / "escaped.txt"
    res = run_py(f"open({str(outside)!r}, 'w').write('x')\n", limits=KERNEL_ONLY)
    state, err = outcome(res)
    assert state == "error" and "Permission denied" in err
    assert not outside.exists()


@pytest.mark.slow
def test_python_infinite_loop_times_out_per_test_and_the_rest_still_report() -> None:
    tests = (
        "def test_fine():\n    assert f() == 1\n"
        "def test_hangs():\n    while True:\n        pass\n"
        "def test_after():\n    pass\n"
    )
    t0 = time.perf_counter()
    res = run_py("def f():\n    return 1\n", tests, SandboxLimits(timeout_s=20, test_timeout_s=1))
    assert time.perf_counter() - t0 < 10
    by = {r["test"]: r for r in res.records if "test" in r}
    assert (
        by["test_fine"]["ok"]
        and by["test_hangs"].get("timeout")
        and by["test_after"].get("not_run")
    )
    assert res.finished


@pytest.mark.slow
def test_loop_that_ignores_the_alarm_is_killed_with_its_whole_process_group() -> None:
    """C-level busy work never returns to Python, so only the wall limit stops it; a
    forked grandchild (possible with the audit hook off) dies with the group."""
    answer = (
        "import os, signal, sys\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "pid = os.fork()\nif pid == 0:\n    import time\n    while True:\n        time.sleep(1)\n"
        "print('GRANDCHILD', pid, flush=True)\nsum(range(10**14))\n"
    )
    t0 = time.perf_counter()
    res = run_py(answer, limits=SandboxLimits(timeout_s=2, test_timeout_s=1, audit_hook=False))
    assert res.timed_out and not res.finished
    assert time.perf_counter() - t0 < 8
    pid = int(res.stdout_tail.split("GRANDCHILD")[1].split()[0])
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"grandchild {pid} survived in state {state}"


def test_allocating_50_gb_is_a_memory_error_not_a_dead_machine() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS is not enforced on macOS")
    t0 = time.perf_counter()
    res = run_py("data = bytearray(50 * 2**30)\n")
    state, err = outcome(res)
    assert state == "error" and "MemoryError" in err
    # Growing in 64 MB steps hits the cap too (256 MB here, so the page faults stay cheap).
    grow = run_py(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))\n",
        limits=SandboxLimits(timeout_s=10, test_timeout_s=5, memory_mb=256),
    )
    assert "MemoryError" in outcome(grow)[1]
    assert time.perf_counter() - t0 < 20


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    return srv


def _connect_answer(port: int) -> str:
    return (
        f"import socket\ns = socket.socket()\ns.settimeout(2)\n"
        f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
        "except OSError as e:\n    print('NO NETWORK', type(e).__name__, e)\n"
    )


def _accepted(srv: socket.socket) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except OSError:
        return False


def test_network_is_refused_by_the_audit_hook() -> None:
    srv = _listener()
    try:
        res = run_py(
            _connect_answer(srv.getsockname()[1])
            + "import socket\ntry:\n    socket.getaddrinfo('example.com', 80)\n"
            "except OSError as e:\n    print('NO DNS', e)\n"
        )
        assert "NO NETWORK PermissionError sandbox: socket.connect blocked" in res.stdout_tail
        assert "NO DNS sandbox: socket.getaddrinfo blocked" in res.stdout_tail
        assert not _accepted(srv)
    finally:
        srv.close()


def test_network_namespace_alone_cuts_even_the_hosts_loopback() -> None:
    needs("netns")
    srv = _listener()
    try:
        res = run_py(_connect_answer(srv.getsockname()[1]), limits=KERNEL_ONLY)
        assert "NO NETWORK" in res.stdout_tail and "CONNECTED" not in res.stdout_tail
        assert not _accepted(srv)
    finally:
        srv.close()


def test_process_creation_and_ctypes_are_refused() -> None:
    answer = (
        "import os, subprocess\nout = []\n"
        "for fn in (lambda: os.system('echo hi'), lambda: subprocess.run(['true']), os.fork,\n"
        "           lambda: __import__('ctypes').CDLL(None)):\n"
        "    try:\n        fn()\n        out.append('RAN')\n"
        "    except PermissionError as e:\n        out.append('blocked')\n"
        "print(out)\n"
    )
    res = run_py(answer)
    assert "['blocked', 'blocked', 'blocked', 'blocked']" in res.stdout_tail, (
        res.stdout_tail + res.stderr_tail
    )


def test_printed_fake_results_cannot_pass_for_real_ones() -> None:
    """Results carry a nonce the answer never sees; an answer that fakes and exits is an error."""
    answer = (
        'import os\nprint(\'{"test": "test_a", "ok": true}\')\nprint(\'{"done": true}\')\n'
        "os._exit(0)\n"
    )
    res = run_py(answer, "def test_a():\n    assert False\n")
    assert not res.finished and not any(r.get("test") for r in res.records)


def test_output_flood_is_cut_by_the_file_size_limit() -> None:
    """Python ignores SIGXFSZ, so the write fails with EFBIG at the limit instead of filling the disk."""
    res = run_py(
        "while True:\n    print('x' * 10000)\n", limits=SandboxLimits(timeout_s=10, fsize_mb=1)
    )
    state, err = outcome(res)
    assert state == "error" and "File too large" in err


NON_ROOT_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mlx_distill.evaluate.sandbox import SandboxLimits, run_in_sandbox
answer = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
          "try:\n    s.connect(('127.0.0.1', 9))\nexcept OSError as e:\n    print('NO NETWORK', e)\n")
r = run_in_sandbox("python", answer, {"code": "def test_x():\n    pass\n"},
                   SandboxLimits(timeout_s=10, audit_hook=False))
print(json.dumps({"layers": r.containment, "stdout": r.stdout_tail}))
"""


@pytest.mark.slow
def test_a_non_root_user_gets_a_network_namespace_through_a_user_namespace(tmp_path: Path) -> None:
    """The path most Linux users take: no root, so CLONE_NEWUSER|CLONE_NEWNET (where userns is on)."""
    setpriv, python = shutil.which("setpriv"), shutil.which("python3", path="/usr/bin:/bin")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and setpriv and python):
        pytest.skip("needs root, setpriv and a system python3 to act as an unprivileged user")
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [
            setpriv,
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            python,
            "-c",
            NON_ROOT_SCRIPT,
            root,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    if proc.returncode != 0:
        pytest.skip(f"the package cannot be imported as nobody here: {proc.stderr[-300:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    layers = out["layers"]
    assert layers["user"] == {"uid": 65534, "dropped": False, "why": "not root"}
    if layers["network"] != "namespace":
        pytest.skip(f"unprivileged user namespaces are off here: {layers['network_detail']}")
    assert layers["network_detail"] == "unshare(CLONE_NEWUSER|CLONE_NEWNET)"
    assert "NO NETWORK" in out["stdout"]
