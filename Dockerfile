# CUDA image: the default command trains the Adult baseline; run the tests with
#   docker run --gpus all trustml pytest
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/trustml
ENV PYTHONUNBUFFERED=1 MPLBACKEND=Agg
COPY pyproject.toml README.md ./
COPY trustml ./trustml
RUN pip install --no-cache-dir -e ".[dev,bench]"
COPY . .
CMD ["python", "train.py", "--config", "configs/adult.yaml"]
