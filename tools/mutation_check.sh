#!/usr/bin/env bash
# Opt-in mutation testing of one module against one test file; never part of the default suite
# or CI. mutmut changes MODULE one small way at a time (a comparison, a constant, an argument)
# and runs the tests of TEST_FILE that reach the changed function; a mutant that survives is
# a change those tests let through (docs/tests.md, "Pin the boundary").
#
#   pip install mutmut==3.8.1
#   tools/mutation_check.sh training/precision.py tests/test_precision.py -k "not each_model"
#
# Arguments after TEST_FILE go to pytest (keep the selection to tests of a few seconds). It
# works on a copy of the working tree in a temporary folder (mutmut writes its mutants beside
# the code), forking each mutant's test run from a process that has imported the tests but
# run no TensorFlow op (mutmut's forkserver: a fork after TensorFlow has started its threads
# can hang). It prints the survivors and the folder; there `python -m mutmut show NAME` shows
# one mutant's change.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,15p' "$0" | cut -c3-
  exit 2
fi
module=$1
tests=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/mutation-check.XXXXXX")
(cd "$root" && git ls-files -co --exclude-standard -z |
   while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\0' "$file"; done |
   xargs -0 cp --parents -t "$work")
cd "$work"
{
  echo "[mutmut]"
  echo "only_mutate = $module"
  echo "source_paths ="
  for entry in *; do  # the code the tests import: top-level modules and packages
    if [[ $entry == *.py ]] || [ -f "$entry/__init__.py" ]; then echo "    $entry"; fi
  done
  echo "also_copy ="
  for entry in * .[!.]*; do
    if [ -e "$entry" ] && [[ $entry != *.py ]] && [ ! -f "$entry/__init__.py" ]; then
      echo "    $entry"
    fi
  done
  echo "pytest_add_cli_args_test_selection ="
  echo "    $tests"
  for arg in "$@"; do echo "    $arg"; done
  echo "process_isolation = forkserver"
} > setup.cfg
python -m mutmut run --max-children "${MUTMUT_CHILDREN:-1}"
python -m mutmut results
echo "mutants and results in $work"
