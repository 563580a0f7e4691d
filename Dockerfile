# shardlb image: the static shardlb binary and the GoBGP v4 CLI (a v3 gobgp cannot talk
# to shardlb's v4 speaker), on distroless, non-root by default. The DaemonSet runs the
# load balancer as uid 0 with all but its named capabilities dropped, because
# Kubernetes grants added capabilities to root processes only; `shardlb get` and
# `gobgp` need none.
#
#   docker build -t ghcr.io/shardlb/shardlb:dev --build-arg VERSION=$(git describe --always) .

ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# The eBPF objects are generated and committed, so no clang is needed here.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/shardlb ./cmd/shardlb
# The CLI at the GoBGP version go.mod pins, so that it speaks the speaker's API.
RUN version=$(go list -m -f '{{.Version}}' github.com/osrg/gobgp/v4) && \
    CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags "-s -w" \
      "github.com/osrg/gobgp/v4/cmd/gobgp@${version}"

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/shardlb /out/gobgp /usr/bin/
USER 65532:65532
ENTRYPOINT ["/usr/bin/shardlb"]
CMD ["run"]
