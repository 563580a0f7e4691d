# shardlb image: the static shardlb binary and the GoBGP v4 CLI (a v3 gobgp cannot talk
# to shardlb's v4 speaker) on an empty base, non-root by default. The DaemonSet runs the
# load balancer as uid 0 with all but its named capabilities dropped, because
# Kubernetes grants added capabilities to root processes only; `shardlb get` and
# `gobgp` need none.
#
# `make image` builds this image without this file, a daemon, root or a registry, with
# a reproducible digest (README, "Image"). This file is for builders that pull golang;
# it gives the same files, user, labels and entrypoint, not the same digest:
#
#   v=$(git describe --tags --always --dirty)
#   docker build -t ghcr.io/shardlb/shardlb:$v --build-arg VERSION=$v \
#     --build-arg REVISION=$(git rev-parse HEAD) .

ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ENV CGO_ENABLED=0
# make image's flags. The eBPF objects are generated and committed, so no clang is
# needed here.
RUN go build -trimpath -buildvcs=false -ldflags "-s -w -buildid= -X main.version=${VERSION}" \
      -o /out/shardlb ./cmd/shardlb
# The CLI at the GoBGP version go.mod pins, so that it speaks the speaker's API.
RUN version=$(go list -m -f '{{.Version}}' github.com/osrg/gobgp/v4) && \
    GOBIN=/out go install -trimpath -buildvcs=false -ldflags "-s -w -buildid=" \
      "github.com/osrg/gobgp/v4/cmd/gobgp@${version}"

FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
COPY --from=build /out/shardlb /out/gobgp /usr/bin/
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title=shardlb \
      org.opencontainers.image.version=${VERSION} \
      org.opencontainers.image.revision=${REVISION} \
      org.opencontainers.image.source=https://github.com/shardlb/shardlb \
      org.opencontainers.image.licenses=Apache-2.0
USER 65532:65532
ENTRYPOINT ["/usr/bin/shardlb"]
CMD ["run"]
