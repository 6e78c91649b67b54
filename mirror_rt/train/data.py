"""Offline training text (never a hub download): the prompts whose target answers train the draft
and the exit head (``mirror_rt.answers`` makes the answers).

Sources:
* the train-allowed side of the Spec-Bench split (``mirror_rt.prompts``: its one definition; the
  evaluation side never enters training);
* the Python documentation shipped with the interpreter (``pydoc_data.topics``);
* hand-written instruction templates (``template_prompts``), some quoting pydoc paragraphs.
"""
from __future__ import annotations

import random
import re

from mirror_rt.prompts import first_turns, train_questions


def pydoc_paragraphs(min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Paragraph-sized chunks of the interpreter's own documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key]
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            if len(para) >= min_chars:
                out.append(para[:max_chars])
    return out


_SUBJECTS = ["the ocean", "a city at night", "friendship", "autumn leaves", "a lost key", "the first day of school",
             "a robot learning to paint", "coffee", "mountains", "a rainy afternoon", "time travel", "a small garden",
             "the moon", "an old library", "learning a new language", "a train journey", "winter", "a lighthouse"]
_TOPICS = ["photosynthesis", "inflation", "the water cycle", "machine learning", "black holes", "vaccines",
           "the French Revolution", "climate change", "supply and demand", "the immune system", "recursion",
           "a hash table", "binary search", "the internet", "democracy", "plate tectonics", "compound interest",
           "renewable energy", "the Pythagorean theorem", "DNA", "electric cars", "the stock market", "sleep",
           "exercise", "neural networks", "the Roman Empire", "volcanoes", "gravity", "cloud computing", "encryption"]
_PAIRS = [("a list", "a tuple in Python"), ("weather", "climate"), ("a virus", "bacteria"), ("RAM", "storage"),
          ("speed", "velocity"), ("a democracy", "a republic"), ("TCP", "UDP"), ("mitosis", "meiosis"),
          ("stocks", "bonds"), ("an alligator", "a crocodile"), ("HTTP", "HTTPS"), ("a compiler", "an interpreter")]
_LANGS = ["French", "German", "Spanish", "Italian", "Chinese", "Japanese"]
_SENTENCES = ["The weather is beautiful today, so we decided to walk to the park.",
              "Please send me the report by Friday afternoon.", "I have been learning to play the piano for two years.",
              "The museum opens at nine o'clock and closes at six.", "Could you tell me where the train station is?",
              "Our team won the championship after a difficult season.", "She reads a book every week before bed.",
              "The restaurant on the corner serves excellent soup.", "We need to buy milk, bread and eggs.",
              "Technology has changed the way people communicate."]
_FORMS = ["poem", "story", "haiku", "letter", "blog post", "speech", "product description", "dialogue"]


def template_prompts(n: int, seed: int = 0, paragraphs: list[str] | None = None) -> list[str]:
    """n distinct hand-written instruction prompts (explanations, comparisons, creative writing,
    math word problems, translation, summarisation and questions about pydoc paragraphs), seeded.
    Distinct because a repeated prompt gets the same greedy answer: duplicates cost generation time
    and add no data (drawing with repeats, 2000 draws held only 942 distinct prompts). Fewer than n
    come back only when the templates run out of new prompts."""
    rng = random.Random(seed)
    paragraphs = paragraphs if paragraphs is not None else pydoc_paragraphs()

    def para():
        return rng.choice(paragraphs) if paragraphs else "Python is a programming language."

    makers = [
        lambda: f"Explain {rng.choice(_TOPICS)} in simple terms.",
        lambda: f"What is {rng.choice(_TOPICS)}? Give a short answer.",
        lambda: "What is the difference between {} and {}?".format(*rng.choice(_PAIRS)),
        lambda: f"Write a short {rng.choice(_FORMS)} about {rng.choice(_SUBJECTS)}.",
        lambda: f"List {rng.randint(3, 7)} tips for {rng.choice(['studying', 'cooking', 'saving money', 'sleeping better', 'writing clean code', 'public speaking'])}.",
        lambda: f"Translate the following sentence into {rng.choice(_LANGS)}: {rng.choice(_SENTENCES)}",
        lambda: f"Summarize the following text in two sentences:\n\n{para()}",
        lambda: f"Read the text below and explain what it describes.\n\n{para()}",
        lambda: f"Answer the question using the passage.\n\nPassage: {para()}\n\nQuestion: What is the main idea?",
        lambda: (lambda a, b, c: f"Tom has {a} apples. He buys {b} more and gives {c} to a friend. "
                 f"How many apples does he have now? Explain step by step.")(rng.randint(3, 40), rng.randint(2, 30),
                                                                            rng.randint(1, 5)),
        lambda: (lambda a, b: f"A train travels {a} km in {b} hours. What is its average speed? Show your work.")(
            rng.randint(60, 600), rng.randint(2, 8)),
        lambda: f"Write a Python function that {rng.choice(['reverses a string', 'checks if a number is prime', 'computes the factorial of n', 'counts the words in a sentence', 'finds the largest element of a list', 'merges two sorted lists'])}.",
        lambda: f"Give me a brief history of {rng.choice(_TOPICS)}.",
        lambda: f"Pretend you are a {rng.choice(['tour guide', 'chef', 'teacher', 'detective', 'pirate'])}. Introduce yourself.",
    ]
    out, seen = [], set()
    for _ in range(50 * n):  # the pydoc-based templates alone give thousands of distinct prompts
        if len(out) == n:
            break
        prompt = rng.choice(makers)()
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def training_prompts(n_templates: int, seed: int = 0, spec_bench: str | None = None) -> list[str]:
    """Train-allowed Spec-Bench first turns (if the file is available) + n_templates templates."""
    prompts = []
    try:
        prompts += first_turns(train_questions(spec_bench))
    except FileNotFoundError:
        pass
    return prompts + template_prompts(n_templates, seed)
