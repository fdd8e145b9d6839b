#!/usr/bin/env bash
# Builds (once; cached) an aarch64 Debian Python 3.11 sysroot plus the project's aarch64 wheels, so that
# the qemu tests (tests/test_aarch64.py) can run dllp2p as it runs on a Raspberry Pi (64-bit OS):
#
#   qemu-aarch64-static -L $DIR/sysroot $DIR/sysroot/usr/bin/python3.11   with PYTHONPATH=$DIR/site:<repo>
#
# Layout of $DLLP2P_AARCH64_DIR (default ~/.cache/dllp2p-aarch64, outside the repository):
#   sysroot/   Debian arm64 .debs unpacked with dpkg -x (python3.11, its stdlib, libc, libffi, ...)
#   site/      aarch64 wheels installed with pip --target (numpy, llvmlite, trio, ...)
#   debs/      the downloaded .debs;  .stamp: hash of this script, written last (present = complete)
# Needs: apt with the arm64 architecture added (this script adds it when run as root), qemu-user-static
# (installed when run as root and missing), and a host Python with pip ($PYTHON, default python3).
# Idempotent: returns at once when .stamp matches this script and pyproject.toml; a change to either rebuilds.
set -euo pipefail
DIR="${DLLP2P_AARCH64_DIR:-$HOME/.cache/dllp2p-aarch64}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
# the stamp covers this script and pyproject.toml, whose runtime dependencies the sysroot gets
STAMP="$(cat "$HERE/aarch64-sysroot.sh" "$HERE/../pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$DIR/.stamp" && "$(cat "$DIR/.stamp")" == "$STAMP" ]]; then
    echo "aarch64 sysroot: cached in $DIR"; exit 0
fi
t0=$(date +%s)
as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"
    else echo "aarch64 sysroot: needs root or sudo to run: $*" >&2; return 1; fi
}
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    as_root dpkg --add-architecture arm64
    as_root apt-get update -qq
fi
if ! command -v qemu-aarch64-static >/dev/null; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static
fi
# Debian's python3.11 and the shared libraries its stdlib modules and the wheels load (ctypes: libffi;
# zlib, bz2, lzma, hashlib/ssl, expat, decimal; the C++ runtime for llvmlite and numpy's wheels).
DEBS=(libc6 libgcc-s1 libstdc++6 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
      libffi8 zlib1g libexpat1 libssl3 libbz2-1.0 liblzma5 libzstd1 libuuid1 libsqlite3-0
      libncursesw6 libtinfo6 libreadline8 libcrypt1 libdb5.3 libgdbm6 libnsl2 libtirpc3 libgssapi-krb5-2
      libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1)
rm -rf "$DIR/sysroot" "$DIR/site" "$DIR/debs" "$DIR/.stamp"
mkdir -p "$DIR/debs" "$DIR/sysroot" "$DIR/site"
if ! ( cd "$DIR/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}" ) 2>/dev/null; then
    as_root apt-get update -qq   # stale package lists: the versions they name are gone from the mirror
    ( cd "$DIR/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}" )
fi
for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" "$DIR/sysroot"; done
mapfile -t DEPS < <("$PYTHON" -c "import sys, tomllib; print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" "$HERE/../pyproject.toml")
# The runtime dependencies (pyproject.toml's, and gguf's own) and pytest + hypothesis, as aarch64 binary wheels for CPython 3.11
# on glibc <= 2.36 (Debian 12 / Raspberry Pi OS bookworm).
"$PYTHON" -m pip install -q --disable-pip-version-check --target "$DIR/site" --only-binary=:all: \
    --implementation cp --python-version 3.11 --abi cp311 \
    --platform manylinux_2_36_aarch64 --platform manylinux_2_34_aarch64 --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --platform linux_aarch64 \
    "${DEPS[@]}" \
    "pytest>=8" "hypothesis>=6"  # tests/aarch64_kernels.py reuses test_jit_kernels.py's helpers
echo "$STAMP" > "$DIR/.stamp"
echo "aarch64 sysroot: built in $DIR in $(( $(date +%s) - t0 )) s ($(du -sh "$DIR" | cut -f1))"
