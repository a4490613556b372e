#!/usr/bin/env bash
# A real Kubernetes API server (with etcd and the garbage collector) on 127.0.0.1, for the operator's tests.
#
#   scripts/k8s-apiserver.sh install           make sure the binaries exist; prints their directory
#   scripts/k8s-apiserver.sh start RUN_DIR     start etcd + kube-apiserver (+ garbage collector); prints the kubeconfig path
#   scripts/k8s-apiserver.sh stop RUN_DIR      stop what `start` started in RUN_DIR
#
# Binaries, first found wins:
#   1. $KUBEBUILDER_ASSETS/{etcd,kube-apiserver} (and kube-controller-manager if there), as a developer may have;
#   2. the cache $CIRRUS_K8S_HOME/bin (default ~/.cache/cirrus-k8s/bin) from an earlier build;
#   3. a build from Debian bookworm's own packages: the `kubernetes` source package (1.20), Go 1.19 and etcd,
#      downloaded with apt into a private directory (nothing installed system-wide); about 5 minutes on 2 cores.
#      Two API versions the operator needs but 1.20 lacks are added as copies of their predecessors with the
#      same schema: autoscaling/v2 (of v2beta2) and policy/v1 PodDisruptionBudget (of v1beta1).
# Environment: CIRRUS_K8S_API_PORT (16443), CIRRUS_K8S_ETCD_PORT (12379, peer port +1), CIRRUS_K8S_CRDS_JSON (a
# directory of CRDs as JSON, created before the garbage collector starts so that it collects their children).
set -euo pipefail

HOME_DIR=${CIRRUS_K8S_HOME:-${HOME:?}/.cache/cirrus-k8s}
API_PORT=${CIRRUS_K8S_API_PORT:-16443}
ETCD_PORT=${CIRRUS_K8S_ETCD_PORT:-12379}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

say() { echo "k8s-apiserver: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ----- the build recipe (its text is hashed: a change rebuilds) -----
# >>> recipe
PACKAGES="golang-1.19-go golang-1.19-src etcd-server golang-github-modern-go-reflect2-dev"

debian_mirror() {  # the Debian archive the machine's apt already uses
  local u
  u=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -m1 -i debian || true)
  [ -n "$u" ] || u=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print ($2 ~ /^\[/) ? $3 : $2}' | grep -m1 -i debian || true)
  [ -n "$u" ] || die "no Debian mirror in the apt sources"
  echo "$u"
}

sub() {  # sub FILE SED CHECK: edit, and insist the edit took
  sed -i "$2" "$1"
  grep -q -- "$3" "$1" || die "patch failed in $1 ($3)"
}

