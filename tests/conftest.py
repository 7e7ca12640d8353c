from __future__ import annotations

import pytest

import mlx_qwen2  # noqa: F401  (picks the BLAS before mlx.core is imported)
from tests.tiny import make_checkpoint


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tied=False)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tied=True, heads=4, kv_heads=1, seed=1)


@pytest.fixture(scope="session", params=["untied", "tied"])
def tiny(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"tiny_{request.param}")
