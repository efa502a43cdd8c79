import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TQDM_DISABLE", "1")
# kernels' packed weights are cached per test session, never in the user's cache (tests reloading a
# checkpoint with a kernel exercise the cache's read path)
if "QUANTKIT_PACK_CACHE_DIR" not in os.environ:
    os.environ["QUANTKIT_PACK_CACHE_DIR"] = _packed = tempfile.mkdtemp(prefix="quantkit-test-packed-")
    atexit.register(shutil.rmtree, _packed, ignore_errors=True)  # after the cache writer threads are joined


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A saved tiny random Llama with a tiny tokenizer (shared, read-only)."""
    from tests.tiny import llama_config, make_model

    return make_model(tmp_path_factory.mktemp("tiny") / "llama", llama_config(architectures=["LlamaForCausalLM"]))


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """A tiny Llama whose rows split into 256-weight super-blocks (hidden 256, intermediate 512; shared, read-only)."""
    from tests.tiny import llama_config, make_model

    return make_model(tmp_path_factory.mktemp("wide") / "llama",
                      llama_config(hidden=256, inter=512, architectures=["LlamaForCausalLM"], head_dim=64))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from tests.tiny import write_text

    return write_text(tmp_path_factory.mktemp("data") / "calib.txt")


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global RNG state: a test that draws without its own generator
    (a default nn.Linear init, torch.randn) sees the same numbers on every run and in any order."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quantkit_log_level():
    """A CLI call sets up logging for its process (the quantkit and root loggers' levels, the root handler,
    Python warnings routed to logging); a test process runs many, so each test starts from the same state."""
    import logging

    from rich.logging import RichHandler

    root = logging.getLogger()
    level, root_level = logging.getLogger("quantkit").level, root.level
    yield
    logging.getLogger("quantkit").setLevel(level)
    root.setLevel(root_level)
    for handler in [h for h in root.handlers if isinstance(h, RichHandler)]:  # the CLI's, not pytest's
        root.removeHandler(handler)
    logging.captureWarnings(False)
