"""Guest side of bench/shares.py (stdlib only): one timed phase per call, one JSON line out.

The same file runs on the host for the host's own filesystem. Phases (``DIR`` is made if
missing; every time is the phase's own, on this machine's monotonic clock):

* ``create DIR N`` / ``stat DIR N`` / ``unlink DIR N``: N small files ``fNNNNN``
* ``readdir DIR``: list DIR (names only, as ``ls`` without ``-l`` does)
* ``write FILE MIB`` (then fsync) / ``read FILE``: sequential, 1 MiB at a time
* ``tree DIR FILES``: a source tree of FILES Python modules in nested directories, a
  wheel of 200 modules to install, and ``DIR/mutate.py`` (makes the other branch)
* ``run DIR CMD...``: run CMD in DIR (output discarded), ``rc`` beside the time
* ``watch content|size|gone FILE WANT``: look at FILE once, print ``ready``, then poll it
  until it holds WANT, is WANT bytes long (stat) or is gone (the coherence probe: the
  host changes FILE after ``ready``)
* ``put FILE TEXT``: write FILE, print ``written`` (the host polls for it)
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

CHUNK = 1 << 20
FILE_BODY = b"x" * 100
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
MODULE = '''"""Module {i} of the benchmark tree."""

TOKEN_{i} = "needle-{m}"


def value_{i}(x):
    """Return x scaled by {i}."""
    return x * {i} + len(TOKEN_{i})
'''
MUTATE = '''import os, sys
root = sys.argv[1]
names = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "src")) for f in fs)
for i, path in enumerate(names):
    if i % 10 == 0:
        with open(path, "a") as fh:
            fh.write("# changed on the other branch\\n")
    elif i % 25 == 1:
        os.unlink(path)
for i in range(len(names) // 25):
    with open(os.path.join(root, "src", f"added_{i}.py"), "w") as fh:
        fh.write(f"ADDED = {i}\\n")
'''
#: pip installs a wheel with no build backend (the guest's venv has setuptools but no
#: ``wheel``, and there is no index), so the package is a wheel made here.
WHEEL_NAME = "benchpkg-1.0-py3-none-any.whl"
WHEEL_MODULES = 200


def _names(n):
    return [f"f{i:05d}" for i in range(n)]


def create(d, n):
    os.makedirs(d, exist_ok=True)
    for name in _names(int(n)):
        fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, FILE_BODY)
        os.close(fd)


def stat(d, n):
    for name in _names(int(n)):
        os.stat(os.path.join(d, name))


def unlink(d, n):
    for name in _names(int(n)):
        os.unlink(os.path.join(d, name))


def readdir(d):
    return {"entries": len(os.listdir(d))}


def write(path, mib):
    block = os.urandom(CHUNK)
    with open(path, "wb") as fh:
        for _ in range(int(mib)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())


def read(path):
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK):
            total += len(chunk)
    return {"bytes": total}


def tree(d, files):
    files = int(files)
    per_dir = 50
    for i in range(files):
        sub = os.path.join(d, "src", f"pkg{i // (per_dir * 10):02d}", f"mod{i // per_dir % 10}")
        if i % per_dir == 0:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"m{i:05d}.py"), "w") as fh:
            fh.write(MODULE.format(i=i, m=i % 97))
    _wheel(os.path.join(d, WHEEL_NAME))
    with open(os.path.join(d, "mutate.py"), "w") as fh:
        fh.write(MUTATE)


def _wheel(path):
    members = {f"benchpkg/{f'part{i}' if i else '__init__'}.py": MODULE.format(i=i, m=i)
               for i in range(WHEEL_MODULES)}
    info = "benchpkg-1.0.dist-info"
    members[f"{info}/METADATA"] = "Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n"
    members[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: shares_guest\n"
                                "Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = [f"{name},sha256={_digest(body)},{len(body.encode())}"
              for name, body in members.items()]
    members[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, body)


def _digest(text):
    raw = hashlib.sha256(text.encode()).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def run(d, *command):
    proc = subprocess.run(command, cwd=d, env={**os.environ, **GIT_ENV},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    return {"rc": proc.returncode, "stderr": proc.stderr.decode(errors="replace")[-500:]}


def watch(how, path, want):
    """Poll ``path`` (after reading it once, so the guest has it cached) until it holds
    ``want`` (``content``), is ``want`` bytes long by stat (``size``) or is gone
    (``gone``)."""
    seen = {"content": _content, "size": _size, "gone": _gone}[how]
    seen(path, want)
    print("ready", flush=True)
    while not seen(path, want):
        time.sleep(0.005)


def _content(path, want):
    try:
        with open(path, "rb") as fh:
            return fh.read() == want.encode()
    except FileNotFoundError:
        return False


def _size(path, want):
    try:
        return os.stat(path).st_size == int(want)
    except FileNotFoundError:
        return False


def _gone(path, _want):
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def put(path, text):
    with open(path, "w") as fh:
        fh.write(text)
    print("written", flush=True)


PHASES = {"create": create, "stat": stat, "unlink": unlink, "readdir": readdir,
          "write": write, "read": read, "tree": tree, "run": run, "watch": watch, "put": put}


def main(argv):
    phase = PHASES[argv[0]]
    started = time.monotonic()
    extra = phase(*argv[1:]) or {}
    print(json.dumps({"seconds": time.monotonic() - started, **extra}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
