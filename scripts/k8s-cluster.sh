#!/usr/bin/env bash
# A one-node Kubernetes cluster on this machine, for the tests that run brokers as real pods.
#
#   scripts/k8s-cluster.sh start RUN_DIR    start the cluster; prints the kubeconfig path once the node is Ready
#                                           and the images below are imported
#   scripts/k8s-cluster.sh stop RUN_DIR     stop everything `start` started, and remove its pods and network
#   scripts/k8s-cluster.sh images OUT_DIR   only build the image tars (docker-save layout) into OUT_DIR
#
# It runs etcd, kube-apiserver, kube-controller-manager (every controller: deployment, replicaset, HPA,
# disruption, endpoints, garbage collector, service accounts, ...), kube-scheduler, a kubelet on containerd +
# runc with the bridge CNI plugin, kube-proxy (iptables) and a DNS server for Service names. The Kubernetes
# binaries are those of scripts/k8s-apiserver.sh (built once from Debian's `kubernetes` 1.20 source, cached
# under ~/.cache/cirrus-k8s); containerd, runc, the CNI plugins, iptables and dnsmasq are Debian packages,
# installed with apt if missing (and redis-server, for the Redis image). Needs root, network namespaces
# and iptables (tested on Debian 12 with cgroup v1, as root without CAP_SYS_RESOURCE).
#
# Images (no registry, no Docker): cirrus.local/cirrus-broker:dev and cirrus.local/cirrus-operator:dev hold
# the release binaries of this tree (built with each Dockerfile's own `cargo build` line) at the path, user
# and entrypoint their Dockerfile gives; cirrus.local/redis:dev holds Debian's redis-server; each binary
# with the shared libraries it links. cirrus.local/pause:dev is the pod sandbox.
#
# The node's address is NODE_IP, added to the loopback interface (it never leaves the machine): the API
# server listens there (the pods reach it through the `kubernetes` Service) and so does the DNS server.
# NodePorts answer on 127.0.0.1 too.
# DNS: dnsmasq answers <service>.<namespace>.svc.cluster.local (and the shorter forms through the pods'
# search list) from a hosts file that a loop refreshes from the API server every second; pod names, SRV
# records and headless Services are not served.
#
# Environment: CIRRUS_K8S_NODE_IP (10.250.0.1), CIRRUS_K8S_CLUSTER_API_PORT (17443),
# CIRRUS_K8S_CLUSTER_ETCD_PORT (13379, peer port +1), CIRRUS_IMAGES (a directory of image tars to import
# instead of building them; RUN_DIR/images points to it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/k8s-apiserver.sh
source "$ROOT/scripts/k8s-apiserver.sh"
say() { echo "k8s-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

NODE_IP=${CIRRUS_K8S_NODE_IP:-10.250.0.1}
NODE=cirrus-node
API_PORT=${CIRRUS_K8S_CLUSTER_API_PORT:-17443}
ETCD_PORT=${CIRRUS_K8S_CLUSTER_ETCD_PORT:-13379}
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.97.0.0/16
BRIDGE=cirrus-cni0
OWNER=/run/cirrus-k8s-cluster.owner
# Started in this order, stopped in the reverse one.
PROCS=(etcd apiserver kcm scheduler containerd dns dnsfeed kubelet proxy)

packages() {  # what the node needs from Debian
  local need=() p
  for p in containerd:containerd runc:runc iptables:iptables dnsmasq:dnsmasq-base conntrack:conntrack \
    redis-server:redis-server; do
    command -v "${p%%:*}" > /dev/null || need+=("${p#*:}")
  done
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
  fi
}

# ----- images: a tar in `docker save` layout, from files on this machine -----

dockerfile() {  # dockerfile FILE KEY: the runtime stage's KEY line (after the last FROM), without KEY
  awk -v k="$2" '/^FROM /{n=NR} {l[NR]=$0} END{for(i=n;i<=NR;i++) if (index(l[i], k" ")==1) {print substr(l[i], length(k)+2)}}' "$1"
}

add_with_libs() {  # add_with_libs ROOTFS FILE DEST: FILE at DEST, and every shared library it loads
  local fs=$1 src=$2 dest=$3 lib
  install -D -m 0755 "$src" "$fs$dest"
  for lib in $(ldd "$src" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}'); do
    [ -e "$fs$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$fs$lib"
  done
}

pack() {  # pack ROOTFS NAME USER ENTRYPOINT(json) WORKDIR OUT: the image tar
  local fs=$1 name=$2 user=$3 entry=$4 workdir=$5 out=$6 w diff cfg
  w=$(mktemp -d)
  mkdir -p "$fs"/{etc,tmp}; chmod 1777 "$fs/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$fs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$fs/etc/group"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/ca-certificates.crt"; fi
  tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$fs" -cf "$w/layer.tar" .
  diff=$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
  mkdir "$w/$diff"; mv "$w/layer.tar" "$w/$diff/layer.tar"
  cat > "$w/config.json" <<EOF
{"architecture":"amd64","os":"linux","config":{"User":"$user","Entrypoint":$entry,"WorkingDir":"$workdir","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]},"rootfs":{"type":"layers","diff_ids":["sha256:$diff"]},"history":[{"created_by":"scripts/k8s-cluster.sh"}]}
EOF
  cfg=$(sha256sum "$w/config.json" | cut -d' ' -f1)
  mv "$w/config.json" "$w/$cfg.json"
  echo "[{\"Config\":\"$cfg.json\",\"RepoTags\":[\"$name\"],\"Layers\":[\"$diff/layer.tar\"]}]" > "$w/manifest.json"
  tar --numeric-owner --owner=0 --group=0 -C "$w" -cf "$out" manifest.json "$cfg.json" "$diff"
  rm -rf "$w" "$fs"
}

project_image() {  # project_image DOCKERFILE BINARY OUT: the image the Dockerfile describes, from this tree
  local df=$ROOT/$1 bin=$2 out=$3 copy src dest user entry fs
  copy=$(dockerfile "$df" COPY); user=$(dockerfile "$df" USER); entry=$(dockerfile "$df" ENTRYPOINT)
  src=$(echo "$copy" | awk '{print $2}'); dest=$(echo "$copy" | awk '{print $3}')
  [ -n "$user" ] && [ -n "$entry" ] && [[ $src == /src/* ]] || die "$1: no COPY --from=build /src/..., USER or ENTRYPOINT"
  # The Dockerfile's own build line, in this tree (the same command the shipping test runs).
  (cd "$ROOT" && eval "$(sed -n 's/^RUN \(cargo build .*\)/\1/p' "$df")") >&2
  fs=$(mktemp -d)
  add_with_libs "$fs" "$ROOT/${src#/src/}" "$dest"
  pack "$fs" "cirrus.local/$bin:dev" "$user" "$entry" / "$out"
}

cmd_images() {
  local out=$1 bin fs
  mkdir -p "$out"
  project_image broker/Dockerfile cirrus-broker "$out/cirrus-broker.tar"
  project_image operator/Dockerfile cirrus-operator "$out/cirrus-operator.tar"
  fs=$(mktemp -d); add_with_libs "$fs" /usr/bin/redis-server /usr/bin/redis-server; mkdir -p "$fs/data"
  pack "$fs" cirrus.local/redis:dev 65532:65532 '["/usr/bin/redis-server"]' /data "$out/redis.tar"
  bin=$(bin_dir)
  fs=$(mktemp -d); install -D -m 0755 "$bin/pause" "$fs/pause"
  pack "$fs" cirrus.local/pause:dev 65535:65535 '["/pause"]' / "$out/pause.tar"
  echo "$out"
}

# ----- the cluster -----

start_bg() {  # start_bg RUN NAME CMD...: run in the background, log and pid in RUN
  local run=$1 name=$2; shift 2
  "$@" < /dev/null > "$run/logs/$name.log" 2>&1 &
  echo $! > "$run/$name.pid"
}

network_up() {
  ip addr replace "$NODE_IP/32" dev lo
  modprobe br_netfilter 2> /dev/null || true
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.ipv4.conf.all.route_localnet=1
}

certs() {  # certs RUN: a CA, the API server's and the kubelet's serving certificates, the admin token,
          # and the aggregation layer's front-proxy CA and client certificate (for aggregated APIs)
  local k=$1/pki
  pki "$1" cirrus-cluster-ca
  leaf "$k" api /CN=kube-apiserver "IP:$NODE_IP,IP:127.0.0.1,IP:${SERVICE_CIDR%.0/16}.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost" serverAuth
  leaf "$k" kubelet "/CN=$NODE" "IP:$NODE_IP,DNS:$NODE" serverAuth
  leaf "$k" apiclient "/O=system:masters/CN=kube-apiserver-kubelet-client" "DNS:client" clientAuth
  mkdir -p "$k/front-proxy"
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=front-proxy-ca \
    -keyout "$k/front-proxy/ca.key" -out "$k/front-proxy/ca.crt" 2> /dev/null
  leaf "$k/front-proxy" client /CN=front-proxy-client "DNS:front-proxy-client" clientAuth
  write_kubeconfig "$1" "https://$NODE_IP:$API_PORT" cirrus
}

config_files() {  # config_files RUN: containerd, CNI, kubelet, DNS
  local run=$1
  mkdir -p "$run"/{cni,containerd,kubelet,dns}
  cat > "$run/containerd/config.toml" <<EOF
version = 2
root = "$run/containerd/root"
state = "$run/containerd/state"
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "cirrus.local/pause:dev"
  # Negative OOM scores (the kubelet asks -998 for sandboxes) need CAP_SYS_RESOURCE, which a VM's or
  # container's root may lack: containerd's own score is the floor instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$run/cni"
EOF
  cat > "$run/cni/10-cirrus.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "cirrus", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$run/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  echo "nameserver $NODE_IP" > "$run/kubelet/resolv.conf"
  cat > "$run/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzPort: 0
tlsCertFile: $run/pki/kubelet.crt
tlsPrivateKeyFile: $run/pki/kubelet.key
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $run/pki/ca.crt}}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $run/kubelet/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
maxPods: 60
# Mounted Secrets reach the pods within seconds (the default, 1m, makes the
# CA rotation test wait minutes per phase).
syncFrequency: 10s
EOF
}

dns_feed() {  # dns_feed RUN: keep the DNS server's hosts file equal to the Services' cluster IPs
  local run=$1 kc=$1/kubeconfig f=$1/dns/services
  while :; do
    if kubectl --kubeconfig "$kc" --request-timeout=5s get services -A -o \
      jsonpath='{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local{"\n"}{end}' \
      2> /dev/null | grep -v '^None ' > "$f.new"; then
      cmp -s "$f.new" "$f" || mv -f "$f.new" "$f"
    fi
    sleep 1
  done
}

cmd_start() {
  local run=$1 bin images kc k t
  [ "$(id -u)" = 0 ] || die "needs root (containers, network namespaces, iptables)"
  packages
  bin=$(bin_dir)
  for t in kubelet kube-scheduler kube-proxy pause; do [ -x "$bin/$t" ] || die "$bin/$t missing"; done
  mkdir -p "$run"; run=$(cd "$run" && pwd)
  # One cluster per machine (the node's address, bridge and rules are the machine's): another one running
  # is left alone.
  if [ -f "$OWNER" ] && [ "$(cat "$OWNER")" != "$run" ] && pid_alive "$(cat "$OWNER")/apiserver.pid"; then
    die "a cluster from $(cat "$OWNER") is running; stop it first (scripts/k8s-cluster.sh stop $(cat "$OWNER"))"
  fi
  cmd_stop "$run"
  echo "$run" > "$OWNER"
  images=${CIRRUS_IMAGES:-$run/images}
  if [ -n "${CIRRUS_IMAGES:-}" ]; then
    [ "$(readlink -f "$images")" = "$(readlink -f "$run/images" 2> /dev/null || true)" ] || { rm -rf "$run/images"; ln -s "$(readlink -f "$images")" "$run/images"; }
  else
    cmd_images "$images" > /dev/null
  fi
  rm -rf "${run:?}"/{pki,etcd,logs,kubeconfig,cni,cni-ipam,dns,kubelet/config.yaml}
  mkdir -p "$run"/{pki,etcd,logs}
  network_up
  certs "$run"; config_files "$run"
  kc=$run/kubeconfig k=$run/pki
  start_bg "$run" etcd "$bin/etcd" --name cirrus --data-dir "$run/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "cirrus=http://127.0.0.1:$((ETCD_PORT + 1))"
  wait_until "$run" etcd 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start_bg "$run" apiserver "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$k/api.crt" --tls-private-key-file="$k/api.key" --client-ca-file="$k/ca.crt" \
    --token-auth-file="$k/tokens.csv" --authorization-mode=Node,RBAC --allow-privileged=true \
    --kubelet-client-certificate="$k/apiclient.crt" --kubelet-client-key="$k/apiclient.key" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$k/sa.pub" \
    --service-account-signing-key-file="$k/sa.key" --service-cluster-ip-range="$SERVICE_CIDR" \
    --requestheader-client-ca-file="$k/front-proxy/ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- --proxy-client-cert-file="$k/front-proxy/client.crt" \
    --proxy-client-key-file="$k/front-proxy/client.key" --enable-aggregator-routing=true
  wait_until "$run" apiserver 120 kubectl --kubeconfig "$kc" get --raw /readyz
  start_bg "$run" kcm "$bin/kube-controller-manager" --kubeconfig="$kc" --bind-address=127.0.0.1 \
    --secure-port=0 --port=0 --leader-elect=false --controllers='*' \
    --service-account-private-key-file="$k/sa.key" --root-ca-file="$k/ca.crt" \
    --horizontal-pod-autoscaler-sync-period=5s --node-monitor-grace-period=20s --pod-eviction-timeout=30s
  start_bg "$run" scheduler "$bin/kube-scheduler" --kubeconfig="$kc" --leader-elect=false --port=0 --secure-port=0
  start_bg "$run" containerd containerd --config "$run/containerd/config.toml"
  wait_until "$run" containerd 60 ctr --address "$run/containerd.sock" version
  for t in "$images"/*.tar; do
    ctr --address "$run/containerd.sock" -n k8s.io images import "$t" > /dev/null \
      || die "importing $t failed"
  done
  start_bg "$run" dns dnsmasq --keep-in-foreground --no-resolv --no-hosts --listen-address="$NODE_IP" \
    --bind-interfaces --hostsdir="$run/dns" --local=/cluster.local/ --pid-file= --user=root --log-facility=-
  start_bg "$run" dnsfeed bash -c "source '$ROOT/scripts/k8s-cluster.sh'; dns_feed '$run'"
  start_bg "$run" kubelet "$bin/kubelet" --kubeconfig="$kc" --config="$run/kubelet/config.yaml" \
    --container-runtime=remote --container-runtime-endpoint="unix://$run/containerd.sock" \
    --root-dir="$run/kubelet/root" --cert-dir="$run/kubelet/pki" --hostname-override="$NODE" --node-ip="$NODE_IP" \
    --pod-infra-container-image=cirrus.local/pause:dev
  start_bg "$run" proxy "$bin/kube-proxy" --kubeconfig="$kc" --hostname-override="$NODE" --proxy-mode=iptables \
    --cluster-cidr="$POD_CIDR" --bind-address="$NODE_IP" --metrics-bind-address=127.0.0.1:10249 \
    --healthz-bind-address=127.0.0.1:10256 --conntrack-max-per-core=0
  wait_until "$run" kubelet 180 kubectl --kubeconfig "$kc" wait --for=condition=Ready "node/$NODE" --timeout=1s
  wait_until "$run" kcm 60 kubectl --kubeconfig "$kc" get serviceaccount default -n default
  # kube-proxy routes Services (the `kubernetes` one first of all, which the operator's pods use).
  wait_until "$run" proxy 60 curl -sf http://127.0.0.1:10256/healthz
  wait_until "$run" proxy 60 curl -sfk "https://${SERVICE_CIDR%.0/16}.1/readyz"
  say "ready: https://$NODE_IP:$API_PORT, node $NODE (logs in $run/logs)"
  echo "$kc"
}

stop_proc() {  # stop_proc RUN NAME: TERM, then KILL after 5 s
  local pid
  [ -f "$1/$2.pid" ] || return 0
  pid=$(cat "$1/$2.pid")
  if kill -0 "$pid" 2> /dev/null; then
    pkill -TERM -P "$pid" 2> /dev/null || true
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    pkill -KILL -P "$pid" 2> /dev/null || true
    kill -KILL "$pid" 2> /dev/null || true
  fi
  rm -f "$1/$2.pid"
}

tasks() { ctr --address "$1/containerd.sock" -n k8s.io tasks ls -q 2> /dev/null; }

cmd_stop() {
  local run=$1 i id ns
  # Nothing new is scheduled or created; the pods go while the kubelet and containerd still run, so that
  # their containers stop and their network is torn down by the CNI plugins.
  stop_proc "$run" kcm; stop_proc "$run" scheduler
  if pid_alive "$run/kubelet.pid" && pid_alive "$run/apiserver.pid"; then
    kubectl --kubeconfig "$run/kubeconfig" --request-timeout=10s delete pods -A --all --force --grace-period=0 \
      --wait=false > /dev/null 2>&1 || true
    for _ in $(seq 60); do [ -n "$(tasks "$run")" ] || break; sleep 0.5; done
  fi
  for ((i = ${#PROCS[@]} - 1; i >= 0; i--)); do stop_proc "$run" "${PROCS[$i]}"; done
  # Whatever outlived that: containers (runc's state is under RUN), shims, sandboxes' network namespaces,
  # mounts, the bridge, the node's address and the Services' iptables rules.
  if [ -d "$run/runc/k8s.io" ]; then
    for id in $(runc --root "$run/runc/k8s.io" list -q 2> /dev/null); do
      runc --root "$run/runc/k8s.io" delete -f "$id" > /dev/null 2>&1 || true
    done
  fi
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $run/containerd.sock" 2> /dev/null || true
  grep -o " $run/[^ ]*" /proc/mounts 2> /dev/null | sort -r | while read -r m; do umount -l "$m" 2> /dev/null || true; done || true
  # The machine's part only if this cluster is the one that set it up.
  [ ! -f "$OWNER" ] || [ "$(cat "$OWNER")" = "$run" ] || return 0
  for ns in $(ip netns list 2> /dev/null | awk '/^cni-/{print $1}'); do ip netns delete "$ns" 2> /dev/null || true; done
  ip link del "$BRIDGE" 2> /dev/null || true
  ip addr del "$NODE_IP/32" dev lo 2> /dev/null || true
  if iptables-save 2> /dev/null | grep -q 'KUBE-\|CNI-'; then
    [ ! -x "$HOME_DIR/bin/kube-proxy" ] || "$HOME_DIR/bin/kube-proxy" --cleanup > /dev/null 2>&1 || true
    # The bridge plugin's masquerade chains of this network.
    iptables-save -t nat 2> /dev/null | grep -o -- '-A POSTROUTING -s [0-9./]* -m comment --comment "name: \\"cirrus\\" id: \\"[^"]*\\"" -j CNI-[0-9a-f]*' \
      | while read -r rule; do
          eval "iptables -t nat -D ${rule#-A }" 2> /dev/null || true
          iptables -t nat -F "${rule##* }" 2> /dev/null && iptables -t nat -X "${rule##* }" 2> /dev/null || true
        done || true
  fi
  rm -f "$OWNER"
  return 0
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case "${1:-}" in
  start) [ $# -eq 2 ] || die "usage: $0 start RUN_DIR"; cmd_start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop RUN_DIR"; cmd_stop "$(cd "$2" 2> /dev/null && pwd || echo "$2")" ;;
  images) [ $# -eq 2 ] || die "usage: $0 images OUT_DIR"; packages; cmd_images "$2" ;;
  *) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2 ;;
esac
