# Image for k8s/rayjob.yaml (or any Ray cluster on containers): Ray + deldist and its dependencies.
#   docker build -t <registry>/deldist:latest . && docker push <registry>/deldist:latest
# The base's Ray must match the pin in pyproject.toml (ray 2.60.*) and rayVersion in k8s/rayjob.yaml;
# Python 3.11 as in the development venv (pyproject: >= 3.10). The -gpu image runs on CPU pods too.
FROM rayproject/ray:2.60.0-py311-gpu

# The repository lives at /home/ray/deldist (the RayJob entrypoint runs /home/ray/deldist/jobs/curate.py).
WORKDIR /home/ray/deldist
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 deldist ./deldist
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 configs ./configs
# Ray itself is already in the base image at the pinned version; this adds deldist and the rest.
RUN pip install --no-cache-dir . && python -c "import deldist, ray; print(ray.__version__)"
