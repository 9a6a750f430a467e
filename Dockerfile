# The cluster image the KubeRay manifests name (jobs/kuberay/*.yaml): Ray's own image, with this project installed
# by the step `make setup` runs (scripts/install.sh). On a machine with a registry:
#   docker build -t registry.example.com/sarl:2.60.0 . && docker push registry.example.com/sarl:2.60.0
# (CPU-only clusters: --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu)
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
WORKDIR /home/ray/sarl
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users scripts ./scripts
COPY --chown=ray:users src ./src
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve_configs ./serve_configs
RUN sh scripts/install.sh python
# The node cache (s3:// data and checkpoints, one copy per node): the manifests mount a node-local volume here
# (made the ray user's by an init container); without one, the image's own directory, also the ray user's.
ENV SARL_CACHE_DIR=/sarl-cache
USER root
RUN mkdir -p /sarl-cache && chown ray:users /sarl-cache
USER ray
