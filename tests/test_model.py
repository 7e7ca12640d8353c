"""The MLX model against Hugging Face transformers on tiny random checkpoints."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen2.loader import load
from mlx_qwen2.models import ModelArgs
from tests.tiny import hf_greedy, hf_logits, hf_model, make_checkpoint

IDS = [5, 17, 300, 42, 99, 7, 250, 11, 64, 3, 128, 77, 201, 9, 15, 333, 21, 8]


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0])


def mlx_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(mlx_logits(model, out)[-1].argmax()))
    return out[len(ids) :]


def test_logits_and_greedy_match_transformers(tiny):
    model, _ = load(tiny)
    ref = hf_model(tiny)
    ours = mlx_logits(model, IDS)
    assert ours.shape == (len(IDS), 512)
    np.testing.assert_allclose(ours, hf_logits(ref, IDS), atol=1e-4, rtol=0)
    assert mlx_greedy(model, IDS[:4], 12) == hf_greedy(ref, IDS[:4], 12)


def test_batch_dimension(tiny_untied):
    model, _ = load(tiny_untied)
    batch = mx.array([IDS, IDS[::-1]])
    logits = np.array(model(batch))
    assert logits.shape == (2, len(IDS), 512)
    np.testing.assert_allclose(logits[1], mlx_logits(model, IDS[::-1]), atol=1e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=["linear", "yarn"],
)
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    folder = make_checkpoint(tmp_path, rope_scaling={**scaling, "rope_theta": 10000.0}, max_position_embeddings=256)
    config = json.loads((folder / "config.json").read_text())
    params = config.get("rope_parameters") or config.get("rope_scaling")
    assert params["rope_type"] == scaling["rope_type"]  # the reference really uses the scaling
    model, _ = load(folder)
    ids = (IDS * 6)[:100]  # past original_max_position_embeddings
    np.testing.assert_allclose(mlx_logits(model, ids), hf_logits(hf_model(folder), ids), atol=1e-4, rtol=0)


def test_hub_style_rope_scaling_is_read():
    """Hub configs (transformers 4) say rope_theta + rope_scaling {type: yarn}."""
    args = ModelArgs.from_dict(
        {
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "intermediate_size": 8,
            "num_attention_heads": 4,
            "vocab_size": 10,
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        }
    )
    assert args.rope_type == "yarn" and args.rope_theta == 1e6 and args.context_length == 131072


def test_transformers5_rope_parameters_are_read():
    base = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=8, num_attention_heads=4, vocab_size=10)
    args = ModelArgs.from_dict({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}})
    assert args.rope_theta == 500.0 and args.rope_type == "linear"
    assert (
        ModelArgs.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0
    )


def test_every_released_config_builds():
    """Shapes of every Qwen2 / Qwen2.5 dense size on the hub (0.5B ... 72B) build without weights."""
    sizes = {  # hidden, layers, ffn, heads, kv heads, tied
        "Qwen2-0.5B": (896, 24, 4864, 14, 2, True),
        "Qwen2-1.5B": (1536, 28, 8960, 12, 2, True),
        "Qwen2-7B": (3584, 28, 18944, 28, 4, False),
        "Qwen2-72B": (8192, 80, 29568, 64, 8, False),
        "Qwen2.5-3B": (2048, 36, 11008, 16, 2, True),
        "Qwen2.5-14B": (5120, 48, 13824, 40, 8, False),
        "Qwen2.5-32B": (5120, 64, 27648, 40, 8, False),
    }
    for name, (h, n, f, heads, kv, tied) in sizes.items():
        args = ModelArgs.from_dict(
            {
                "model_type": "qwen2",
                "hidden_size": h,
                "num_hidden_layers": n,
                "intermediate_size": f,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "vocab_size": 152064,
                "tie_word_embeddings": tied,
                "use_sliding_window": False,
                "sliding_window": 131072,
                "max_window_layers": 70,
            }
        )
        assert args.head_dim == 128 if h != 896 else args.head_dim == 64, name


def test_unsupported_settings_fail_clearly():
    base = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=8, num_attention_heads=4, vocab_size=10)
    with pytest.raises(ValueError, match="sliding-window"):
        ModelArgs.from_dict({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="not supported"):
        ModelArgs.from_dict({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="not 'qwen2'"):
        ModelArgs.from_dict({**base, "model_type": "llama"})
