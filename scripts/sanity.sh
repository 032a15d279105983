#!/usr/bin/env bash
# ansible-test sanity --test validate-modules over the custom modules (library/*.py and
# roles/*/library/*.py), offline, on a throwaway collection built in a temp dir. The repository layout stays
# as it is: only the copies are rewritten (ansible.module_utils.dedup_* imports -> the collection's
# module_utils, doc fragment dedup_pg -> dedup.rollout.dedup_pg).
#
# Ignored, for every module and nothing else: the licence/metadata rules that only make sense for a
# published collection (listed in IGNORED_RULES below). A module that needs one more ignore says so in its
# own file with a line "# sanity-ignore: validate-modules:<rule> <reason>"; the script copies it into the
# ignore file, reason included.
#
# Usage: scripts/sanity.sh [--keep]   (--keep leaves the temp dir and prints its path)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=${VENV_BIN:-$repo/.venv/bin}
py=$("$bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
core=$("$bin/python" -c 'from ansible.release import __version__ as v; print(".".join(v.split(".")[:2]))')

# Rules that concern a published collection's licensing/metadata only.
IGNORED_RULES=(
  missing-gplv3-license       # no GPLv3 header: the project is not a published collection
)

work=$(mktemp -d "${TMPDIR:-/tmp}/dedup-sanity.XXXXXX")
keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
cleanup() { if [ $keep -eq 0 ]; then rm -rf "$work"; else echo "sanity: kept $work" >&2; fi; }
trap cleanup EXIT

coll=$work/ansible_collections/dedup/rollout
mkdir -p "$coll/plugins/modules" "$coll/plugins/module_utils" "$coll/plugins/doc_fragments" "$coll/tests/sanity"
cp library/*.py roles/*/library/*.py "$coll/plugins/modules/"
cp module_utils/*.py "$coll/plugins/module_utils/"
cp plugins/doc_fragments/*.py "$coll/plugins/doc_fragments/"
sed -i -E \
  -e 's/\bansible\.module_utils\.(dedup_[a-z_]+)/ansible_collections.dedup.rollout.plugins.module_utils.\1/g' \
  -e '/^extends_documentation_fragment:/ s/([[ ,])dedup_pg\b/\1dedup.rollout.dedup_pg/g' \
  -e 's/^( *- *)dedup_pg *$/\1dedup.rollout.dedup_pg/' \
  "$coll"/plugins/modules/*.py "$coll"/plugins/module_utils/*.py
# Author rule aside: a published collection's author line needs a GitHub handle ("Name (@handle)"); ours
# names the project. The check reports it as invalid-documentation, which must stay on for everything else,
# so the copies say "(!UNKNOWN)", the schema's own marker for an author without a handle.
sed -i -E 's/^author: *(dedup-rollout) *$/author: \1 (!UNKNOWN)/' "$coll"/plugins/modules/*.py
cat >"$coll/galaxy.yml" <<'EOF'
namespace: dedup
name: rollout
version: 1.0.0
readme: README.md
authors: [dedup-rollout]
EOF
echo "throwaway collection for validate-modules (scripts/sanity.sh)" >"$coll/README.md"

ignore=$coll/tests/sanity/ignore-$core.txt
: >"$ignore"
for f in "$coll"/plugins/modules/*.py; do
  rel=plugins/modules/$(basename "$f")
  for rule in "${IGNORED_RULES[@]}"; do
    echo "$rel validate-modules:$rule" >>"$ignore"
  done
  # Per-file ignores declared (with their reason) in the module itself.
  sed -n -E 's/^[[:space:]]*# sanity-ignore: (validate-modules:[a-z0-9-]+) +(.+)$/\1 # \2/p' "$f" | while read -r line; do
    echo "$rel $line" >>"$ignore"
  done
done

(cd "$coll" && git init -q && git add -A && git -c user.name=sanity -c user.email=sanity@localhost commit -qm sanity)

# ansible-test runs validate-modules in a venv of its own, bootstrapped with a get-pip script it downloads
# from a host that is not a package registry (no network here). The script it would download is replaced by
# one that installs the pip bundled with Python (ensurepip, offline); the test's pinned requirements
# (voluptuous, antsibull-docs-parser, ...) then come through pip from the configured index, once: the venv
# is kept under .venv/ (ansible-test's HOME here, never ~/.ansible), so later runs need no network.
home=${DEDUP_SANITY_HOME:-$repo/.venv/ansible-test-home}
mkdir -p "$home/.ansible/test/cache"
pipv=$("$bin/python" -c 'import types; from ansible_test._internal.python_requirements import get_venv_packages as g
print(g(types.SimpleNamespace(version="'"$py"'"))["pip"])')
cat >"$home/.ansible/test/cache/get_pip_${pipv//./_}.py" <<'PY'
"""Stand-in for get-pip.py written by scripts/sanity.sh: the pip bundled with this Python, offline."""
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
PY

cd "$coll"
unset ANSIBLE_CONFIG
export HOME=$home
rc=0
"$bin/ansible-test" sanity --test validate-modules --python "$py" --local --color no "$@" >"$work/out.txt" 2>&1 || rc=$?
grep -v -E '^(Running sanity test|$)' "$work/out.txt" || true
if [ $rc -ne 0 ]; then
  echo "sanity: validate-modules FAILED (ignore file: tests/sanity/ignore-$core.txt)" >&2
  exit $rc
fi
echo "sanity: validate-modules passed on $(ls plugins/modules | wc -l) module(s)"
