#!/usr/bin/env bash
# Checks the Terraform code as `terraform fmt -check -recursive` would, and
# that every file parses, with HashiCorp's HCL libraries (npm packages
# @cdktf/hcl-tools and @cdktf/hcl2json, WebAssembly builds of hclwrite and
# the HCL parser; installed once under ~/.cache/cirrus-hcl). Terraform
# itself and its providers cannot be downloaded on the build machines, so
# `terraform validate` is not run here (see terraform/README.md).
#
#   scripts/terraform-check.sh [--fix] [DIR...]     (default: terraform/)
set -euo pipefail
cd "$(dirname "$0")/.."
HCL_HOME=${CIRRUS_HCL_HOME:-${HOME:?}/.cache/cirrus-hcl}
if [ ! -d "$HCL_HOME/node_modules/@cdktf/hcl-tools" ] || [ ! -d "$HCL_HOME/node_modules/@cdktf/hcl2json" ]; then
  mkdir -p "$HCL_HOME"
  npm install --silent --no-audit --no-fund --prefix "$HCL_HOME" \
    @cdktf/hcl-tools@0.21.0 @cdktf/hcl2json@0.21.0 >&2
fi
fix=()
dirs=()
for a in "$@"; do
  if [ "$a" = --fix ]; then fix=(--fix); else dirs+=("$a"); fi
done
[ ${#dirs[@]} -gt 0 ] || dirs=(terraform)
CIRRUS_HCL_MODULES="$HCL_HOME/node_modules" node scripts/terraform-check.mjs "${fix[@]}" "${dirs[@]}"
