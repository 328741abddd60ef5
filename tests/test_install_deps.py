"""tools/install-deps runs the right commands, as root and through sudo.

The script runs with stub apt-get, dpkg-query, sudo and id first on PATH.
Each stub appends its command line to a log and installs nothing; sudo
then runs the rest of its line, as the real one would.  The tests compare
the log with the exact commands a user's machine would see.

    /usr/bin/python3 -m pytest tests/test_install_deps.py
"""

import os
import subprocess

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "install-deps")

STUB = """#!/bin/sh
# a stub: logs "<name> <args>" and the environment apt-get cares about
{
    printf '%s' "$(basename "$0")"
    for a in "$@"; do printf ' %s' "$a"; done
    if [ "$(basename "$0")" = apt-get ]; then
        printf ' [DEBIAN_FRONTEND=%s]' "${DEBIAN_FRONTEND:-}"
    fi
    echo
} >> "$STUB_LOG"
"""

ID = """#!/bin/sh
[ "$1" = -u ] && echo "$STUB_UID" && exit 0
exit 1
"""

SUDO = """#!/bin/sh
printf 'sudo' >> "$STUB_LOG"
for a in "$@"; do printf ' %s' "$a" >> "$STUB_LOG"; done
echo >> "$STUB_LOG"
exec "$@"
"""

# reports the packages of $STUB_INSTALLED as installed, no other
DPKG_QUERY = """#!/bin/sh
pkg=$(eval echo "\\${$#}")
for p in $STUB_INSTALLED; do
    if [ "$p" = "$pkg" ]; then
        printf 'install ok installed'
        exit 0
    fi
done
exit 1
"""


def packages(mode):
    """The package list the script names for a mode, read from the script
    itself so that adding a package does not break the test."""
    out = subprocess.run(
        ["sh", "-c", 'eval "$(sed -n "/^base=/,/^bench=/p" "$0")"; '
                     'echo $base; echo $test', SCRIPT],
        check=True, capture_output=True, text=True).stdout.split("\n")
    base, test = out[0].split(), out[1].split()
    return base if mode == "run" else base + test


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    for name, text in (("apt-get", STUB), ("id", ID), ("sudo", SUDO),
                       ("dpkg-query", DPKG_QUERY)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)

    # the nginx source is already downloaded: no deb-src, no apt-get source
    src = tmp_path / "src"
    src.mkdir()
    (src / "nginx_1.22.1.orig.tar.gz").write_bytes(b"")

    return tmp_path


def run(stubs, mode, uid, installed=()):
    log = stubs / "log"
    if log.exists():
        log.unlink()
    log.touch()

    env = dict(os.environ)
    env.update(PATH="%s:/usr/bin:/bin" % (stubs / "bin"),
               STUB_LOG=str(log), STUB_UID=str(uid),
               STUB_INSTALLED=" ".join(installed))
    env.pop("DEBIAN_FRONTEND", None)

    args = [SCRIPT, mode] + ([str(stubs / "src")] if mode == "test" else [])
    p = subprocess.run(args, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr

    return log.read_text().splitlines(), p.stdout


@pytest.mark.parametrize("mode", ["run", "test"])
def test_as_root(stubs, mode):
    want = packages(mode)
    have = want[:2]
    missing = want[2:]

    log, out = run(stubs, mode, 0, installed=have)

    assert log == [
        "apt-get update -q [DEBIAN_FRONTEND=]",
        "apt-get install -y -q --no-install-recommends %s "
        "[DEBIAN_FRONTEND=noninteractive]" % " ".join(missing),
    ]
    assert "installing: %s" % " ".join(missing) in out


@pytest.mark.parametrize("mode", ["run", "test"])
def test_through_sudo(stubs, mode):
    want = packages(mode)
    missing = want[1:]

    log, out = run(stubs, mode, 1000, installed=want[:1])

    assert log == [
        "sudo apt-get update -q",
        "apt-get update -q [DEBIAN_FRONTEND=]",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        "--no-install-recommends %s" % " ".join(missing),
        "apt-get install -y -q --no-install-recommends %s "
        "[DEBIAN_FRONTEND=noninteractive]" % " ".join(missing),
    ]


@pytest.mark.parametrize("uid", [0, 1000])
def test_nothing_missing(stubs, uid):
    log, out = run(stubs, "test", uid, installed=packages("test"))

    assert log == []
    assert "installing" not in out
