#!/bin/sh
# Prerequisites of `make bench`: Postfix's smtp-sink (a fast C SMTP sink) from Debian's
# postfix package, installed without configuring a mail system ("No configuration"), so
# nothing listens on port 25 afterwards; and wrk (a C HTTP load generator, Debian's wrk
# package) for the tracking service row; PostgreSQL's server binaries for the PostgreSQL
# scoring row (a throwaway cluster, as in the tests). Needs root (CI runs as root).
set -eu
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1
then
    echo "PostgreSQL missing: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q postgresql
fi
if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk missing: installing Debian's wrk package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q wrk
fi
if command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ]; then
    exit 0
fi
echo "smtp-sink missing: installing Debian's postfix package (No configuration)" >&2
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q postfix
