"""What the benchmark asks: a few distinct ~N-token prompts (made-up health questions with a context
long enough to reach the target length), and a question file for the batch job built from Alpaca
instructions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mistral_qa.prompt import build_prompt

QUESTIONS = [
    "Does phone use before bed hurt sleep?",
    "How much screen time is too much for a ten-year-old?",
    "Can looking down at a phone all day cause neck pain?",
    "Is texting while walking dangerous?",
    "Why do my eyes feel dry after hours on a tablet?",
    "Can notifications make it harder to concentrate at work?",
    "Does social media use affect mood in teenagers?",
    "How loud is too loud for earbuds, and for how long?",
    "Should children under two use tablets?",
    "Is it bad to keep a phone in the bedroom at night?",
    "Can gaming on a phone improve reaction time?",
    "Does scrolling before a meal change how much I eat?",
    "How can I stop checking my phone every few minutes?",
    "Do blue-light filters on phones actually help sleep?",
    "Can holding a phone for long periods hurt my thumbs or wrists?",
    "Does using a phone in the car distract drivers even hands-free?",
]

# Made-up background text, rotated per question so the prompts differ beyond their first line.
CONTEXT_SENTENCES = [
    "The user is a university student who studies late and uses a laptop and a phone most evenings.",
    "They report going to bed around one in the morning and waking up tired most weekdays.",
    "On weekends they sleep until noon and often spend several hours watching short videos.",
    "They sometimes notice a dull ache between the shoulder blades after long study sessions.",
    "Their phone shows an average of six hours of screen time a day, mostly messaging and video.",
    "They have tried turning on night mode but are unsure whether it makes any difference.",
    "A friend told them that reading on paper before bed helps, but they have not tried it yet.",
    "They drink two coffees in the afternoon and usually have an energy drink before exams.",
    "During lectures they keep the phone on the desk, face up, with notifications enabled.",
    "They walk to campus for twenty minutes and usually listen to music at a high volume.",
    "Headaches appear a few times a week, mostly in the late afternoon after screen work.",
    "They would like practical advice that fits a busy schedule rather than strict rules.",
]


@dataclass(frozen=True)
class BenchPrompt:
    """One distinct question with its context; `prompt` is exactly what the engine is given."""

    question: str
    context: str

    @property
    def prompt(self) -> str:
        return build_prompt(self.question, self.context)

    @property
    def messages(self) -> list[dict]:
        # The chat endpoint folds a system message into the template's Input section, so the server
        # builds the same prompt as `self.prompt`.
        return [{"role": "system", "content": self.context}, {"role": "user", "content": self.question}]


def _context_words(offset: int, n_words: int) -> list[str]:
    words: list[str] = []
    i = offset
    while len(words) < n_words:
        words.extend(CONTEXT_SENTENCES[i % len(CONTEXT_SENTENCES)].split())
        i += 1
    return words[:n_words]


def sized_prompt(question: str, offset: int, target_tokens: int, count_tokens) -> BenchPrompt:
    """The longest context (in whole words) that keeps the prompt at or under target_tokens."""
    lo, hi = 0, 4 * target_tokens
    while lo < hi:  # the largest word count whose prompt fits
        mid = (lo + hi + 1) // 2
        if count_tokens(build_prompt(question, " ".join(_context_words(offset, mid)))) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return BenchPrompt(question, " ".join(_context_words(offset, lo)))


def bench_prompts(count_tokens, n: int, target_tokens: int) -> list[BenchPrompt]:
    """n distinct prompts of about target_tokens tokens each (BOS included)."""
    return [sized_prompt(QUESTIONS[i % len(QUESTIONS)], i, target_tokens, count_tokens) for i in range(n)]


def token_counter(tokenizer):
    """Prompt tokens as the engine counts them (with BOS)."""
    return lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])


def write_alpaca_questions(alpaca_json: Path, n: int, out: Path) -> int:
    """A JSONL question file of n rows from the Alpaca instructions, repeated with ' (variant k)'."""
    rows = json.loads(Path(alpaca_json).read_text())
    instructions = [r["instruction"].strip() for r in rows if str(r.get("instruction", "")).strip()]
    if not instructions:
        raise ValueError(f"{alpaca_json}: no instructions")
    with open(out, "w") as f:
        for i in range(n):
            variant, k = divmod(i, len(instructions))
            question = instructions[k] + (f" (variant {variant + 1})" if variant else "")
            f.write(json.dumps({"id": f"alpaca-{k:04d}-v{variant + 1}", "question": question}) + "\n")
    return n
