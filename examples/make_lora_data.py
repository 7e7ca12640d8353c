"""Write the small task dataset in examples/lora_data: answer arithmetic questions in one fixed format.

The base model answers in free prose; after fine-tuning it should answer exactly
`<answer>N</answer>`. Deterministic (seeded), so the committed files can be rebuilt.

    python examples/make_lora_data.py
"""

import json
import random
from pathlib import Path

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
PHRASES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Tell me {a} {op} {b}.", "{a} {op} {b} equals what?"]


def example(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(sorted(OPS))
    question = rng.choice(PHRASES).format(a=a, op=op, b=b)
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"<answer>{OPS[op](a, b)}</answer>"},
        ]
    }


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).parent / "lora_data"
    out.mkdir(exist_ok=True)
    for split, n in (("train", 200), ("valid", 24), ("test", 24)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(n)))


if __name__ == "__main__":
    main()
