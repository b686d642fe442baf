"""BBH word_sorting, dyck_languages and object_counting, generated with exact answers."""

from __future__ import annotations

import random

__all__ = ["make_dyck", "make_object_counting", "make_word_sorting"]

WORDS = (
    "apple anchor badge bamboo canyon castle cobalt dagger desert echo ember falcon fabric garlic glacier harbor "
    "helmet igloo indigo jacket jungle kettle kernel ladder lantern magnet meadow nectar novel oyster orbit pepper "
    "pillow quartz quiver raven ribbon saddle silver tablet thistle umbrella uniform velvet violin walnut wander "
    "yonder yogurt zephyr zipper acorn bishop candle dolphin engine ferry gravel hollow island jigsaw kitten lemon "
    "marble napkin olive parrot quilt rocket sponge tunnel urchin vapor willow xylophone yeast zenith"
).split()


def make_word_sorting(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 9))
    return {"input": f"Sort the following words alphabetically: List: {' '.join(words)}", "target": " ".join(sorted(words))}


_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def make_dyck(rng: random.Random) -> dict:
    """A prefix with some brackets left open; the answer closes them in order."""
    sequence, stack = [], []
    for _ in range(rng.randint(3, 12)):
        if stack and rng.random() < 0.4:
            sequence.append(_PAIRS[stack.pop()])
        else:
            opener = rng.choice(list(_PAIRS))
            stack.append(opener)
            sequence.append(opener)
    if not stack:
        stack.append(rng.choice(list(_PAIRS)))
        sequence.append(stack[-1])
    closing = [_PAIRS[b] for b in reversed(stack)]
    return {
        "input": "Complete the rest of the sequence, making sure that the parentheses are closed properly. "
                 f"Input: {' '.join(sequence)}",
        "target": " ".join(closing),
        "rationale": f"Still open, innermost last: {' '.join(stack)}. Close them from the innermost out.",
    }


_CATEGORIES = {
    "fruits": ["apple", "banana", "peach", "plum", "grape", "orange", "nectarine", "strawberry"],
    "musical instruments": ["piano", "flute", "violin", "trumpet", "drum", "clarinet", "accordion", "trombone"],
    "animals": ["cat", "dog", "rabbit", "goat", "snake", "frog", "mouse", "donkey"],
    "vegetables": ["carrot", "onion", "potato", "cabbage", "lettuce head", "yam", "garlic", "celery stalk"],
}
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}


_PLURALS = {"mouse": "mice", "peach": "peaches", "potato": "potatoes"}


def _phrase(item: str, count: int) -> str:
    if count == 1:
        return f"{'an' if item[0] in 'aeiou' else 'a'} {item}"
    return f"{_NUMBER_WORDS[count]} {_PLURALS.get(item, item + 's')}"


def make_object_counting(rng: random.Random) -> dict:
    """Items of one asked-about category mixed with others; the answer counts only that category."""
    asked = rng.choice(list(_CATEGORIES))
    others = [c for c in _CATEGORIES if c != asked]
    held = [(item, rng.randint(1, 3), True) for item in rng.sample(_CATEGORIES[asked], rng.randint(2, 5))]
    held += [(item, rng.randint(1, 2), False) for item in rng.sample(_CATEGORIES[rng.choice(others)], rng.randint(0, 2))]
    rng.shuffle(held)
    listing = ", ".join(_phrase(item, n) for item, n, _ in held[:-1]) + f", and {_phrase(held[-1][0], held[-1][1])}"
    counted = [(item, n) for item, n, is_asked in held if is_asked]
    total = sum(n for _, n in counted)
    return {
        "input": f"I have {listing}. How many {asked} do I have?",
        "target": str(total),
        "rationale": " + ".join(f"{n} ({item})" for item, n in counted) + f" = {total}.",
    }
