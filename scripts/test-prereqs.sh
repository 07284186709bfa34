#!/bin/sh
# The services the test suite starts for itself, from Debian's packages: PostgreSQL (a
# throwaway cluster), Dovecot (IMAP replies and bounces) and Chromium (the HTML report,
# screenshotted headless). `make test` and `.ci/run` both run this script. As root it
# installs what is missing with apt; otherwise it names the one command to run, and fails.
set -eu
missing=""
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
    || missing="$missing postgresql"
command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || missing="$missing dovecot-imapd"
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "The tests need Debian packages that are missing; install them once with:" >&2
    echo "  sudo apt-get install -y$missing" >&2
    exit 1
fi
echo "installing the test services' Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq $missing >/dev/null
