# shardlb — build, test, benchmark, regenerate.
# Every target installs what it needs (Debian packages, the kube-apiserver build cached
# in $(CACHE)), so a fresh machine needs nothing else.

GO      ?= go
CACHE   ?= $(HOME)/.cache/shardlb
PKGS    := ./...
BIN     := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
export PATH := $(PATH):$(shell $(GO) env GOPATH)/bin
APT_PKGS := clang-16 llvm-16 libbpf-dev frr ethtool nftables iproute2 openssl wrk nginx-light python3 tcpdump

.PHONY: all build test test-unit bench generate check-generate lint deps k8s-bins demo clean

all: build

build:
	$(GO) build -o $(BIN)/shardlb -ldflags '$(LDFLAGS)' ./cmd/shardlb

## image: the image ghcr.io/shardlb/shardlb:$(VERSION), offline and reproducible (README,
## "Image"): static shardlb and gobgp (the GoBGP v4 that go.mod pins) in one layer on an
## empty base, assembled by hack/image, its own module: no daemon, no root, nothing
## pulled. Writes $(IMAGE_DIR)/oci (OCI layout) and $(IMAGE_DIR)/shardlb.tar (the same
## with a docker manifest.json: ctr import, docker load, podman load) and prints the
## digest. File times and the creation time are SOURCE_DATE_EPOCH, by default the
## commit's time.
IMAGE_NAME        ?= ghcr.io/shardlb/shardlb
IMAGE_DIR         := $(BIN)/image
REVISION          ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
IMAGE_GOFLAGS     := -trimpath -buildvcs=false
IMAGE_LDFLAGS     := -s -w -buildid=
GOBGP_VERSION      = $(shell $(GO) list -m -f '{{.Version}}' github.com/osrg/gobgp/v4)
.PHONY: image
image:
	@mkdir -p $(IMAGE_DIR)
	CGO_ENABLED=0 $(GO) build $(IMAGE_GOFLAGS) -ldflags '$(IMAGE_LDFLAGS) -X main.version=$(VERSION)' \
	  -o $(IMAGE_DIR)/shardlb ./cmd/shardlb
	@test -n "$(GOBGP_VERSION)" || { echo "go.mod pins no github.com/osrg/gobgp/v4"; exit 1; }
	CGO_ENABLED=0 GOBIN=$(abspath $(IMAGE_DIR)) $(GO) install $(IMAGE_GOFLAGS) -ldflags '$(IMAGE_LDFLAGS)' \
	  github.com/osrg/gobgp/v4/cmd/gobgp@$(GOBGP_VERSION)
	@$(GO) build -C hack/image -o $(abspath $(IMAGE_DIR))/assemble .
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(IMAGE_DIR)/assemble -name $(IMAGE_NAME) \
	  -version $(VERSION) -revision $(REVISION) -arch $$($(GO) env GOARCH) \
	  -shardlb $(IMAGE_DIR)/shardlb -gobgp $(IMAGE_DIR)/gobgp -oci $(IMAGE_DIR)/oci -tar $(IMAGE_DIR)/shardlb.tar

## deps: Debian packages the tests, the lab and eBPF generation use.
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

## tools: Helm v4 (the chart's tests render it), built from the Go module proxy into
## GOPATH/bin once (about 6 minutes on 2 cores the first time).
HELM_VERSION := v4.3.2
.PHONY: tools
tools:
	@$(GO) version -m "$$(command -v helm)" 2>/dev/null | grep -q 'mod[[:space:]]*helm.sh/helm/v4[[:space:]]*$(HELM_VERSION)' || \
	  { echo "building helm $(HELM_VERSION)"; $(GO) install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION); }

## k8s-bins: kube-apiserver and etcd, and the node stack's kubelet, kube-scheduler,
## kube-controller-manager and kubectl, from the Go module proxy, cached outside the repo.
k8s-bins:
	@SHARDLB_CACHE=$(CACHE) bash hack/k8s-binaries.sh >/dev/null

## test: everything, including the root-only kernel, FRR, apiserver and lab suites. The
## lab runs alone after the rest: its failover assertions (BFD at 100 ms x 3, no lost
## probe on planned switches) want the two cores to itself.
LAB := ./test/lab
test: deps tools k8s-bins check-generate lint
	SHARDLB_K8S_BINS=$(CACHE)/k8s-v1.37.2 $(GO) test -race -count=1 -timeout 40m $$($(GO) list $(PKGS) | grep -v -e '/test/lab$$' -e '/test/nodestack$$')
	SHARDLB_K8S_BINS=$(CACHE)/k8s-v1.37.2 $(GO) test -race -count=1 -timeout 20m $(LAB)
	$(GO) test -C hack/image -count=1 ./...
	$(MAKE) --no-print-directory nodestack

