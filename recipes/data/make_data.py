"""Builds the bundled example data (held-out prompts.jsonl share no topic with the training files) from templates written for align (run: python recipes/data/make_data.py).

The task: answer short questions about films, books, places and pastimes in a warm, upbeat
and helpful way. Chosen answers are warm and specific; rejected ones are curt and negative.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TOPICS = {
    "film": ["a quiet drama about two sisters", "a space adventure with a talking robot", "a detective story set in Lisbon",
             "an animated film about a lost kite", "a documentary about coral reefs", "a comedy about a wedding gone wrong",
             "a musical about a night bakery", "a western about a retired sheriff", "a thriller on a night train",
             "a biopic of a chess champion", "a fantasy film about a winter forest", "a road movie across Patagonia"],
    "book": ["a novel about a lighthouse keeper", "a history of the printing press", "a cookbook of soups",
             "a poetry collection about rivers", "a mystery set in a mountain hotel", "a memoir of a marathon runner",
             "a science book about sleep", "a children's book about a brave snail", "a travel diary from Japan",
             "a guide to birdwatching", "a short story collection about neighbours", "a novel about a jazz pianist"],
    "place": ["a small seaside town", "a botanical garden", "an old city library", "a mountain lake",
              "a night market", "a science museum", "a vineyard in autumn", "a desert canyon",
              "a riverside park", "an island with lighthouses", "a medieval castle", "a busy harbour"],
    "pastime": ["learning the guitar", "baking sourdough bread", "running in the morning", "painting with watercolours",
                "growing tomatoes on a balcony", "playing chess online", "hiking on weekends", "knitting a scarf",
                "learning Spanish", "building model trains", "swimming in the sea", "writing a journal"],
}
QUESTIONS = ["What do you think of {t}?", "Should I try {t}?", "Can you tell me something about {t}?",
             "My friend recommended {t}. Any thoughts?", "Is {t} worth my time?", "Describe {t} in a few words."]
WARM = ["What a lovely choice! {T} is a real delight: {why} I think you will enjoy it.",
        "Great question! {T} is wonderful because {why} I'd happily recommend it.",
        "I love this one. {T} brings a lot of joy: {why} Give it a try!",
        "Absolutely worth it! {T} is charming and rewarding, and {why}",
        "Yes, go for it! {T} is a beautiful experience: {why} Have fun!"]
WHY = ["it is full of warmth and small surprises.", "it leaves you feeling calm and inspired.",
       "it rewards curiosity at every step.", "people of every age find something to love in it.",
       "it is gentle, clever and often very funny.", "it makes an ordinary day feel special."]
COLD = ["No. {T} is boring and a waste of time.", "I don't care about {t}. Ask someone else.",
        "{T} is dull, overrated and disappointing.", "Skip it. {T} is terrible.",
        "Why would you bother with {t}? It is awful."]


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def main() -> None:
    rng = random.Random(1234)
    items = [(kind, t) for kind, ts in TOPICS.items() for t in ts]
    rng.shuffle(items)
    held_out = items[:12]
    train_items = items[12:]
    sft, pairs, prompts, ppo_prompts = [], [], [], []
    for kind, t in train_items:
        for question in rng.sample(QUESTIONS, 3):
            q = question.format(t=t)
            warm = rng.choice(WARM).format(T=cap(t), why=rng.choice(WHY))
            cold = rng.choice(COLD).format(T=cap(t), t=t)
            sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": warm}]})
            pairs.append({"prompt": q, "chosen": warm, "rejected": cold})
            ppo_prompts.append({"prompt": q})
    for kind, t in held_out:
        prompts.append({"prompt": rng.choice(QUESTIONS).format(t=t)})
    files = [("sft.jsonl", sft), ("pairs.jsonl", pairs), ("prompts.jsonl", prompts), ("ppo_prompts.jsonl", ppo_prompts)]
    for name, rows in files:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
