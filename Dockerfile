# Images for cluster.yaml (Ray autoscaler on AWS) and k8s/rayjob.yaml (KubeRay): Ray + deldist and its
# dependencies, one target per kind of node:
#   docker build --target cpu -t <registry>/deldist:cpu . && docker push <registry>/deldist:cpu
#   docker build --target gpu -t <registry>/deldist:gpu . && docker push <registry>/deldist:gpu
# cpu: head and CPU workers (driver, decode, k-means, dedup); torch from PyTorch's CPU-only wheels.
# gpu: GPU workers (encoder actors); torch from PyPI, whose wheels bundle CUDA 13.0, so the node's
#      NVIDIA driver must be R580 or newer. Without --target, docker builds the last stage (gpu).
# Both bases carry the Ray of the pin in pyproject.toml (ray 2.60.*) and of rayVersion in
# k8s/rayjob.yaml, on Python 3.11 as in the development venv (pyproject: >= 3.10).

# The repository files the images hold (.dockerignore keeps .venv/, demo_out/, .git/ ... out of the context).
FROM scratch AS src
COPY pyproject.toml README.md /src/
COPY deldist /src/deldist
COPY jobs /src/jobs
COPY configs /src/configs

FROM rayproject/ray:2.60.0-py311 AS cpu
# torch / torchvision at the versions pyproject.toml pins, CPU-only: the PyPI wheels add several GB of
# CUDA libraries that a CPU node never loads. `pip install .` keeps them (2.14.1+cpu satisfies ==2.14.1).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
# The repository lives at /home/ray/deldist (the RayJob entrypoint runs /home/ray/deldist/jobs/curate.py;
# cluster.yaml mounts the checkout there). COPY creates the directory owned by the image's user `ray`.
COPY --from=src --chown=1000:100 /src /home/ray/deldist
WORKDIR /home/ray/deldist
# Ray itself is already in the base image at the pinned version; this adds deldist and the rest.
RUN pip install --no-cache-dir . && python -c "import deldist, ray, torch; print(ray.__version__, torch.__version__)"

FROM rayproject/ray:2.60.0-py311-gpu AS gpu
COPY --from=src --chown=1000:100 /src /home/ray/deldist
WORKDIR /home/ray/deldist
RUN pip install --no-cache-dir . && python -c "import deldist, ray, torch; print(ray.__version__, torch.__version__)"
