"""Writes the quickstart's small product-review sentiment set (train / eval / test JSON lines).

The sentences are composed from hand-written parts so that the set ships with llmtune and needs no
download. Eval and test use adjectives and products that never occur in training, so the before/after
accuracy measures what the pretrained encoder generalises, not memorised words.
Run: python recipes/data/reviews/make_reviews.py
"""

import json
import random
from pathlib import Path

TRAIN_PRODUCTS = ["blender", "phone case", "backpack", "desk lamp", "kettle", "keyboard", "jacket", "novel",
                  "coffee grinder", "tent", "headphones", "frying pan", "office chair", "board game"]
HELD_OUT_PRODUCTS = ["toaster", "umbrella", "water bottle", "mattress", "charger", "sneakers", "vacuum"]
TRAIN_GOOD = ["excellent", "sturdy", "reliable", "delightful", "well made", "comfortable", "fantastic",
              "worth every penny", "beautifully designed", "a joy to use"]
TRAIN_BAD = ["flimsy", "useless", "disappointing", "cheaply made", "unreliable", "awful", "overpriced",
             "a waste of money", "poorly designed", "a pain to use"]
HELD_OUT_GOOD = ["superb", "wonderful", "terrific", "solid", "impressive", "lovely"]
HELD_OUT_BAD = ["terrible", "dreadful", "shoddy", "horrible", "defective", "pathetic"]
TEMPLATES = [
    "The {p} is {a}.",
    "I bought this {p} last month and it is {a}.",
    "Honestly, this {p} turned out {a}.",
    "My new {p}? {A}.",
    "After a week of daily use the {p} feels {a}.",
    "Would I recommend this {p}? It is {a}.",
]
GOOD_ENDINGS = ["I would buy it again.", "Five stars.", "Very happy with it.", ""]
BAD_ENDINGS = ["I am returning it.", "One star.", "Avoid it.", ""]


def sentences(products, good, bad, count, rng):
    rows = []
    for i in range(count):
        label = "positive" if i % 2 == 0 else "negative"
        adjective = rng.choice(good if label == "positive" else bad)
        text = rng.choice(TEMPLATES).format(p=rng.choice(products), a=adjective, A=adjective.capitalize())
        ending = rng.choice(GOOD_ENDINGS if label == "positive" else BAD_ENDINGS)
        rows.append({"text": f"{text} {ending}".strip(), "label": label})
    rng.shuffle(rows)
    return rows


def main():
    rng = random.Random(0)
    folder = Path(__file__).parent
    splits = {
        "train": sentences(TRAIN_PRODUCTS, TRAIN_GOOD, TRAIN_BAD, 320, rng),
        "eval": sentences(HELD_OUT_PRODUCTS, HELD_OUT_GOOD, HELD_OUT_BAD, 120, rng),
        "test": sentences(HELD_OUT_PRODUCTS, HELD_OUT_GOOD, HELD_OUT_BAD, 20, rng),
    }
    for name, rows in splits.items():
        with open(folder / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
