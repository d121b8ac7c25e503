#!/bin/sh
# Installs the Debian 12 packages that duogen builds, tests and demos with, when missing:
# the build, Redis, the tests' Python, man and groff for the manual pages, tmux and headless
# Chromium (with numpy and PIL to read its screenshots) for duogenctl top and result --html,
# and the toolchains of the example producers (examples/producers/: Ruby, Go; the Go ones
# are Debian's source packages under /usr/share/gocode, so no Go module is downloaded).
# Runs as root (or through sudo when it is there). Safe to run again.
set -e
PKGS="build-essential pkg-config clang
libhiredis-dev redis-server redis-tools libssl-dev openssl
protobuf-c-compiler libprotobuf-c-dev protobuf-compiler
libpng-dev zlib1g-dev libturbojpeg0-dev libjpeg62-turbo-dev
libsystemd-dev systemd
libopenblas-openmp-dev libpcre2-dev libutf8proc-dev libjansson-dev libcmark-dev
python3 python3-redis python3-protobuf python3-pytest python3-venv
man-db groff-base tmux chromium python3-numpy python3-pil
ruby ruby-redis ruby-google-protobuf
golang-go protoc-gen-go golang-github-gomodule-redigo-dev golang-google-protobuf-dev
prometheus"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && { echo "deps: all packages present"; exit 0; }

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "deps: installing$missing"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
