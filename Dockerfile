# Cluster image: NGC PyTorch (CUDA, cuDNN, NCCL, torch, Transformer Engine) + Mamba kernels + this
# project with the extras a cluster user needs, every version from pyproject.toml.
# Untested on the development machine (no Docker engine there); tests/test_dockerfile.py checks it
# against pyproject.toml, README.md gives the smoke command to run in the built image.
# The base must ship a torch inside pyproject.toml's range: the install below fails otherwise.
FROM nvcr.io/nvidia/pytorch:25.10-py3

# Keep the base image's own GPU stack: a constraints file of the versions installed here, so pip
# resolves pyproject.toml around them instead of replacing them (and no version is written twice).
RUN pip list --format=freeze \
      | grep -iE '^(torch|triton|pytorch-triton|transformer[-_]engine([-_](torch|cu[0-9]+))?)==' \
      > /opt/base-constraints.txt \
 && cat /opt/base-constraints.txt

# mamba-ssm and causal-conv1d (extra `kernels`) compile CUDA extensions against the image's torch,
# hence no build isolation; the project's own build backend comes from its [build-system].
ENV MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="9.0"
WORKDIR /opt/hybrid_megatron
COPY pyproject.toml README.md ./
COPY hybrid_megatron ./hybrid_megatron
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" \
      > /tmp/build-requires.txt \
 && pip install --no-cache-dir -c /opt/base-constraints.txt -r /tmp/build-requires.txt \
 && pip install --no-cache-dir --no-build-isolation -c /opt/base-constraints.txt -e ".[kernels,convert,eval]"
COPY launch ./launch
COPY recipes ./recipes
COPY data_tools ./data_tools
COPY data ./data
ENV NCCL_NVLS_ENABLE=0