add_autoscaling_v2() {
  cp -r staging/src/k8s.io/api/autoscaling/v2beta2 staging/src/k8s.io/api/autoscaling/v2
  cp -r pkg/apis/autoscaling/v2beta2 pkg/apis/autoscaling/v2
  rm -f staging/src/k8s.io/api/autoscaling/v2/{BUILD,zz_generated.prerelease-lifecycle.go} pkg/apis/autoscaling/v2/{BUILD,defaults_test.go}
  sed -i 's/v2beta2/v2/g' staging/src/k8s.io/api/autoscaling/v2/*.go staging/src/k8s.io/api/autoscaling/v2/generated.proto pkg/apis/autoscaling/v2/*.go
  local f=pkg/apis/autoscaling/install/install.go
  sub $f 's#^\t"k8s.io/kubernetes/pkg/apis/autoscaling/v2beta2"#&\n\tautoscalingv2 "k8s.io/kubernetes/pkg/apis/autoscaling/v2"#' 'autoscalingv2 "'
  sub $f 's#^\tutilruntime.Must(v2beta2.AddToScheme(scheme))#\tutilruntime.Must(autoscalingv2.AddToScheme(scheme))\n&#' 'autoscalingv2.AddToScheme'
  sub $f 's#SetVersionPriority(v1.SchemeGroupVersion, #SetVersionPriority(v1.SchemeGroupVersion, autoscalingv2.SchemeGroupVersion, #' 'autoscalingv2.SchemeGroupVersion, '
  f=pkg/registry/autoscaling/rest/storage_autoscaling.go
  sub $f 's#^\tautoscalingapiv2beta2 "k8s.io/kubernetes/pkg/apis/autoscaling/v2beta2"#&\n\tautoscalingapiv2 "k8s.io/kubernetes/pkg/apis/autoscaling/v2"#' 'autoscalingapiv2 "'
  sub $f 's#^\tif apiResourceConfigSource.VersionEnabled(autoscalingapiv2beta2.SchemeGroupVersion) {#\tif apiResourceConfigSource.VersionEnabled(autoscalingapiv2.SchemeGroupVersion) {\n\t\tstorageMap, err := p.v2beta2Storage(apiResourceConfigSource, restOptionsGetter)\n\t\tif err != nil {\n\t\t\treturn genericapiserver.APIGroupInfo{}, false, err\n\t\t}\n\t\tapiGroupInfo.VersionedResourcesStorageMap[autoscalingapiv2.SchemeGroupVersion.Version] = storageMap\n\t}\n&#' 'StorageMap\[autoscalingapiv2\.'
  f=pkg/controlplane/instance.go
  sub $f 's#^\tautoscalingapiv2beta2 "k8s.io/api/autoscaling/v2beta2"#&\n\tautoscalingapiv2 "k8s.io/api/autoscaling/v2"#' 'autoscalingapiv2 "'
  sub $f 's#^\t\tautoscalingapiv2beta2.SchemeGroupVersion,#&\n\t\tautoscalingapiv2.SchemeGroupVersion,#' 'autoscalingapiv2.SchemeGroupVersion,'
  sub cmd/kube-apiserver/app/aggregator.go 's#^\t{Group: "autoscaling", Version: "v1"}: .*#\t{Group: "autoscaling", Version: "v2"}: {group: 17500, version: 30},\n&#' 'Version: "v2"}'
}

add_policy_v1() {
  local s=staging/src/k8s.io/api/policy p=pkg/apis/policy f
  cp -r $s/v1beta1 $s/v1; rm -f $s/v1/{BUILD,zz_generated.prerelease-lifecycle.go}
  sed -i 's/v1beta1/v1/g' $s/v1/*.go $s/v1/generated.proto
  sed -i '/^\t\t&PodSecurityPolicy\(List\)\?{},$/d' $s/v1/register.go   # policy/v1 has no PodSecurityPolicy
  cp -r $p/v1beta1 $p/v1; rm -f $p/v1/BUILD
  sed -i 's/policyv1beta1/policyv1/g; s#\bv1beta1 "k8s.io/api/policy/v1beta1"#policyv1 "k8s.io/api/policy/v1beta1"#; s/\bv1beta1\./policyv1./g; s/v1beta1/v1/g' $p/v1/*.go
  f=$p/install/install.go
  sub $f 's#^\t"k8s.io/kubernetes/pkg/apis/policy/v1beta1"#&\n\tpolicyv1 "k8s.io/kubernetes/pkg/apis/policy/v1"#' 'policyv1 "'
  sub $f 's#^\tutilruntime.Must(v1beta1.AddToScheme(scheme))#&\n\tutilruntime.Must(policyv1.AddToScheme(scheme))#' 'policyv1.AddToScheme'
  sub $f 's#SetVersionPriority(v1beta1.SchemeGroupVersion)#SetVersionPriority(v1beta1.SchemeGroupVersion, policyv1.SchemeGroupVersion)#' 'policyv1.SchemeGroupVersion)'
  f=pkg/registry/policy/rest/storage_policy.go
  sub $f 's#^\tpolicyapiv1beta1 "k8s.io/api/policy/v1beta1"#\tpolicyapiv1 "k8s.io/api/policy/v1"\n&#' 'policyapiv1 "'
  sub $f 's#^\tif apiResourceConfigSource.VersionEnabled(policyapiv1beta1.SchemeGroupVersion) {#\tif apiResourceConfigSource.VersionEnabled(policyapiv1.SchemeGroupVersion) {\n\t\tpdb, pdbStatus, err := poddisruptionbudgetstore.NewREST(restOptionsGetter)\n\t\tif err != nil {\n\t\t\treturn genericapiserver.APIGroupInfo{}, false, err\n\t\t}\n\t\tapiGroupInfo.VersionedResourcesStorageMap[policyapiv1.SchemeGroupVersion.Version] = map[string]rest.Storage{"poddisruptionbudgets": pdb, "poddisruptionbudgets/status": pdbStatus}\n\t}\n&#' 'StorageMap\[policyapiv1\.'
  f=pkg/controlplane/instance.go
  sub $f 's#^\tpolicyapiv1beta1 "k8s.io/api/policy/v1beta1"#\tpolicyapiv1 "k8s.io/api/policy/v1"\n&#' 'policyapiv1 "'
  sub $f 's#^\t\tpolicyapiv1beta1.SchemeGroupVersion,#\t\tpolicyapiv1.SchemeGroupVersion,\n&#' 'policyapiv1.SchemeGroupVersion,'
  sub cmd/kube-apiserver/app/aggregator.go 's#^\t{Group: "policy", Version: "v1beta1"}: .*#\t{Group: "policy", Version: "v1"}: {group: 17100, version: 15},\n&#' '"policy", Version: "v1"}'
}

build() {  # build DIR: everything under DIR; binaries in DIR/out
  local W=$1 K d
  mkdir -p "$W"/{lists/partial,cache/archives/partial,debs,root,src,out}
  printf 'deb %s bookworm main\ndeb-src %s bookworm main\n' "$(debian_mirror)" "$(debian_mirror)" > "$W/sources.list"
  local APT=(-o Dir::Etc::sourcelist="$W/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$W/lists"
             -o Dir::Cache="$W/cache" -o APT::Sandbox::User=root -o Acquire::AllowInsecureRepositories=false)
  apt-get "${APT[@]}" update
  (cd "$W/debs" && apt-get "${APT[@]}" download $PACKAGES)
  (cd "$W/src" && apt-get "${APT[@]}" source --download-only kubernetes)
  for d in "$W"/debs/*.deb; do dpkg-deb -x "$d" "$W/root"; done
  cp "$W/root/usr/bin/etcd" "$W/out/etcd"
  tar xzf "$W"/src/kubernetes_*.orig.tar.gz -C "$W/src"
  K=$(ls -d "$W"/src/kubernetes-1.20.*/ | head -1); K=${K%/}
  [ -d "$K" ] || die "bookworm's kubernetes source is no longer 1.20"
  # The vendored reflect2 1.0.1 does not work with Go >= 1.18; Debian's 1.0.2 has the same API.
  rm -rf "$K/vendor/github.com/modern-go/reflect2"
  cp -r "$W/root/usr/share/gocode/src/github.com/modern-go/reflect2" "$K/vendor/github.com/modern-go/reflect2"
  rm -f "$K/vendor/github.com/modern-go/reflect2/go.mod"
  (cd "$K" && add_autoscaling_v2 && add_policy_v1)
  unset GOROOT GOBIN GOFLAGS GOTOOLCHAIN GOWORK
  export PATH=$W/root/usr/lib/go-1.19/bin:$PATH GOENV=off GO111MODULE=off GOPROXY=off CGO_ENABLED=0 GOCACHE=$W/gocache GOPATH=$W/gopath
  mkdir -p "$W/gopath/src/k8s.io"; ln -sfn "$K" "$W/gopath/src/k8s.io/kubernetes"
  cd "$W/gopath/src/k8s.io/kubernetes"
  # The release tarball lacks the generated OpenAPI definitions (server-side apply needs them).
  go build -o "$W/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  local dirs
  dirs=$( { grep -rl --include='*.go' --exclude='*_test.go' '+k8s:openapi-gen=' pkg cmd || true
            (cd vendor && grep -rlR --include='*.go' --exclude='*_test.go' '+k8s:openapi-gen=' k8s.io \
               | grep -vE '^k8s.io/(code-generator|sample-apiserver)/' | sed 's#^#vendor/#'); } \
          | xargs -n1 dirname | LC_ALL=C sort -u | sed 's#^#k8s.io/kubernetes/#' | paste -sd, -)
  "$W/openapi-gen" -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/violations.report"
  local V=k8s.io/kubernetes/vendor/k8s.io ld="-s -w" p
  for p in $V/component-base/version $V/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=archive"
  done
  go build -tags providerless -ldflags "$ld" -o "$W/out/kube-apiserver" ./cmd/kube-apiserver
  go build -tags providerless -ldflags "$ld" -o "$W/out/kube-controller-manager" ./cmd/kube-controller-manager
  # The node of scripts/k8s-cluster.sh: scheduler, kubelet, kube-proxy, and the pod sandbox's `pause`.
  go build -tags providerless -ldflags "$ld" -o "$W/out/kube-scheduler" ./cmd/kube-scheduler
  go build -tags providerless -ldflags "$ld" -o "$W/out/kubelet" ./cmd/kubelet
  go build -tags providerless -ldflags "$ld" -o "$W/out/kube-proxy" ./cmd/kube-proxy
  gcc -static -Os -DVERSION=v1.20-cirrus -o "$W/out/pause" "$(ls build/pause/linux/pause.c build/pause/pause.c 2>/dev/null | head -1)"
}
# <<< recipe

