"""Script a Qwen2 model with the public API: load once, then stream, chat and sample.

python examples/complete_code.py MODEL_FOLDER_OR_HUB_ID
"""

import sys

from mlx_qwen2 import generate, load, stream_generate


def main(model_path: str) -> None:
    model, tokenizer = load(model_path)

    # 1. Stream a plain-text completion as it is produced.
    prompt = "def is_palindrome(s: str) -> bool:\n"
    print(prompt, end="")
    for response in stream_generate(model, tokenizer, prompt, max_tokens=64, stop=["\n\n\n"]):
        print(response.text, end="", flush=True)
    print(f"\n[{response.generation_tokens} tokens at {response.generation_tps:.1f} tokens/s]\n")

    # 2. A chat-templated question, sampled reproducibly.
    messages = [{"role": "user", "content": "Name three uses of Python's itertools module, one line each."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(generate(model, tokenizer, ids, max_tokens=96, temp=0.7, top_p=0.9, seed=0))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen2.5-Coder-0.5B-Instruct")
