from __future__ import annotations

import pytest

import mlx_qwen2  # noqa: F401  (picks the BLAS before mlx.core is imported)
from examples.fetch_model import SHA256, gguf_path
from mlx_qwen2.convert import main as convert_main
from tests.tiny import make_checkpoint


@pytest.fixture(scope="session")
def real_folder(tmp_path_factory: pytest.TempPathFactory):
    """The real Qwen2.5-Coder-0.5B-Instruct, imported from its GGUF into an MLX folder (float32)."""
    out = tmp_path_factory.mktemp("real") / "qwen2.5-coder-0.5b-instruct"
    assert convert_main(["--gguf", str(gguf_path()), "--mlx-path", str(out), "--sha256", SHA256]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tied=False)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tied=True, heads=4, kv_heads=1, seed=1)


@pytest.fixture(scope="session", params=["untied", "tied"])
def tiny(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"tiny_{request.param}")
