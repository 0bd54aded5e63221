# CUDA image: the default command trains the Adult baseline; run the tests with
#   docker run --gpus all trustml pytest
# torch >= 2.6 (Opacus 1.6 needs it); the image's CUDA build is kept, pip adds only the rest
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

WORKDIR /opt/trustml
ENV PYTHONUNBUFFERED=1 MPLBACKEND=Agg
COPY pyproject.toml README.md ./
COPY trustml ./trustml
RUN pip install --no-cache-dir -e ".[dev,bench]"
COPY . .
CMD ["python", "train.py", "--config", "configs/adult.yaml"]
