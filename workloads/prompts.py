"""A mixed serving workload for the demo and benchmarks: four request classes, written here."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class QueryClass(str, enum.Enum):
    FACTUAL = "factual"
    CODE = "code"
    CREATIVE = "creative"
    ARITHMETIC = "arithmetic"
    GROUNDED = "grounded"     # the answer copies from the prompt: code edits, summaries, quotes


@dataclass(frozen=True)
class Prompt:
    query_class: QueryClass
    text: str


PROMPTS: tuple[Prompt, ...] = (
    Prompt(QueryClass.FACTUAL, "What is the capital of Japan?"),
    Prompt(QueryClass.FACTUAL, "Who wrote the novel Pride and Prejudice?"),
    Prompt(QueryClass.FACTUAL, "Why is the sky blue during the day?"),
    Prompt(QueryClass.FACTUAL, "Name the largest planet in the solar system."),
    Prompt(QueryClass.CODE, "Write a Python function that reverses a string."),
    Prompt(QueryClass.CODE, "Explain what a Python list comprehension does, with an example."),
    Prompt(QueryClass.CODE, "Write a SQL query that counts the rows of a table named users."),
    Prompt(QueryClass.CODE, "How do I read a text file line by line in Python?"),
    Prompt(QueryClass.CREATIVE, "Write a two-line poem about the sea at night."),
    Prompt(QueryClass.CREATIVE, "Describe a quiet library in one sentence."),
    Prompt(QueryClass.CREATIVE, "Invent a name for a friendly robot and describe it."),
    Prompt(QueryClass.CREATIVE, "Start a short story about a lost umbrella."),
    Prompt(QueryClass.ARITHMETIC, "What is 17 plus 25?"),
    Prompt(QueryClass.ARITHMETIC, "What is 9 times 8?"),
    Prompt(QueryClass.ARITHMETIC, "If I have 30 apples and give away 12, how many are left?"),
    Prompt(QueryClass.ARITHMETIC, "What is half of 64?"),
)


_FUNC = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total + total * tax_rate
    return total'''

# Kept apart from PROMPTS (whose mix the demo and the other benchmarks serve): the class that
# prompt-lookup drafting is for (bench/speculative.py).
GROUNDED_PROMPTS: tuple[Prompt, ...] = (
    Prompt(QueryClass.GROUNDED, "Rewrite this Python function so that the variable `total` is "
           "called `subtotal`. Reply with the whole function only.\n\n" + _FUNC),
    Prompt(QueryClass.GROUNDED, "Add a docstring to this Python function and reply with the "
           "whole function.\n\n" + _FUNC),
    Prompt(QueryClass.GROUNDED, "Repeat the following sentence exactly, then say how many words "
           "it has: The quick brown fox jumps over the lazy dog near the quiet river bank."),
    Prompt(QueryClass.GROUNDED, "Here is a note: 'The meeting moved from Tuesday at 10 am to "
           "Thursday at 2 pm in room 4B; bring the quarterly budget report.' Quote the new time "
           "and room from the note."),
)


def chat_ids(tokenizer, text: str):
    """Token ids [1, T] of one user turn in the model's chat template, ready for generate()."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