recipe_id() { sed -n '/^# >>> recipe$/,/^# <<< recipe$/p' "$SELF" | sha256sum | cut -c1-16; }

bin_dir() {  # where the binaries are, building them if need be
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
    echo "$KUBEBUILDER_ASSETS"; return
  fi
  local bin=$HOME_DIR/bin
  if [ -x "$bin/kube-apiserver" ] && grep -qx "$(recipe_id)" "$HOME_DIR/RECIPE" 2>/dev/null; then echo "$bin"; return; fi
  mkdir -p "$HOME_DIR"
  exec 9> "$HOME_DIR/.lock"; flock -w 1800 9 || die "timed out waiting for another build"
  if ! { [ -x "$bin/kube-apiserver" ] && grep -qx "$(recipe_id)" "$HOME_DIR/RECIPE" 2>/dev/null; }; then
    local W t0=$SECONDS
    W=$(mktemp -d "$HOME_DIR/build.XXXXXX")
    say "building kube-apiserver from Debian's sources (about 5 min; log: $HOME_DIR/build.log)"
    if ! (build "$W") > "$HOME_DIR/build.log" 2>&1; then
      tail -n 30 "$HOME_DIR/build.log" >&2; rm -rf "$W"; die "build failed"
    fi
    mkdir -p "$bin"; mv -f "$W"/out/* "$bin/"
    recipe_id > "$HOME_DIR/RECIPE"; rm -rf "$W"
    say "built in $((SECONDS - t0))s"
  fi
  exec 9>&-
  echo "$bin"
}

pki() {  # pki RUN CA_NAME: in RUN/pki a CA, the service-account key pair, and an admin token (tokens.csv)
  local k=$1/pki
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$2" -keyout "$k/ca.key" -out "$k/ca.crt" 2> /dev/null
  openssl genrsa -out "$k/sa.key" 2048 2> /dev/null; openssl rsa -in "$k/sa.key" -pubout -out "$k/sa.pub" 2> /dev/null
  echo "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n'),admin,admin,system:masters" > "$k/tokens.csv"
}

leaf() {  # leaf PKI NAME SUBJECT SAN USAGE: PKI/NAME.{key,crt} signed by PKI/ca
  local k=$1
  openssl req -newkey rsa:2048 -nodes -subj "$3" -keyout "$k/$2.key" -out "$k/$2.csr" 2> /dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$4" "$5" > "$k/$2.cnf"
  openssl x509 -req -in "$k/$2.csr" -CA "$k/ca.crt" -CAkey "$k/ca.key" -CAcreateserial -days 365 -extfile "$k/$2.cnf" -out "$k/$2.crt" 2> /dev/null
}

write_kubeconfig() {  # write_kubeconfig RUN SERVER NAME: RUN/kubeconfig for the admin token of RUN/pki
  local k=$1/pki
  (umask 077; cat > "$1/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: $3, cluster: {server: "$2", certificate-authority-data: $(base64 -w0 "$k/ca.crt")}}]
users: [{name: admin, user: {token: $(cut -d, -f1 "$k/tokens.csv")}}]
contexts: [{name: $3, context: {cluster: $3, user: admin, namespace: default}}]
current-context: $3
EOF
  )
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_start() {
  local run=$1 bin k token
  bin=$(bin_dir)
  mkdir -p "$run"; run=$(cd "$run" && pwd)
  cmd_stop "$run"
  rm -rf "${run:?}"/{pki,etcd,logs,kubeconfig}; mkdir -p "$run"/{pki,etcd,logs}
  k=$run/pki
  pki "$run" cirrus-test-ca
  leaf "$k" api /CN=kube-apiserver "IP:127.0.0.1,DNS:localhost" serverAuth
  write_kubeconfig "$run" "https://127.0.0.1:$API_PORT" test
  token=$(cut -d, -f1 "$k/tokens.csv")
  "$bin/etcd" --name test --data-dir "$run/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "test=http://127.0.0.1:$((ETCD_PORT + 1))" < /dev/null > "$run/logs/etcd.log" 2>&1 &
  echo $! > "$run/etcd.pid"
  wait_until "$run" etcd 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$API_PORT" --insecure-port=0 --tls-cert-file="$k/api.crt" --tls-private-key-file="$k/api.key" \
    --client-ca-file="$k/ca.crt" --token-auth-file="$k/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$k/sa.pub" \
    --service-account-signing-key-file="$k/sa.key" --service-cluster-ip-range=10.96.0.0/16 \
    --disable-admission-plugins=ServiceAccount < /dev/null > "$run/logs/apiserver.log" 2>&1 &
  echo $! > "$run/apiserver.pid"
  local curl_api=(curl -sf --cacert "$k/ca.crt" -H "Authorization: Bearer $token")
  wait_until "$run" apiserver 120 "${curl_api[@]}" "https://127.0.0.1:$API_PORT/readyz"
  # CRDs before the garbage collector starts, so it collects the children of custom resources at once.
  if [ -n "${CIRRUS_K8S_CRDS_JSON:-}" ]; then
    local f
    for f in "$CIRRUS_K8S_CRDS_JSON"/*.json; do
      "${curl_api[@]}" -o /dev/null -X POST -H 'Content-Type: application/json' --data-binary "@$f" \
        "https://127.0.0.1:$API_PORT/apis/apiextensions.k8s.io/v1/customresourcedefinitions" || die "creating CRD $f failed"
    done
  fi
  if [ -x "$bin/kube-controller-manager" ]; then
    "$bin/kube-controller-manager" --kubeconfig="$run/kubeconfig" --bind-address=127.0.0.1 --secure-port=0 --port=0 \
      --controllers=garbagecollector,namespace,resourcequota --leader-elect=false < /dev/null > "$run/logs/kcm.log" 2>&1 &
    echo $! > "$run/kcm.pid"
    wait_until "$run" kcm 60 grep -q 'all resource monitors have synced' "$run/logs/kcm.log"
  fi
  say "ready: https://127.0.0.1:$API_PORT (logs in $run/logs)"
  echo "$run/kubeconfig"
}

wait_until() {  # wait_until RUN NAME SECONDS CMD...
  local run=$1 name=$2 end=$((SECONDS + $3)); shift 3
  until "$@" > /dev/null 2>&1; do
    pid_alive "$run/$name.pid" || { tail -n 20 "$run/logs/$name.log" >&2; cmd_stop "$run"; die "$name exited"; }
    [ $SECONDS -lt $end ] || { tail -n 20 "$run/logs/$name.log" >&2; cmd_stop "$run"; die "$name not ready in time"; }
    sleep 0.2
  done
}

cmd_stop() {
  local run=$1 n pid
  for n in kcm apiserver etcd; do
    [ -f "$run/$n.pid" ] || continue
    pid=$(cat "$run/$n.pid")
    # Only a process started from our binaries (a recycled pid is left alone).
    if kill -0 "$pid" 2>/dev/null && grep -qE '(etcd|kube-apiserver|kube-controller-manager)' "/proc/$pid/cmdline" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$run/$n.pid"
  done
}

# Sourced by scripts/k8s-cluster.sh for its functions; run, it does what its first argument says.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case "${1:-}" in
  install) bin_dir ;;
  start) [ $# -eq 2 ] || die "usage: $0 start RUN_DIR"; cmd_start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop RUN_DIR"; cmd_stop "$2" ;;
  __build) build "$2" ;;
  *) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF" >&2; exit 2 ;;
esac
