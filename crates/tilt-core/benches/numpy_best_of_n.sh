#!/usr/bin/env bash
# Create (once) a virtual environment with NumPy under the target directory and run the
# NumPy implementation of best-of-n on the data files the Rust bench wrote.
#   numpy_best_of_n.sh TARGET_DIR DATA_DIR N REPEATS
set -euo pipefail
target_dir=$1; shift
venv="$target_dir/numpy-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import numpy" 2>/dev/null; then
    echo "creating $venv and installing numpy (once)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check numpy >&2
fi
here=$(cd "$(dirname "$0")" && pwd)
exec "$venv/bin/python" "$here/numpy_best_of_n.py" "$@"
