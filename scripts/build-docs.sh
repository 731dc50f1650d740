#!/usr/bin/env bash
# Build the documentation site (docs/, Sphinx) into docs/_build/html, with
# warnings as errors: a broken link between pages, a docstring that does not
# parse or a name of quebert.__all__ missing from the API reference fails
# the build.
#
#     bash scripts/build-docs.sh        # then open docs/_build/html/index.html
#     bash scripts/build-docs.sh -n     # extra arguments go to sphinx-build
#
# Sets up .venv first if needed (scripts/bootstrap.sh, without starting
# RabbitMQ or Redis: the build needs neither); QUEBERT_SKIP_BOOTSTRAP=1 skips
# that, and QUEBERT_VENV=DIR uses another virtualenv's sphinx-build (one with
# quebert installed with the docs extra: pip install -e '.[docs,guillotina]').
# Every build starts from a fresh environment (-E), so that a warning is
# reported on every run, not only on the run that first read the page.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="${QUEBERT_VENV:-$root/.venv}"
if [ "${QUEBERT_SKIP_BOOTSTRAP:-}" != 1 ]; then
    QUEBERT_SKIP_SERVICES=1 QUEBERT_SKIP_BROWSER=1 bash scripts/bootstrap.sh
fi
if [ ! -x "$venv/bin/sphinx-build" ]; then
    echo "build-docs: $venv/bin/sphinx-build not found: install the docs extra" \
        "($venv/bin/pip install -e '.[docs,guillotina]', or run scripts/bootstrap.sh)" >&2
    exit 2
fi

out=docs/_build/html
echo "build-docs: $venv/bin/sphinx-build -W --keep-going -E -q -b html $* docs $out"
"$venv/bin/sphinx-build" -W --keep-going -E -q -b html "$@" docs "$out"
echo "build-docs: built $out/index.html"
