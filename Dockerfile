# The kv-transition harness (no torch, no engine): it starts the engines as sibling containers through
# the host's Docker daemon (mount /var/run/docker.sock) on the host network, and writes runs/ and data/
# to volumes. See compose.yaml and README.md ("Running a matrix").
#   docker build -t kv-transition/harness:0.1.0 --build-arg KVT_GIT_SHA=$(git rev-parse HEAD) .
FROM python:3.11.11-slim-bookworm

ARG KVT_GIT_SHA=unknown
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KVT_GIT_SHA=${KVT_GIT_SHA} \
    KVT_ENGINES_DIR=/opt/kv-transition/engines \
    KVT_STATE_DIR=/work/runs/.state

WORKDIR /opt/kv-transition
# dependencies first (a layer that survives source edits), then the package with the score/report extras
COPY pyproject.toml README.md ./
COPY harness ./harness
RUN pip install ".[score,report]" && kvt --version
# engine specs (and the kvpress engine's build context, for images built through the daemon) and configs
COPY engines ./engines
COPY config ./config

WORKDIR /work
RUN mkdir -p /work/runs /work/data && ln -s /opt/kv-transition/config /work/config
VOLUME ["/work/runs", "/work/data"]
ENTRYPOINT ["kvt"]
CMD ["--help"]
