#!/usr/bin/env bash
# The Debian packages the test suite uses beyond Python: PostgreSQL (the stack's postgres backend,
# tests/stack/test_postgres.py), Chromium (the Prefect UI test, tests/flows/test_ui.py) and WordNet
# (the demo data's derivation, tests/stages/test_validate.py). `make test` runs this first: it installs
# what is missing when it can (root, or passwordless sudo), and otherwise stops at once with the command.
set -euo pipefail
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
[[ -f /usr/share/wordnet/index.noun ]] || missing+=(wordnet-base)
((${#missing[@]})) || exit 0

if ! command -v apt-get >/dev/null; then
    echo "make test needs these Debian packages (or your system's equivalents): ${missing[*]}" >&2
    exit 1
fi
if [[ $(id -u) -eq 0 ]]; then
    sudo=()
elif sudo -n true 2>/dev/null; then
    sudo=(sudo)
else
    echo "make test needs: ${missing[*]}. Install them once with:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing the test suite's system packages: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
