#!/usr/bin/env bash
# Install what dedup-rollout needs on a fresh Debian/Ubuntu machine:
# OS packages (PostgreSQL server + client, cron) when run as root, then the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ] || [ ! -x "$pg_bin/pg_ctl" ]; then
  need_pkgs+=(postgresql postgresql-contrib)
fi
command -v pg_dump >/dev/null 2>&1 || need_pkgs+=(postgresql-client)
command -v crontab >/dev/null 2>&1 || need_pkgs+=(cron)
command -v pgbench >/dev/null 2>&1 || need_pkgs+=(postgresql-contrib)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
# The lab's ETL runs as its own OS user with the system python3 (a root venv is not readable by it).
/usr/bin/python3 -c 'import psycopg2' >/dev/null 2>&1 || need_pkgs+=(python3-psycopg2)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "bootstrap: installing OS packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "bootstrap: missing OS packages: ${need_pkgs[*]}" >&2
    echo "bootstrap: run 'sudo apt-get install ${need_pkgs[*]}' (or run make as root) and retry." >&2
    exit 1
  fi
fi

# pg_repack (online mode gives disk space back with it when a server has the extension; tests exercise it):
# the client/extension package of the installed server's major version, when the archive has one.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$pg_bin" ] && [ ! -x "$pg_bin/pg_repack" ] && [ "$(id -u)" -eq 0 ]; then
  pg_major=$(basename "$(dirname "$pg_bin")")
  if apt-cache show "postgresql-$pg_major-repack" >/dev/null 2>&1; then
    echo "bootstrap: installing postgresql-$pg_major-repack"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "postgresql-$pg_major-repack" \
      >/dev/null || echo "bootstrap: postgresql-$pg_major-repack could not be installed; its tests will skip" >&2
  fi
fi

# The system cluster that Debian's postgresql package starts is never used by the project.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
echo "bootstrap: ready ($(.venv/bin/ansible --version 2>/dev/null | sed -n 1p))"
