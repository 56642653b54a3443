#!/usr/bin/env bash
# Debian packages the suites use beside PostgreSQL itself: PostGIS (the
# postgis ENGINE's test), PgBouncer (reliability, bench), wrk (bench) and
# Chromium (the example's /pool/ page, screenshot and DOM).
# Installs what is missing when we are root with apt; otherwise says what is
# missing (the tests that need it then say so too).
set -uo pipefail
major=$( (pg_config --version 2>/dev/null || echo "PostgreSQL 15") | sed -E 's/[^0-9]*([0-9]+).*/\1/')
want=()
[ -d "/usr/share/postgresql/$major/extension" ] && [ -f "/usr/share/postgresql/$major/extension/postgis.control" ] || want+=("postgresql-$major-postgis-3")
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || want+=(pgbouncer)
command -v wrk >/dev/null 2>&1 || want+=(wrk)
command -v chromium >/dev/null 2>&1 || want+=(chromium fonts-dejavu-core)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing Debian packages the suites need, with apt-get as root: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "${want[@]}" >/dev/null || {
    echo "!! could not install ${want[*]}"; exit 1; }
else
  echo "!! missing system packages (install them as root): ${want[*]}"
fi
