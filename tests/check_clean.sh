#!/usr/bin/env bash
# After `make test`: the suite must have written nothing into the checkout (ignored files
# included), apart from the virtual environment and the install's own egg-info.
set -euo pipefail
cd "$(dirname "$0")/.."
stray=$(git status --porcelain --ignored --untracked-files=normal | grep -E '^(!!|\?\?) ' \
    | grep -v -E '^(!!|\?\?) (\.venv/|sdwork\.egg-info/)' || true)
if [ -n "$stray" ]; then
    echo "make test wrote into the checkout:" >&2
    echo "$stray" >&2
    exit 1
fi
echo "checkout clean after the tests"
