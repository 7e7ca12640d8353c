"""Code-editing prompts for benchmarks/speculative.py: a function and a small change to make to it.

Written for the benchmark: 20 functions of everyday code, each with one edit that leaves most of the
text as it was, so the reply repeats long spans of the prompt.
"""

FUNCTIONS = [
    (
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
        "Rename the variable `total` to `acc`.",
    ),
    (
        "def clamp(x, low=0, high=10):\n    if x < low:\n        return low\n    if x > high:\n        return high\n    return x\n",
        "Change the default of `high` from 10 to 100.",
    ),
    (
        "def read_lines(path):\n    with open(path) as f:\n        lines = f.readlines()\n    return [line.strip() for line in lines]\n",
        "Open the file with encoding='utf-8'.",
    ),
    (
        "def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n            out.append('FizzBuzz')\n        elif i % 3 == 0:\n            out.append('Fizz')\n        elif i % 5 == 0:\n            out.append('Buzz')\n        else:\n            out.append(str(i))\n    return out\n",
        "Make it return a single string joined by newlines.",
    ),
    (
        "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True\n",
        "Add type hints (int in, bool out).",
    ),
    (
        "def word_counts(text):\n    counts = {}\n    for word in text.split():\n        word = word.lower()\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
        "Strip punctuation '.,!?' from each word before counting.",
    ),
    (
        "def flatten(items):\n    result = []\n    for item in items:\n        if isinstance(item, list):\n            result.extend(flatten(item))\n        else:\n            result.append(item)\n    return result\n",
        "Also flatten tuples, not only lists.",
    ),
    (
        "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n\n\ndef fahrenheit_to_celsius(f):\n    return (f - 32) * 5 / 9\n",
        "Round both results to 1 decimal place.",
    ),
    (
        "def chunk(seq, size):\n    chunks = []\n    for i in range(0, len(seq), size):\n        chunks.append(seq[i:i + size])\n    return chunks\n",
        "Raise ValueError if size is not positive.",
    ),
    (
        "def merge(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n    return out\n",
        "Rename `out` to `merged`.",
    ),
    (
        "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n        self.count += 1\n\n    def reset(self):\n        self.count = 0\n",
        "Add a `decrement` method.",
    ),
    (
        "def parse_kv(line):\n    key, value = line.split('=')\n    return key.strip(), value.strip()\n",
        "Split only on the first '=' so values may contain '='.",
    ),
    (
        "def retry(func, attempts=3):\n    for i in range(attempts):\n        try:\n            return func()\n        except Exception:\n            if i == attempts - 1:\n                raise\n",
        "Catch only OSError instead of Exception.",
    ),
    (
        "def unique(items):\n    seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out\n",
        "Add a docstring saying it keeps the first occurrence of each item.",
    ),
    (
        "def factorial(n):\n    if n == 0:\n        return 1\n    return n * factorial(n - 1)\n",
        "Make it iterative instead of recursive, keeping the name and signature.",
    ),
    (
        "def find_max(values):\n    best = values[0]\n    for v in values[1:]:\n        if v > best:\n            best = v\n    return best\n",
        "Return None for an empty list.",
    ),
    (
        "def greet(name, greeting='Hello'):\n    message = greeting + ', ' + name + '!'\n    print(message)\n    return message\n",
        "Use an f-string to build the message.",
    ),
    (
        "def dot(a, b):\n    total = 0.0\n    for x, y in zip(a, b):\n        total += x * y\n    return total\n",
        "Raise ValueError when the lengths differ.",
    ),
    (
        "def to_snake(name):\n    out = ''\n    for ch in name:\n        if ch.isupper():\n            out += '_' + ch.lower()\n        else:\n            out += ch\n    return out.lstrip('_')\n",
        "Also turn spaces into underscores.",
    ),
    (
        "def binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if xs[mid] == target:\n            return mid\n        if xs[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n",
        "Rename `xs` to `items` everywhere.",
    ),
]

QUESTIONS = [
    "What is the difference between a list and a tuple in Python?",
    "Explain what a race condition is.",
    "Why is the sky blue?",
    "What does HTTP status code 404 mean?",
    "Give three tips for writing readable code.",
    "What is a hash function?",
    "How does garbage collection work in Python?",
    "What is the capital of Australia, and why is it not Sydney?",
]


def edit_prompt(code: str, change: str) -> str:
    return f"Here is a Python function:\n\n```python\n{code}```\n\n{change} Reply with the whole updated code only."
