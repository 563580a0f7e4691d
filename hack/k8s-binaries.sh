#!/usr/bin/env bash
# Builds the Kubernetes binaries the tests and the lab run, from the Go module proxy, into
# a cache outside the repository (default $HOME/.cache/shardlb/k8s-v1.37.2), and prints
# that directory. A binary already there is never rebuilt, so a second run is instant.
#
#   etcd                    go.etcd.io/etcd/server/v3
#   kube-apiserver          k8s.io/kubernetes/cmd/kube-apiserver
#   kubelet, kube-scheduler, kube-controller-manager, kubectl
#                           the node stack (test/nodestack); one `go build` for the four,
#                           as they share most packages (with each other and the apiserver)
#
# With NODE_STACK=0 only etcd and kube-apiserver are built (what the API tests need).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.7.3}
CACHE=${SHARDLB_CACHE:-$HOME/.cache/shardlb}
NODE_STACK=${NODE_STACK:-1}
OUT="$CACHE/k8s-$K8S_VERSION"
NODE_BINS=(kubelet kube-scheduler kube-controller-manager kubectl)

missing_node=()
if [[ $NODE_STACK == 1 ]]; then
  for b in "${NODE_BINS[@]}"; do [[ -x "$OUT/$b" ]] || missing_node+=("$b"); done
fi
if [[ -x "$OUT/kube-apiserver" && -x "$OUT/etcd" && ${#missing_node[@]} -eq 0 ]]; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ ! -x "$OUT/etcd" ]]; then
  echo "building etcd $ETCD_VERSION (about 1 minute)..." >&2
  mkdir -p "$work/etcd" && cd "$work/etcd"
  go mod init shardlb.local/etcdbuild >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
  go build -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$OUT/etcd.tmp" "$OUT/etcd"
fi

# k8smodule PKG...: a scratch module requiring k8s.io/kubernetes with every staging module
# (listed at v0.0.0 in its go.mod) replaced by its release, tidied for the given packages.
minor=${K8S_VERSION#v1.}
ldf="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
k8smodule() {
  mkdir -p "$work/k8s" && cd "$work/k8s"
  rm -f go.mod go.sum main.go
  go mod init shardlb.local/k8sbuild >/dev/null 2>&1
  local staging
  staging=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -E '^\s+k8s.io/[a-z0-9-]+ v0\.0\.0$' "$staging" | awk -v v="v0.$minor" '{print "replace " $1 " => " $1 " " v}'
  } >>go.mod
  go mod tidy >/dev/null 2>&1 || true
  {
    echo "package main"
    echo
    for p in "$@"; do echo "import _ \"$p\""; done
    echo
    echo "func main() {}"
  } >main.go
  go mod tidy
  rm main.go
}

if [[ ! -x "$OUT/kube-apiserver" ]]; then
  echo "building kube-apiserver $K8S_VERSION (about 9 minutes on 2 cores, once)..." >&2
  k8smodule k8s.io/kubernetes/cmd/kube-apiserver/app
  go build -ldflags "$ldf" -o "$OUT/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
fi

if [[ ${#missing_node[@]} -gt 0 ]]; then
  echo "building ${missing_node[*]} $K8S_VERSION (about 10 minutes on 2 cores, once)..." >&2
  k8smodule k8s.io/kubernetes/cmd/kubelet/app k8s.io/kubernetes/cmd/kube-scheduler/app \
    k8s.io/kubernetes/cmd/kube-controller-manager/app k8s.io/kubectl/pkg/cmd
  pkgs=()
  for b in "${missing_node[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  mkdir -p "$work/bin"
  # Several packages: -o names a directory, each binary is named after its package.
  go build -ldflags "$ldf" -o "$work/bin/" "${pkgs[@]}"
  for b in "${missing_node[@]}"; do mv "$work/bin/$b" "$OUT/$b.tmp" && mv "$OUT/$b.tmp" "$OUT/$b"; done
fi
echo "$OUT"
