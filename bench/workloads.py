"""What the benchmark sends: the request bodies of each workload, the same for every target.

- `random`: distinct prompts of about --prompt-tokens tokens drawn from a seeded word list, each starting with its own
  words, so no server's prefix cache gets a free lunch (only the chat template's few fixed tokens are shared, as
  they are for every user).
- `tutor`: a tutor conversation as the app sends it: a system prompt, 3-5 earlier turns of one of several sessions,
  then a new question. Requests of one session resend the same history, so a prefix cache may legitimately reuse
  it; that reuse is what this workload reports.

Each workload maps a request number to OpenAI-shaped messages ([{role, content}]); every door takes that shape
(FastAPI `/v1`, `vllm serve`, `llama-server`, Triton's `messages` input).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Messages = list[dict[str, str]]

# Plain words of a data-structures course and everyday English: varied enough that prompts share no long runs.
WORDS = """
array list stack queue heap tree graph node edge vertex path cycle root leaf branch depth height level order sort
merge quick bubble insertion selection radix bucket count search binary linear hash table bucket chain probe key
value pair map set bag index pointer reference memory cache page block disk file record field column row matrix
vector string char byte bit word number integer float prime factor divisor modulo sum product power log base
recursion iteration loop invariant proof induction case base step limit bound worst best average amortized cost
time space complexity constant linear quadratic cubic exponential factorial greedy dynamic programming divide
conquer backtrack branch prune memo table state transition choice optimal subproblem overlap interval schedule
knapsack coin change edit distance longest common subsequence shortest spanning minimum maximum flow cut match
trie suffix prefix segment fenwick union find disjoint rank parent child sibling ancestor descendant balanced red
black avl splay skip b plus rotation split join insert delete update query lookup scan traverse visit mark color
topological strongly connected component bridge articulation weight directed undirected dense sparse adjacency
river mountain window garden kitchen teacher student morning evening winter summer coffee bread music paper letter
yellow green purple orange silver quiet loud early late simple careful honest curious patient gentle brave clever
walk run jump write read listen speak build open close carry follow finish begin travel remember explain compare
""".split()  # noqa: SIM905 (a list literal of 250 words would be unreadable)

TUTOR_SYSTEM = (
    "You are a patient tutor for data structures and algorithms. Explain ideas step by step, give the time and "
    "space complexity of every algorithm you mention, use short Python examples when they help, and end with one "
    "question that checks the student's understanding."
)

# Earlier turns the sessions are made of (question, a short tutor answer), and the new questions that follow them.
TUTOR_TURNS = [
    ("What is a stack?", "A stack is a last-in, first-out collection: push and pop work at the top in O(1)."),
    ("And a queue?", "A queue is first-in, first-out: enqueue at the back, dequeue at the front, both O(1)."),
    ("How does a hash table find a key?", "It hashes the key to a bucket and searches that bucket: O(1) on average."),
    ("What happens on a collision?", "Chaining keeps a list per bucket; open addressing probes for a free slot."),
    ("Why is binary search O(log n)?", "Each comparison halves the sorted range, so about log2(n) steps remain."),
    ("What does a heap guarantee?", "Every parent is no larger than its children, so the minimum sits at the root."),
    ("How fast is heap insertion?", "O(log n): the new item sifts up at most the height of the tree."),
    ("What is a balanced tree?", "A tree whose height stays O(log n), such as an AVL or red-black tree."),
    ("When is merge sort better than quicksort?", "When you need a stable sort or a guaranteed O(n log n) worst case."),
    ("What is memoization?", "Caching each subproblem's answer so it is computed once: top-down dynamic programming."),
]
TUTOR_QUESTIONS = [
    "Can you compare the two with an example?",
    "What is the worst case, and when does it happen?",
    "How would I implement that in Python?",
    "Which one should I use for a job scheduler?",
    "Can you give me a practice problem on this?",
    "How much memory does that take for n items?",
]


@dataclass(frozen=True)
class Workload:
    """A named request generator: `messages(i)` is request i's conversation."""

    name: str
    description: str
    messages: Callable[[int], Messages]
    prefix_reuse: bool  # whether requests legitimately share a prefix (reported beside the figures)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 1.3 BPE tokens per English word) for when no tokenizer is given."""
    return round(len(text.split()) * 1.3)


def random_prompt(i: int, tokens: int, seed: int = 0, count: Callable[[str], int] = estimate_tokens) -> str:
    """Request i's prompt: seeded random words up to about `tokens` tokens (by `count`), distinct from the first
    word on for every i (the request number is spelled out first, then words from a generator seeded by i)."""
    rng = random.Random(f"{seed}:{i}")
    words = [f"Request {i}:"]
    # Grow in steps, then trim one word at a time: counting the whole text each time keeps it exact.
    while count(" ".join(words)) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(8))
    while len(words) > 1 and count(" ".join(words)) > tokens:
        words.pop()
    return " ".join(words) + ". Summarise these words in one paragraph."


def random_workload(tokens: int = 128, seed: int = 0, count: Callable[[str], int] = estimate_tokens) -> Workload:
    cache: dict[int, str] = {}

    def messages(i: int) -> Messages:
        if i not in cache:  # generated once per request number: a repeat sends the same text
            cache[i] = random_prompt(i, tokens, seed, count)
        return [{"role": "user", "content": cache[i]}]

    return Workload(
        "random", f"distinct random prompts of ~{tokens} tokens (no shared prefix)", messages, prefix_reuse=False
    )


def tutor_conversation(i: int, sessions: int = 8) -> Messages:
    """Request i: session i % sessions, which has 3-5 earlier turns (fixed per session), then a new question."""
    session = i % sessions
    rng = random.Random(f"tutor:{session}")
    turns = rng.sample(TUTOR_TURNS, 3 + session % 3)
    out: Messages = [{"role": "system", "content": TUTOR_SYSTEM}]
    for question, answer in turns:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    out.append({"role": "user", "content": TUTOR_QUESTIONS[(i // sessions) % len(TUTOR_QUESTIONS)]})
    return out


def tutor_workload(sessions: int = 8) -> Workload:
    return Workload(
        "tutor",
        f"a tutor conversation: system prompt + 3-5 earlier turns ({sessions} sessions), prefix reuse allowed",
        lambda i: tutor_conversation(i, sessions),
        prefix_reuse=True,
    )
