#!/usr/bin/env bash
# Set up a fresh machine: pinned dependencies, then this package with its C++ CPU ops built by CMake.
# --no-build-isolation: the C++ build must see the torch installed here, not download another one.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-build-isolation -e .
