# syntax=docker/dockerfile:1
# callmesh's one image: the router, the conversation node and the effects worker
# (`callmesh router|node|effects-worker`; k8s/README.md). Build from the repository root:
#   docker build -t callmesh:dev .
# PYTHON_IMAGE: any Python 3.11 image with python3 and Debian's useradd (a registry
# mirror, or a locally built base where Docker Hub is out of reach).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a virtualenv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/callmesh
WORKDIR /src
# The runtime dependencies and the [voice] extra (provider SDKs) only: no embedded
# servers ([local]), no load tools ([loadtest]), no test tools ([dev]). Installed before
# the code is copied, so a code change reuses this layer.
COPY pyproject.toml constraints.txt ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["voice"]))' > requirements.txt \
 && /opt/callmesh/bin/pip install -c constraints.txt -r requirements.txt
COPY . .
RUN /opt/callmesh/bin/pip install --no-deps . \
 && /opt/callmesh/bin/pip uninstall --yes pip setuptools

# ---------------------------------------------------------------- runtime
# No compiler, no pip, no source tree: the base image and the virtualenv.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 callmesh \
 && useradd --system --uid 10001 --gid callmesh --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin callmesh
COPY --from=build /opt/callmesh /opt/callmesh
ENV PATH=/opt/callmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# router 8080, node 8090, effects worker 9090 (as the manifests in k8s/ run them)
EXPOSE 8080 8090 9090
ENTRYPOINT ["callmesh"]
CMD ["--help"]
