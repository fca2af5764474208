import os

import pytest
from stack_fixtures import airflow_api, stack  # noqa: F401  (the served stack, one per session)

from tasks.embedded import build_embedded_default

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on two shared cores a busy
    neighbour process makes torch's spinning OpenMP threads ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def detox_home(tmp_path_factory):
    """One DETOX_HOME per test session: embedded default, MLflow and Airflow databases, run folders.

    A developer may set ``DETOX_TEST_EMBEDDED_FROM`` to a home whose embedded builds are copied
    in instead of built (about five minutes saved); they are checked like any earlier build.
    CI leaves it unset and builds from scratch.
    """
    import json
    import shutil
    from pathlib import Path

    home = tmp_path_factory.mktemp("home")
    source = os.environ.get("DETOX_TEST_EMBEDDED_FROM")
    if source:
        for build in Path(source).glob("embedded*"):
            shutil.copytree(build, home / build.name)
        for adapter_config in home.glob("embedded*/**/adapter_config.json"):  # its base model moves along
            config = json.loads(adapter_config.read_text())
            parts = Path(config["base_model_name_or_path"]).parts
            start = next(i for i, part in enumerate(parts) if part.startswith("embedded"))
            config["base_model_name_or_path"] = str(home.joinpath(*parts[start:]))
            adapter_config.write_text(json.dumps(config, indent=2))
    return home


@pytest.fixture(scope="session")
def embedded(detox_home):
    """The embedded default, built once per test session into a temporary home."""
    return build_embedded_default(home=detox_home)


@pytest.fixture(scope="session")
def demo(detox_home, embedded):
    """The demo's world for end-to-end tests: environment, S3 on loopback with the T5 and the
    tiny Llama SFT adapters, SQLite stores."""
    from tasks.demo import demo_services

    saved = dict(os.environ)
    try:
        with demo_services(detox_home, causal=True) as paths:
            yield paths
    finally:
        os.environ.clear()
        os.environ.update(saved)


class SamplingSpy:
    """Records the logits of every decoding step that :func:`tasks.models.sample` runs on ``model``."""

    def __init__(self, model):
        self.steps: list = []
        self.batch_sizes: list[int] = []
        real_forward = model.forward

        def forward(*args, **kwargs):
            output = real_forward(*args, **kwargs)
            if kwargs.get("use_cache"):  # the sampler's calls; the trainer's forward passes use no cache
                self.steps.append(output.logits[:, -1].detach().float())
                self.batch_sizes.append(output.logits.shape[0])
            return output

        model.forward = forward

    def logprobs(self, response_ids, lengths, temperature: float):
        """Log-prob of each sampled token under the distribution it was drawn from, [B, T].

        A row takes part in step ``t`` while ``t < lengths[row]``, in row order: the sampler
        drops rows as they finish.
        """
        import torch

        result = torch.zeros(response_ids.shape)
        for step, logits in enumerate(self.steps):
            active = [row for row in range(response_ids.shape[0]) if step < lengths[row]]
            assert len(active) == logits.shape[0], (step, len(active), logits.shape)
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            for position, row in enumerate(active):
                result[row, step] = logprobs[position, response_ids[row, step]]
        return result


@pytest.fixture
def sampling_spy():
    return SamplingSpy
