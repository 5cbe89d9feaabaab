"""Writes examples/teacher_data.jsonl: HAND-WRITTEN examples, not teacher output.

They imitate a careful teacher's style (type hints, docstrings, input checks)
so that a short training run shows the style moving into the student. Rerun
this script after editing the answers below.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent

EXAMPLES = [
    ("ex-reverse-words", "Write a Python function that reverses the order of words in a sentence.",
     'def reverse_words(sentence: str) -> str:\n    """Return the words of `sentence` in reverse order.\n\n    >>> reverse_words("hello big world")\n    \'world big hello\'\n    """\n    if not isinstance(sentence, str):\n        raise TypeError("sentence must be a str")\n    return " ".join(reversed(sentence.split()))\n'),
    ("ex-is-palindrome", "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
     'def is_palindrome(text: str) -> bool:\n    """True if `text` reads the same both ways, ignoring case and spaces.\n\n    >>> is_palindrome("Never odd or even")\n    True\n    """\n    if not isinstance(text, str):\n        raise TypeError("text must be a str")\n    letters = [c.lower() for c in text if not c.isspace()]\n    return letters == letters[::-1]\n'),
    ("ex-fizzbuzz", "Write FizzBuzz in Python as a function that returns a list of strings.",
     'def fizzbuzz(n: int) -> list[str]:\n    """FizzBuzz for 1..n: multiples of 3 -> "Fizz", of 5 -> "Buzz", of both -> "FizzBuzz".\n\n    >>> fizzbuzz(5)\n    [\'1\', \'2\', \'Fizz\', \'4\', \'Buzz\']\n    """\n    if n < 0:\n        raise ValueError("n must be >= 0")\n    out = []\n    for i in range(1, n + 1):\n        word = ("Fizz" if i % 3 == 0 else "") + ("Buzz" if i % 5 == 0 else "")\n        out.append(word or str(i))\n    return out\n'),
    ("ex-factorial", "Write a Python function that computes the factorial of n.",
     'def factorial(n: int) -> int:\n    """Return n! for n >= 0.\n\n    >>> factorial(5)\n    120\n    """\n    if not isinstance(n, int) or isinstance(n, bool):\n        raise TypeError("n must be an int")\n    if n < 0:\n        raise ValueError("factorial is undefined for negative numbers")\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n'),
    ("ex-fibonacci", "Write a Python function that returns the first n Fibonacci numbers.",
     'def fibonacci(n: int) -> list[int]:\n    """The first `n` Fibonacci numbers, starting 0, 1.\n\n    >>> fibonacci(6)\n    [0, 1, 1, 2, 3, 5]\n    """\n    if n < 0:\n        raise ValueError("n must be >= 0")\n    seq: list[int] = []\n    a, b = 0, 1\n    for _ in range(n):\n        seq.append(a)\n        a, b = b, a + b\n    return seq\n'),
    ("ex-count-vowels", "Write a Python function that counts the vowels in a string.",
     'def count_vowels(text: str) -> int:\n    """Number of vowels (a, e, i, o, u, either case) in `text`.\n\n    >>> count_vowels("Hello World")\n    3\n    """\n    if not isinstance(text, str):\n        raise TypeError("text must be a str")\n    return sum(1 for c in text.lower() if c in "aeiou")\n'),
    ("ex-max-of-list", "Write a Python function that returns the largest number in a list without using max().",
     'def largest(numbers: list[float]) -> float:\n    """The largest value in `numbers` (which must not be empty).\n\n    >>> largest([3, 9, 2])\n    9\n    """\n    if not numbers:\n        raise ValueError("numbers must not be empty")\n    best = numbers[0]\n    for x in numbers[1:]:\n        if x > best:\n            best = x\n    return best\n'),
    ("ex-celsius", "Write a Python function that converts Celsius to Fahrenheit.",
     'def celsius_to_fahrenheit(celsius: float) -> float:\n    """Convert degrees Celsius to Fahrenheit.\n\n    >>> celsius_to_fahrenheit(100)\n    212.0\n    """\n    if celsius < -273.15:\n        raise ValueError("below absolute zero")\n    return celsius * 9 / 5 + 32\n'),
    ("ex-unique", "Write a Python function that removes duplicates from a list while keeping the order.",
     'def unique(items: list) -> list:\n    """`items` without repeats, first occurrences kept in order.\n\n    >>> unique([3, 1, 3, 2, 1])\n    [3, 1, 2]\n    """\n    seen = set()\n    out = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n            out.append(item)\n    return out\n'),
    ("ex-word-count", "Write a Python function that counts how often each word appears in a text.",
     'from collections import Counter\n\n\ndef word_counts(text: str) -> dict[str, int]:\n    """Map each lower-cased word of `text` to its count.\n\n    >>> word_counts("a b a")\n    {\'a\': 2, \'b\': 1}\n    """\n    if not isinstance(text, str):\n        raise TypeError("text must be a str")\n    return dict(Counter(text.lower().split()))\n'),
    ("ex-is-prime", "Write a Python function that checks whether a number is prime.",
     'def is_prime(n: int) -> bool:\n    """True if `n` is a prime number.\n\n    >>> [k for k in range(10) if is_prime(k)]\n    [2, 3, 5, 7]\n    """\n    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n        if n % k == 0:\n            return False\n        k += 1\n    return True\n'),
    ("ex-flatten", "Write a Python function that flattens a list of lists by one level.",
     'def flatten(nested: list[list]) -> list:\n    """Concatenate the inner lists of `nested`.\n\n    >>> flatten([[1, 2], [3], []])\n    [1, 2, 3]\n    """\n    if not all(isinstance(x, list) for x in nested):\n        raise TypeError("every item must be a list")\n    return [item for inner in nested for item in inner]\n'),
    ("ex-sum-digits", "Write a Python function that returns the sum of the digits of an integer.",
     'def digit_sum(n: int) -> int:\n    """Sum of the decimal digits of `n` (its sign is ignored).\n\n    >>> digit_sum(-472)\n    13\n    """\n    if not isinstance(n, int):\n        raise TypeError("n must be an int")\n    return sum(int(d) for d in str(abs(n)))\n'),
    ("ex-binary-search", "Write a binary search function in Python.",
     'def binary_search(items: list[int], target: int) -> int:\n    """Index of `target` in the sorted list `items`, or -1 if absent.\n\n    >>> binary_search([1, 3, 5, 7], 5)\n    2\n    """\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n'),
    ("ex-capitalize", "Write a Python function that capitalizes the first letter of every word.",
     'def title_words(text: str) -> str:\n    """Capitalize the first letter of each space-separated word.\n\n    >>> title_words("hello big world")\n    \'Hello Big World\'\n    """\n    if not isinstance(text, str):\n        raise TypeError("text must be a str")\n    return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))\n'),
    ("ex-gcd", "Write a Python function that computes the greatest common divisor of two integers.",
     'def gcd(a: int, b: int) -> int:\n    """Greatest common divisor of `a` and `b` (Euclid\'s algorithm).\n\n    >>> gcd(12, 18)\n    6\n    """\n    a, b = abs(a), abs(b)\n    while b:\n        a, b = b, a % b\n    return a\n'),
]

HELD_OUT = [
    ("ex-heldout-reverse-string", "Write a Python function that reverses a string."),
    ("ex-heldout-average", "Write a Python function that returns the average of a list of numbers."),
]


def main() -> None:
    with open(HERE / "teacher_data.jsonl", "w", encoding="utf-8") as f:
        for rid, prompt, code in EXAMPLES:
            response = f"```python\n{code}```"
            f.write(json.dumps({"id": rid, "prompt": prompt, "response": response, "stop_reason": "end_turn",
                                "model": "hand-written", "source": "hand-written example, not teacher output"}) + "\n")
    with open(HERE / "heldout.jsonl", "w", encoding="utf-8") as f:
        for rid, prompt in HELD_OUT:
            f.write(json.dumps({"id": rid, "prompt": prompt, "source": "heldout"}) + "\n")


if __name__ == "__main__":
    main()
