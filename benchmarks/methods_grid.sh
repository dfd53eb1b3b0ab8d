#!/usr/bin/env bash
# Algorithm 1 beside DC, DM and KIP (issue 18): digits, mnist5k and fashion-mnist with the MLP,
# 1 and 10 images per class, every set under the field protocol (bptt also under its own).
# Writes results/methods/{cells/,table.json,table.md,table.png}; a killed run continues.
# About 30-40 minutes on 2 shared cores with --jobs 2 (fashion-mnist needs the Debian package
# dataset-fashion-mnist or `ddref download fashion-mnist`).
set -euo pipefail
cd "$(dirname "$0")/.."
ddref --threads 1 table --grid methods --jobs "${JOBS:-2}"
