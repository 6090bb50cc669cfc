#!/usr/bin/env bash
# klcrypt's main job on a demo volume, start to finish (as root):
#   set up everything (scripts/setup.sh), format a LUKS2 image, open it with the
#   best Key Locker platform there is, put ext4 on it, mount it through fstab's
#   helper (mount -t klcrypt), write and read files, show status, go through a
#   sleep cycle that the keys survive and one that locks the volume, unlock it,
#   and tear everything down with a plain umount.  Leaves nothing mounted.
# Works without a terminal (CI=true, no stdin).  KLCRYPT_DEMO_NO_SETUP=1 skips setup.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root (FUSE mounts, loop devices)" >&2
    exit 1
fi
if [ -z "${KLCRYPT_DEMO_NO_SETUP:-}" ]; then
    echo "== setting up (apt packages, .venv, the C build): scripts/setup.sh"
    SETUP_LOG=$(mktemp /tmp/klcrypt-setup.XXXXXX)
    if ! bash scripts/setup.sh >"$SETUP_LOG" 2>&1; then
        cat "$SETUP_LOG" >&2
        echo "demo: scripts/setup.sh failed (log above)" >&2
        exit 1
    fi
    rm -f "$SETUP_LOG"
fi
export PATH="$PWD/.venv/bin:$PATH"
PY="$PWD/.venv/bin/python"

WORK=$(mktemp -d /tmp/klcrypt-demo.XXXXXX)
IMG=$WORK/vault.img
KEY=$WORK/vault.key
DIR=$WORK/vault
NAME=demo$$
mkdir "$DIR"

cleanup() {
    # whatever happened above, leave nothing mounted, mapped or running
    if findmnt -rn "$DIR" >/dev/null 2>&1; then umount "$DIR" 2>/dev/null || umount -l "$DIR"; fi
    for n in "$NAME"; do
        klcrypt status "$n" >/dev/null 2>&1 && klcrypt close --force "$n" >/dev/null 2>&1 || true
    done
    for _ in $(seq 50); do klcrypt status "$NAME" >/dev/null 2>&1 || break; sleep 0.1; done
    rm -rf "$WORK"
}
trap cleanup EXIT

N=0
step() { N=$((N + 1)); printf '\n== %s. %s\n' "$N" "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
has_verb() { klcrypt "$1" --help >/dev/null 2>&1; }
# wait until the mapping's daemon has gone after an umount (it notices by itself)
wait_closed() {
    for _ in $(seq 100); do klcrypt status "$1" >/dev/null 2>&1 || return 0; sleep 0.1; done
    echo "demo: mapping $1 still open after umount" >&2; return 1
}

printf '\n== Key Locker on this machine\n'
KL=$("$PY" - <<'EOF'
from klcrypt.keylocker import hardware_unavailable_reason
why = hardware_unavailable_reason()
print("hardware" if why is None else "emulated")
import sys; print(why or "Key Locker hardware is usable", file=sys.stderr)
EOF
)
if [ "$KL" = emulated ]; then
    echo "No usable Key Locker hardware, so this demo uses klcrypt's EMULATED Key Locker."
    echo "It runs the same handle code paths but PROTECTS NOTHING: its wrapping key"
    echo "(IWKEY) lives in the daemon's memory."
fi

step "Format a 64 MiB LUKS2 image (aes-xts-plain64; cryptsetup can open it too)"
truncate -s 64M "$IMG"
printf 'correct horse battery staple' > "$KEY"
chmod 600 "$KEY"
run klcrypt format -q --key-file "$KEY" --pbkdf argon2id --iter-time 200 --pbkdf-memory 65536 "$IMG"
echo "\$ klcrypt dump $IMG   (excerpt)"
klcrypt dump "$IMG" | grep -E '^(Version|UUID):|cipher:|sector:|PBKDF:' | awk '!seen[$0]++'

step "Open it and put ext4 on the plaintext file /run/klcrypt/NAME"
run klcrypt open "$IMG" "$NAME" --key-file "$KEY" --keylocker "$KL"
FILE=$(klcrypt status "$NAME" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["file"])')
run mkfs.ext4 -q -b 4096 -L vault "$FILE"
run klcrypt close "$NAME"

RESTORE=""
# sleep cycles are simulated on the emulated platform only (on hardware the kernel
# owns the IWKEY and klcrypt only checks its mode)
SLEEP_DEMO=""
if [ "$KL" = emulated ] && has_verb simulate-sleep && has_verb unlock; then SLEEP_DEMO=1; fi
if [ -n "$SLEEP_DEMO" ]; then RESTORE=",restore-mode=native_kernel_key_backup"; fi
step "Mount it the fstab way: mount -t klcrypt (opens, maps, mounts in one step)"
run mount -t klcrypt "$IMG" "$DIR" -o "keyfile=$KEY,fstype=ext4,name=$NAME,keylocker=$KL$RESTORE,noatime"
findmnt -n -o TARGET,SOURCE,FSTYPE,OPTIONS "$DIR"

step "Write and read files"
echo "a secret note, written $(date -u +%FT%TZ)" > "$DIR/note.txt"
head -c 8M /dev/urandom > "$DIR/random.bin"
SUM=$(sha256sum < "$DIR/random.bin")
sync
run cat "$DIR/note.txt"
echo "8 MiB random file: sha256 ${SUM%% *}"
if grep -q "a secret note" "$IMG"; then
    echo "demo: the plaintext is visible in the image!" >&2; exit 1
fi
echo "the image holds only ciphertext: 'a secret note' does not occur in $IMG"

step "Status"
run klcrypt status "$NAME"

if [ -n "$SLEEP_DEMO" ]; then
    step "Suspend to RAM (S3) in restore mode native_kernel_key_backup: the keys survive"
    run klcrypt simulate-sleep "$NAME" --state s3
    echo 3 > /proc/sys/vm/drop_caches
    [ "$(sha256sum < "$DIR/random.bin")" = "$SUM" ] && echo "read back after resume: sha256 matches"

    step "Remount in native_kernel_key_norestore: S3 locks the volume"
    run umount "$DIR"
    wait_closed "$NAME"
    run mount -t klcrypt "$IMG" "$DIR" \
        -o "keyfile=$KEY,name=$NAME,keylocker=$KL,restore-mode=native_kernel_key_norestore"
    run klcrypt simulate-sleep "$NAME" --state s3
    klcrypt status "$NAME" | grep -E ' is |restore'
    # a reader now waits for the key (direct I/O: no page cache to answer from)
    dd if="$DIR/random.bin" of=/dev/null bs=1M iflag=direct status=none &
    READER=$!
    sleep 1
    if kill -0 "$READER" 2>/dev/null; then echo "a reader of random.bin is waiting (pid $READER)"; fi
    run klcrypt unlock "$NAME" --key-file "$KEY"
    wait "$READER" && echo "the waiting read completed after unlock"
    [ "$(sha256sum < "$DIR/random.bin")" = "$SUM" ] && echo "sha256 still matches"
fi

step "Tear down with a plain umount (filesystem, loop device, FUSE file, keys)"
run umount "$DIR"
wait_closed "$NAME"
echo "mounted on $DIR:   $(findmnt -rn "$DIR" >/dev/null && echo yes || echo nothing)"
echo "loop devices:      $(losetup -l -n -O BACK-FILE | grep -c "$FILE" || true)"
echo "klcrypt mapping:   $(klcrypt status "$NAME" >/dev/null 2>&1 && echo still open || echo closed)"
printf '\ndemo: done.\n'
