#!/usr/bin/env bash
# Set up everything klcrypt needs on a fresh Debian 12 machine (as root):
# system packages, a virtualenv in .venv, and the build (the C core via cffi).
# Idempotent: a second run only re-checks and rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    build-essential pkg-config python3-dev python3-venv
    fuse3 libfuse3-dev libssl-dev
    cryptsetup-bin fio e2fsprogs util-linux kmod
    gocryptfs securefs groff-base mandoc
    dbus-daemon
)

need=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -U pip setuptools wheel
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c "import klcrypt.xts as x; print('setup: engines available:', ', '.join(x.available_engines()))"
# mount(8) runs helpers from /sbin only: fstab type "klcrypt" -> /sbin/mount.klcrypt
ln -sfn "$PWD/.venv/bin/mount.klcrypt" /sbin/mount.klcrypt
# the man pages (a wheel install puts them in PREFIX/share/man; an editable one does not)
for page in man/*.[1-9]; do
    sect=${page##*.}
    mkdir -p "/usr/local/share/man/man$sect"
    ln -sfn "$PWD/$page" "/usr/local/share/man/man$sect/"
done
