#!/bin/sh
# The test phase runs this inside the built image.
set -eu
out=$(/app/app.sh tester)
case "$out" in
  *", tester!") echo "ok: $out (mode: ${TEST_MODE:-unset})" ;;
  *) echo "unexpected output: $out" >&2; exit 1 ;;
esac
