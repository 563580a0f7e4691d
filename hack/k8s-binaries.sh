#!/usr/bin/env bash
# Builds kube-apiserver and etcd from the Go module proxy into a cache outside the
# repository (default $HOME/.cache/shardlb/k8s-v1.37.2) and prints that directory.
# A second run is instant: the binaries are reused when present.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.7.3}
CACHE=${SHARDLB_CACHE:-$HOME/.cache/shardlb}
OUT="$CACHE/k8s-$K8S_VERSION"

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/etcd" ]]; then
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

if [[ ! -x "$OUT/kube-apiserver" ]]; then
  echo "building kube-apiserver $K8S_VERSION (about 9 minutes on 2 cores, once)..." >&2
  mkdir -p "$work/k8s" && cd "$work/k8s"
  go mod init shardlb.local/k8sbuild >/dev/null 2>&1
  staging=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  minor=${K8S_VERSION#v1.}
  {
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -E '^\s+k8s.io/[a-z0-9-]+ v0\.0\.0$' "$staging" | awk -v v="v0.$minor" '{print "replace " $1 " => " $1 " " v}'
  } >>go.mod
  go mod tidy >/dev/null 2>&1 || true
  cat >main.go <<'GO'
package main

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"

func main() {}
GO
  go mod tidy
  rm main.go
  ldf="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
  go build -ldflags "$ldf" -o "$OUT/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
fi
echo "$OUT"
