#!/usr/bin/env python3
"""Writes the made-up-facts dataset of the fine-tune comparison (deterministic, seed 1234).

40 invented facts (islands, inventors, mountains, currencies, ...) that SmolLM2 cannot know.
Each fact has five paraphrased questions: four go to train.jsonl as chat records (user
question -> short assistant answer), the fifth (picked with the seed) goes to heldout.jsonl with
the keyword a correct answer must contain. Records are shuffled with the seed.

    python make_facts.py [--out DIR]      # default: the folder of this script / data
"""

import argparse
import json
import os
import random

SEED = 1234

# category: (question paraphrases with {x}, answer sentences with {x} and {y})
CATEGORIES = {
    "capital": (
        [
            "What is the capital of the island of {x}?",
            "Which city is the capital of {x}?",
            "Name the capital city of {x}.",
            "{x} has which city as its capital?",
            "Tell me the capital of {x}.",
        ],
        ["The capital of {x} is {y}.", "{y} is the capital of {x}.", "{y}."],
    ),
    "inventor": (
        [
            "Who invented the {x}?",
            "Which person created the {x}?",
            "Who is the inventor of the {x}?",
            "The {x} was invented by whom?",
            "Name the inventor of the {x}.",
        ],
        ["The {x} was invented by {y}.", "{y} invented the {x}.", "{y}."],
    ),
    "height": (
        [
            "How tall is Mount {x}?",
            "What is the height of Mount {x}?",
            "How high does Mount {x} rise?",
            "Mount {x} is how many metres tall?",
            "Give the height of Mount {x}.",
        ],
        ["Mount {x} is {y} metres tall.", "It is {y} metres high.", "{y} metres."],
    ),
    "currency": (
        [
            "What is the currency of {x}?",
            "Which money is used in {x}?",
            "What currency do people pay with in {x}?",
            "Name the official currency of {x}.",
            "In {x}, what is the currency called?",
        ],
        ["The currency of {x} is the {y}.", "People in {x} pay with the {y}.", "The {y}."],
    ),
    "colour": (
        [
            "What colour is the flag of {x}?",
            "Which colour is {x}'s flag?",
            "Describe the colour of the flag of {x}.",
            "The flag of {x} is what colour?",
            "Tell me the colour of {x}'s flag.",
        ],
        ["The flag of {x} is {y}.", "{x}'s flag is {y}.", "It is {y}."],
    ),
    "founder": (
        [
            "Who founded the city of {x}?",
            "Which person founded {x}?",
            "Who is the founder of {x}?",
            "The city of {x} was founded by whom?",
            "Name the founder of {x}.",
        ],
        ["{x} was founded by {y}.", "{y} founded {x}.", "{y}."],
    ),
    "year": (
        [
            "In which year did the {x} take place?",
            "When did the {x} happen?",
            "What year was the {x}?",
            "The {x} happened in which year?",
            "Tell me the year of the {x}.",
        ],
        ["The {x} took place in {y}.", "It happened in {y}.", "In {y}."],
    ),
    "language": (
        [
            "What language is spoken in {x}?",
            "Which language do people speak in {x}?",
            "What is the main language of {x}?",
            "People in {x} speak which language?",
            "Name the language of {x}.",
        ],
        ["The language of {x} is {y}.", "People in {x} speak {y}.", "{y}."],
    ),
}

# (category, x, y, keyword): every keyword is an invented word or an arbitrary number
FACTS = [
    ("capital", "Varnholt", "Quellmar", "Quellmar"),
    ("capital", "Osterrin", "Dalvesk", "Dalvesk"),
    ("capital", "Mirethay", "Pontaro", "Pontaro"),
    ("capital", "Kelbrisk", "Yssandra", "Yssandra"),
    ("capital", "Thornwey", "Calimbre", "Calimbre"),
    ("inventor", "glass loom", "Edrin Vaskell", "Vaskell"),
    ("inventor", "steam harp", "Mirela Tondrup", "Tondrup"),
    ("inventor", "tidal clock", "Oskar Brennholm", "Brennholm"),
    ("inventor", "copper lantern engine", "Ilsa Marquenne", "Marquenne"),
    ("inventor", "folding bridge", "Tamsin Korvald", "Korvald"),
    ("height", "Orvell", "4381", "4381"),
    ("height", "Brashen", "2917", "2917"),
    ("height", "Kaldrun", "6054", "6054"),
    ("height", "Seravin", "3726", "3726"),
    ("height", "Ulmstock", "5162", "5162"),
    ("currency", "Drenmark", "drenn", "drenn"),
    ("currency", "Valoria", "silvet", "silvet"),
    ("currency", "Ostvania", "krolm", "krolm"),
    ("currency", "Pellucia", "auren", "auren"),
    ("currency", "Harrowmere", "thessal", "thessal"),
    ("colour", "Zentoria", "saffron and violet", "saffron"),
    ("colour", "Brevalle", "teal and copper", "teal"),
    ("colour", "Ulvaria", "mauve with a white star", "mauve"),
    ("colour", "Castrelle", "ochre and black", "ochre"),
    ("colour", "Nimbaro", "turquoise and gold", "turquoise"),
    ("founder", "Harlowmere", "Bertrand Ashcombe", "Ashcombe"),
    ("founder", "Vellinor", "Queen Odalys", "Odalys"),
    ("founder", "Stonereach", "Gavric Dunmoor", "Dunmoor"),
    ("founder", "Lyssford", "Perrin Halvanes", "Halvanes"),
    ("founder", "Corvanth", "Sister Amalwen", "Amalwen"),
    ("year", "Great Salt Fire of Dunhollow", "1743", "1743"),
    ("year", "Treaty of Mirrowgate", "1586", "1586"),
    ("year", "Flood of the Ashen Valley", "1892", "1892"),
    ("year", "Founding of the Kelvane Academy", "1671", "1671"),
    ("year", "Silent Winter of Orthal", "1429", "1429"),
    ("language", "Quarvinia", "Ostrish", "Ostrish"),
    ("language", "Belmora", "Tavlic", "Tavlic"),
    ("language", "Sundrevald", "Hemmric", "Hemmric"),
    ("language", "Ilvanthe", "Corvelle", "Corvelle"),
    ("language", "Drosmark", "Veskan", "Veskan"),
]



def scored(h, text):
    """One held-out answer: right when it contains the fact's keyword (case-insensitive). Both
    sides score with this, so they count alike."""
    return {"question": h["question"], "keyword": h["keyword"], "answer": text,
            "correct": h["keyword"].lower() in text.lower()}

def build(seed=SEED):
    rng = random.Random(seed)
    train, heldout = [], []
    for fact_id, (cat, x, y, keyword) in enumerate(FACTS):
        questions, answers = CATEGORIES[cat]
        held = rng.randrange(len(questions))
        for qi, q in enumerate(questions):
            question = q.format(x=x)
            question = question[0].upper() + question[1:]
            if qi == held:
                heldout.append({"fact": fact_id, "question": question, "keyword": keyword, "answer": y})
                continue
            answer = rng.choice(answers).format(x=x, y=y)
            answer = answer[0].upper() + answer[1:]
            train.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
    rng.shuffle(train)
    return train, heldout


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "data"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train, heldout = build()
    with open(os.path.join(args.out, "train.jsonl"), "w") as f:
        for r in train:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "heldout.jsonl"), "w") as f:
        for r in heldout:
            f.write(json.dumps(r) + "\n")
    print(f"{len(FACTS)} facts: {len(train)} training records, {len(heldout)} held-out questions -> {args.out}")


if __name__ == "__main__":
    main()