## test-unit: the pure packages only, seconds, no root.
test-unit:
	$(GO) test -count=1 ./shard/... ./ipam/... ./cmd/...

## bench: readable tables, each row with a ratio to a baseline measured in the same run.
## test/nodestack's BenchmarkPodMemory needs the node stack's packages and images: each
## shardlb pod's memory cgroup beside the maps' estimate and the manifest's limit.
bench: deps nodestack-deps k8s-bins image lab-images
	SHARDLB_K8S_BINS=$(CACHE)/k8s-v1.37.2 $(GO) test -run '^$$' -bench . -benchmem -benchtime=$(or $(BENCHTIME),1s) -timeout 60m $(PKGS) | $(GO) run ./test/benchtab

## demo: the guide end to end on the node stack (root): shardlb installed with
## `kubectl apply -k test/nodestack/overlay` from the image built here, run by a kubelet
## and containerd on each of three nodes, the guide's services and Deployments, an FRR
## router and a client (test/nodestack/demo). It prints what the guide prints and stops
## everything it started. Warm: about 25 s.
demo: deps nodestack-deps k8s-bins image lab-images
	SHARDLB_K8S_BINS=$(CACHE)/k8s-v1.37.2 $(GO) run ./test/nodestack/demo

## demo-process: the process lab (test/lab): the same guide with shardlb started as
## processes, then a master SIGKILLed and a planned stop, with the failover gaps
## measured (a node restarts in milliseconds there, not through a kubelet).
.PHONY: demo-process
demo-process: deps k8s-bins
	SHARDLB_CACHE=$(CACHE) SHARDLB_K8S_BINS=$(CACHE)/k8s-v1.37.2 $(GO) run ./test/lab

## generate: rebuild the eBPF objects and bindings, and the CRDs and deep copies of
## api/ (controller-gen, a Go tool of go.mod) (all committed).
generate: deps
	$(GO) generate ./datapath/...
	$(GO) generate ./api/...

## check-generate: the committed eBPF objects are what the sources produce.
check-generate: generate
	@git diff --exit-code --stat -- datapath api manifest/crds charts/shardlb/crds || { echo "make generate changed committed files: commit the regenerated eBPF objects, CRDs and deep copies"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- api manifest/crds charts/shardlb/crds)" || { git status --short -- api manifest/crds charts/shardlb/crds; echo "make generate left files git does not track: commit them"; exit 1; }

lint:
	$(GO) vet $(PKGS)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	@$(GO) mod tidy -diff || { echo "go.mod or go.sum is not tidy (the diff above): run 'go mod tidy'"; exit 1; }
	$(GO) tool staticcheck $(PKGS)
	$(GO) vet -C hack/image ./...
	@$(GO) mod tidy -C hack/image -diff || { echo "hack/image/go.mod is not tidy (the diff above)"; exit 1; }

clean:
	rm -rf $(BIN)

## lab-images: the node-stack lab's pod sandbox (pause) and backend images, from
## hack/image/pause and hack/image/backend, built and assembled like the shardlb image
## into $(IMAGE_DIR)/lab/{pause,backend}.tar (lab.shardlb.io/NAME:v1).
.PHONY: lab-images
lab-images:
	@mkdir -p $(IMAGE_DIR)/lab
	@$(GO) build -C hack/image -o $(abspath $(IMAGE_DIR))/assemble .
	@for b in pause backend; do \
	  CGO_ENABLED=0 $(GO) build -C hack/image $(IMAGE_GOFLAGS) -ldflags '$(IMAGE_LDFLAGS)' -o $(abspath $(IMAGE_DIR))/lab/$$b ./$$b && \
	  SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(IMAGE_DIR)/assemble -name lab.shardlb.io/$$b -version v1 -revision $(REVISION) \
	    -arch $$($(GO) env GOARCH) -bin usr/bin/$$b=$(IMAGE_DIR)/lab/$$b -tar $(IMAGE_DIR)/lab/$$b.tar || exit 1; \
	done

## nodestack: the DaemonSet installed with `kubectl apply -k test/nodestack/overlay` and run by
## real kubelets and containerd in the lab (test/nodestack), with the kube-controller-
## manager and kube-scheduler; root. Alone, like the lab: it takes the lab's lock.
## Warm: about two minutes. First run: k8s-bins builds the four node binaries in about
## 10 minutes more (after the apiserver's build, whose packages they share).
NODESTACK := ./test/nodestack
NODESTACK_PKGS := containerd runc containernetworking-plugins
.PHONY: nodestack nodestack-deps
nodestack-deps:
	@missing=""; for p in $(NODESTACK_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
nodestack: deps nodestack-deps k8s-bins image lab-images
	SHARDLB_K8S_BINS=$(CACHE)/k8s-v1.37.2 $(GO) test -count=1 -timeout 90m -v $(NODESTACK)
