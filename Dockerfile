# Herald container image. NOT TESTED HERE (no container runtime in the test environment).
#   docker build -t herald .
#   docker run --rm herald --help
# A 3-node cluster on one Docker host: see README.md ("Deployment").
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev g++ make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald-node --bin herald

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/herald herald && mkdir -p /var/lib/herald && chown herald /var/lib/herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER herald
VOLUME /var/lib/herald
EXPOSE 7401 7411 7431 7441
ENTRYPOINT ["herald"]
CMD ["node", "--help"]
