# Cluster image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine) + Mamba kernels + this project.
# Untested on the development machine (no Docker engine there); see README.md.
FROM nvcr.io/nvidia/pytorch:25.10-py3

# mamba-ssm and causal-conv1d compile CUDA extensions against the image's torch.
ENV MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="9.0"
RUN pip install --no-cache-dir --no-build-isolation causal-conv1d==1.7.0 mamba-ssm==2.2.6.post3

WORKDIR /opt/hybrid_megatron
COPY pyproject.toml README.md ./
COPY hybrid_megatron ./hybrid_megatron
# torch and Transformer Engine come from the base image; pin the rest from pyproject.toml.
RUN pip install --no-cache-dir "megatron-core==0.16.1" && pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir einops==0.8.2 pydantic==2.14.3 PyYAML==6.0.3 tokenizers==0.23.3 \
      safetensors==0.8.0 submitit==1.5.4 mlflow==3.17.2 pyarrow==25.0.1 zstandard==0.25.0 \
      tqdm==4.70.1 psutil==7.2.2
COPY launch ./launch
COPY recipes ./recipes
COPY data_tools ./data_tools
ENV NCCL_NVLS_ENABLE=0
