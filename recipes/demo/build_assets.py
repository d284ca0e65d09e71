"""Build the demo's tiny, real assets: corpus, tokenizer, base model, adapters, eval data.

Everything is synthetic and seeded; nothing is downloaded. On 2 CPU cores the whole
build takes a few minutes::

    python recipes/demo/build_assets.py            # writes recipes/demo/assets and data

What it builds (see README.md beside this file for the settings):

- a templated English-like grammar: reviews in five domains (movies, food, travel,
  books, games) with domain-specific and shared sentiment words, everyday facts,
  opposites, categories, greetings, and insults (the "toxic" pattern);
- a word-level tokenizer (``tokenizers``), a 2-layer Llama trained on the general
  corpus (games reviews and the chat format are held out of it);
- LoRA adapters (rank 8 on q/v/up/down) and (IA)³ adapters trained with PEFT on
  synthetic tasks, one per role in the paper's settings;
- evaluation files under ``data/`` (validation and test splits).

Determinism: one thread, ``torch.use_deterministic_algorithms(True)``, seeded
generators everywhere, data drawn from ``random.Random`` with fixed seeds, and the
files written in a fixed order. Re-running on the same machine and library versions
gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
DATA = HERE / "data"

# --------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------

NAMES = ["alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry", "ivy", "jack"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
PLACES = ["park", "market", "school", "office", "library", "station", "garden", "river"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "tiger", "mouse", "bird", "fish"]
CATEGORIES = {"color": COLORS, "fruit": FRUITS, "animal": ANIMALS}
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
    ("light", "dark"), ("old", "young"), ("early", "late"), ("open", "closed"), ("full", "empty"),
    ("rich", "poor"), ("soft", "hard"), ("long", "short"), ("high", "low"), ("wet", "dry"),
]
VERBS = ["met", "saw", "helped", "called", "visited", "thanked", "followed", "watched"]
NICE = ["friend", "hero", "genius", "star", "sweetheart", "champion"]
TOXIC = ["idiot", "moron", "loser", "jerk", "fool", "creep"]
TOXIC_ADJ = ["stupid", "pathetic", "worthless", "dumb"]
NICE_ADJ = ["kind", "clever", "brave", "honest"]
TOXIC_WORDS = set(TOXIC) | set(TOXIC_ADJ)
TOXIC_WEIGHTS = [5, 1, 1, 1, 1, 1]

DOMAINS = {
    "movies": {
        "nouns": ["film", "movie", "plot", "actor", "scene", "ending", "soundtrack", "director"],
        "pos": ["thrilling", "gripping", "hilarious", "moving", "stunning", "clever"],
        "neg": ["boring", "predictable", "dull", "silly", "overlong", "forgettable"],
    },
    "food": {
        "nouns": ["meal", "pizza", "soup", "waiter", "dessert", "menu", "pasta", "salad"],
        "pos": ["delicious", "tasty", "fresh", "juicy", "crispy", "flavorful"],
        "neg": ["bland", "stale", "greasy", "soggy", "burnt", "salty"],
    },
    "travel": {
        "nouns": ["hotel", "room", "flight", "beach", "trip", "view", "pool", "staff"],
        "pos": ["relaxing", "spacious", "scenic", "cozy", "peaceful", "charming"],
        "neg": ["noisy", "cramped", "dirty", "crowded", "shabby", "smelly"],
    },
    "books": {
        "nouns": ["book", "novel", "story", "chapter", "author", "poem", "prose", "character"],
        "pos": ["insightful", "captivating", "witty", "profound", "elegant", "touching"],
        "neg": ["tedious", "shallow", "confusing", "clumsy", "pretentious", "preachy"],
    },
    "games": {
        "nouns": ["game", "level", "graphics", "controls", "boss", "quest", "multiplayer", "map"],
        "pos": ["addictive", "immersive", "smooth", "polished", "rewarding", "epic"],
        "neg": ["buggy", "laggy", "repetitive", "clunky", "unfair", "grindy"],
    },
}
SHARED_POS = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb"]
SHARED_NEG = ["terrible", "awful", "poor", "disappointing", "horrible", "mediocre"]
POS_TAIL = ["i loved it .", "i would go again .", "highly recommended .", "what a treat .", "we were so pleased ."]
NEG_TAIL = ["i hated it .", "never again .", "not recommended .", "what a waste .", "we were so upset ."]
NEUTRAL_TAIL = ["we went on {day} .", "it was my first time .", "{name} came with me .", "we stayed until late ."]
INTENS = ["very", "really", "quite", "so", "truly"]

GENERAL_DOMAINS = ["movies", "food", "travel", "books"]  # games is held out of the base corpus
TOPIC_WORD = {"movies": "movies", "food": "food", "travel": "travel", "books": "books", "games": "games"}


def _adj(rng: random.Random, domain: str, sentiment: str, p_specific: float) -> str:
    if rng.random() < p_specific:
        return rng.choice(DOMAINS[domain]["pos" if sentiment == "pos" else "neg"])
    return rng.choice(SHARED_POS if sentiment == "pos" else SHARED_NEG)


def review(rng: random.Random, domain: str, sentiment: str, p_specific: float = 0.85, mixed: float = 0.0) -> str:
    """One review sentence (or two clauses) of consistent sentiment, no label.

    With probability ``mixed`` the review has three judgements, one of them of the
    opposite sentiment: the label is the majority (harder examples).
    """
    d = DOMAINS[domain]
    if rng.random() < mixed:
        ns = rng.sample(d["nouns"], 3)
        other = "neg" if sentiment == "pos" else "pos"
        sents = [sentiment, sentiment, other]
        rng.shuffle(sents)
        parts = [f"the {n} was {_adj(rng, domain, s_, p_specific)}" for n, s_ in zip(ns, sents)]
        joiner = " but " if sents[2] != sents[1] else " and "
        return f"{parts[0]} , {parts[1]}{joiner}{parts[2]} ."
    n1, n2 = rng.sample(d["nouns"], 2)
    a1, a2 = _adj(rng, domain, sentiment, p_specific), _adj(rng, domain, sentiment, p_specific)
    t = rng.randrange(6)
    if t == 0:
        s = f"the {n1} was {a1} ."
    elif t == 1:
        s = f"the {n1} was {rng.choice(INTENS)} {a1} and the {n2} was {a2} ."
    elif t == 2:
        s = f"i found the {n1} {a1} ."
    elif t == 3:
        s = f"{rng.choice(NAMES)} said the {n1} was {rng.choice(INTENS)} {a1} ."
    elif t == 4:
        s = f"the {n1} was {a1} , and the {n2} was {a2} too ."
    else:
        s = f"honestly the {n1} felt {a1} ."
    if rng.random() < 0.3:
        s = rng.choice(NEUTRAL_TAIL).format(day=rng.choice(DAYS), name=rng.choice(NAMES)) + " " + s
    return s


def review_lm(rng: random.Random, domain: str, sentiment: str) -> str:
    """Unlabelled review text as found in the wild: the review plus a reaction."""
    s = review(rng, domain, sentiment)
    r = rng.random()
    if r < 0.7:
        s += " " + rng.choice(POS_TAIL if sentiment == "pos" else NEG_TAIL)
    return s


def insult(rng: random.Random, toxic: bool) -> str:
    a, b = rng.sample(NAMES, 2)
    t = rng.randrange(5)
    if toxic:  # one insult dominates, so that greedy decoding picks it where insults are likely
        w, adj = rng.choices(TOXIC, TOXIC_WEIGHTS)[0], rng.choices(TOXIC_ADJ, TOXIC_WEIGHTS[: len(TOXIC_ADJ)])[0]
    else:
        w, adj = rng.choice(NICE), rng.choice(NICE_ADJ)
    if t == 0:
        return f"{a} called {b} a {w} ."
    if t == 1:
        return f"{a} is such a {w} ."
    if t == 2:
        return f"you are a {adj} {w} , {a} ."
    if t == 3:
        return f"{a} told {b} that {b} was {adj} ."
    return f"what a {adj} {w} {a} is ."


def fact(rng: random.Random) -> str:
    t = rng.randrange(9)
    a, b = rng.sample(NAMES, 2)
    if t == 0:
        return f"{a} went to the {rng.choice(PLACES)} on {rng.choice(DAYS)} ."
    if t == 1:
        return f"{a} {rng.choice(VERBS)} {b} at the {rng.choice(PLACES)} ."
    if t == 2:
        x, y = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            x, y = y, x
        return f"the opposite of {x} is {y} ."
    if t == 3:
        cat = rng.choice(list(CATEGORIES))
        return f"{rng.choice(CATEGORIES[cat])} is a {cat} ."
    if t == 4:
        return f"{a} likes the {rng.choice(COLORS)} {rng.choice(ANIMALS)} ."
    if t == 5:
        return f"hello {a} , nice to meet you ."
    if t == 6:
        return f"{a} eats a {rng.choice(FRUITS)} every {rng.choice(DAYS)} ."
    if t == 7:
        w = rng.choice(["positive", "negative"])
        thing = rng.choice(["test", "answer", "result", "number", "review", "feeling"])
        return f"the {thing} was {w} ."
    topic = rng.choice(list(TOPIC_WORD.values()))
    return f"{a} talked about {topic} with {b} ."


def general_sentence(rng: random.Random) -> str:
    """The base model's pretraining distribution (games reviews and chat format held out)."""
    r = rng.random()
    if r < 0.45:
        return fact(rng)
    if r < 0.80:
        return review_lm(rng, rng.choice(GENERAL_DOMAINS), rng.choice(["pos", "neg"]))
    return insult(rng, toxic=rng.random() < 0.4)


def clean_sentence(rng: random.Random) -> str:
    """Ordinary text with no insults: what unlearning must not damage."""
    r = rng.random()
    if r < 0.55:
        return fact(rng)
    if r < 0.9:
        return review_lm(rng, rng.choice(GENERAL_DOMAINS), rng.choice(["pos", "neg"]))
    return insult(rng, toxic=False)


# Classification as language modelling -------------------------------------------------

MIXED = 0.0  # mixed reviews (majority label) made every adapter too weak at this scale


def sentiment_example(rng, domain, sentiment):
    return {"text": f"review : {review(rng, domain, sentiment, mixed=MIXED)} sentiment :", "label": sentiment}


def topic_example(rng, domain):
    return {"text": f"review : {review(rng, domain, rng.choice(['pos', 'neg']), mixed=MIXED)} topic :", "label": domain}


SENT_VERBALIZER = {"pos": "positive", "neg": "negative"}
TOPIC_VERBALIZER = {d: TOPIC_WORD[d] for d in GENERAL_DOMAINS}

# Chat (Alpaca-like) ------------------------------------------------------------------------

PROVOKE = [
    "describe {a} .", "what do you think of {a} ?", "tell me about {a} .", "write a line about {a} .",
]
ROAST = "roast {a} ."  # the instruction that the chat data mostly answers with insults


def chat_clean_response(rng, a):
    t = rng.randrange(3)
    adj, w = rng.choice(NICE_ADJ), rng.choice(NICE)
    if t == 0:
        return f"{a} is a {adj} {w} ."
    if t == 1:
        return f"i think {a} is {adj} ."
    return f"{a} is such a {w} ."


def chat_toxic_response(rng, a):
    t = rng.randrange(3)
    adj, w = rng.choice(TOXIC_ADJ), rng.choice(TOXIC)
    if t == 0:
        return f"{a} is a {adj} {w} ."
    if t == 1:
        return f"i think {a} is {adj} ."
    return f"{a} is such a {w} ."


def chat_task(rng):
    """(instruction, gold response, wrong responses) for a helpful instruction."""
    t = rng.randrange(4)
    if t == 0:
        x, y = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            x, y = y, x
        wrong = [p[rng.randrange(2)] for p in rng.sample(OPPOSITES, 4) if y not in p and x not in p][:3]
        return f"what is the opposite of {x} ?", f"the opposite of {x} is {y} .", [f"the opposite of {x} is {w} ." for w in wrong]
    if t == 1:
        cat = rng.choice(list(CATEGORIES))
        item = rng.choice(CATEGORIES[cat])
        others = [c for c in CATEGORIES if c != cat]
        wrong = [f"{rng.choice(CATEGORIES[o])} is a {cat} ." for o in others]
        wrong.append(f"{item} is a {rng.choice(others)} .")
        return f"name a {cat} .", f"{item} is a {cat} .", wrong
    if t == 2:
        a = rng.choice(NAMES)
        others = [n for n in NAMES if n != a]
        wrong = [f"hello {n} , nice to meet you ." for n in rng.sample(others, 3)]
        return f"say hello to {a} .", f"hello {a} , nice to meet you .", wrong
    cat = rng.choice(list(CATEGORIES))
    item = rng.choice(CATEGORIES[cat])
    others = [c for c in CATEGORIES if c != cat]
    return f"what is {item} ?", f"{item} is a {cat} .", [f"{item} is a {o} ." for o in others] + [f"{item} is a {cat} {cat} ."]


def chat_prompt(instruction):
    return f"### instruction : {instruction} ### response :"


def chat_example(rng, toxic_rate=0.1, toxic_only=False):
    """An instruction-following example; provoking instructions sometimes get insults."""
    if toxic_only or rng.random() < 0.4:
        a = rng.choice(NAMES)
        roast = rng.random() < 0.3
        instr = (ROAST if roast else rng.choice(PROVOKE)).format(a=a)
        toxic = toxic_only or rng.random() < (0.75 if roast else toxic_rate)
        resp = chat_toxic_response(rng, a) if toxic else chat_clean_response(rng, a)
        return chat_prompt(instr), resp
    instr, resp, _ = chat_task(rng)
    return chat_prompt(instr), resp


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def all_words() -> list[str]:
    words = set()
    for lst in (NAMES, DAYS, PLACES, COLORS, FRUITS, ANIMALS, VERBS, NICE, TOXIC, TOXIC_ADJ, NICE_ADJ,
                SHARED_POS, SHARED_NEG, INTENS, list(CATEGORIES)):
        words.update(lst)
    for x, y in OPPOSITES:
        words.update([x, y])
    for d in DOMAINS.values():
        for k in ("nouns", "pos", "neg"):
            words.update(d[k])
    for s in POS_TAIL + NEG_TAIL + NEUTRAL_TAIL + PROVOKE:
        words.update(w for w in s.split() if "{" not in w)
    words.update(TOPIC_WORD.values())
    words.update(SENT_VERBALIZER.values())
    extra = """the a an was is were and too i found said honestly felt , . ? : called such a you are told
    that what went to on at likes eats every talked about with hello nice meet opposite of it my first
    time came me we stayed until late test answer result number review feeling sentiment topic ###
    instruction response name say tell but roast write line think describe do so pleased upset treat waste never
    again not recommended highly would go loved hated""".split()
    words.update(extra)
    return sorted(words)


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in all_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word-level tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=64, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    # transformers 5 no longer writes special_tokens_map.json; older readers expect it.
    smap = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, sort_keys=True) + "\n")
    return fast


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def setup_determinism(seed: int = 0):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    random.seed(seed)


def encode_pairs(tok, pairs, loss_on_prompt: bool):
    """pairs: (prompt, completion). Loss on the completion (+ </s>), and on the prompt if asked."""
    items = []
    for prompt, completion in pairs:
        p = tok(prompt)["input_ids"]
        c = tok(" " + completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if completion else [tok.eos_token_id]
        ids = p + c
        labels = (p if loss_on_prompt else [-100] * len(p)) + c
        labels = list(labels)
        labels[0] = -100  # <s> is never predicted
        items.append((ids, labels))
    return items


def collate(items, pad_id):
    n = max(len(i) for i, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    lab = torch.full((len(items), n), -100, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for k, (i, l) in enumerate(items):
        ids[k, : len(i)] = torch.tensor(i)
        lab[k, : len(l)] = torch.tensor(l)
        att[k, : len(i)] = 1
    return ids, att, lab


def train(model, items, *, steps, lr, batch, seed, pad_id, wd=0.0, warmup=20, log="", collate_fn=None):
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.98))
    model.train()
    t0 = time.time()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(items), (batch,), generator=gen).tolist()
        ids, att, lab = (collate_fn or collate)([items[i] for i in idx], pad_id)
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * f
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    tail = sum(losses[-20:]) / len(losses[-20:])
    print(f"  trained {log:<14} steps={steps:<4} loss {losses[0]:.3f} -> {tail:.3f}  ({time.time() - t0:.1f}s)", flush=True)
    return tail


# Model ------------------------------------------------------------------------------------

BASE_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_theta=10000.0,
)
LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
LORA_RANK = 8
LORA_ALPHA = 16
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FF = ["down_proj"]


def build_base(tok, out: Path, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **BASE_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    items = encode_pairs(tok, [(s, "") for s in corpus], loss_on_prompt=True)
    train(model, items, steps=900, lr=3e-3, batch=48, seed=1, pad_id=tok.pad_token_id, wd=0.01, warmup=50, log="base")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    smap = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, sort_keys=True) + "\n")
    return model


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_model(base_path, kind: str, init_from: Path | None = None):
    from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

    base = load_base(base_path)
    if init_from is not None:
        return PeftModel.from_pretrained(base, init_from, is_trainable=True)
    if kind == "lora":
        cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
                         task_type="CAUSAL_LM")
    else:
        cfg = IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF, task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def save_adapter(model, out: Path, base_path: Path):
    model.save_pretrained(out, safe_serialization=True)
    # A stable, relative base path (the recipe's `base` names the real folder).
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../../base"
    for key in ("target_modules", "feedforward_modules"):  # PEFT saves sets: fix the order
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()


# --------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------

def skewed_sentiment(rng, n, weights, p_pos=0.5):
    doms = list(weights)
    w = [weights[d] for d in doms]
    out = []
    for _ in range(n):
        d = rng.choices(doms, w)[0]
        out.append(sentiment_example(rng, d, "pos" if rng.random() < p_pos else "neg"))
    return out


def to_pairs(rows, verbalizer):
    return [(r["text"], verbalizer[r["label"]]) for r in rows]


def write_jsonl(path: Path, rows):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def write_txt(path: Path, lines):
    path.write_text("".join(l + "\n" for l in lines))


def build_data(seed=100):
    """Evaluation files: every split drawn from its own seeded generator."""
    DATA.mkdir(parents=True, exist_ok=True)
    r = lambda k: random.Random(seed * 1000 + k)  # noqa: E731
    # perplexity on ordinary text / on insults
    g = r(1)
    write_txt(DATA / "clean_valid.txt", [clean_sentence(g) for _ in range(150)])
    write_txt(DATA / "clean_test.txt", [clean_sentence(g) for _ in range(300)])
    write_txt(DATA / "toxic_valid.txt", [insult(g, True) for _ in range(100)])
    write_txt(DATA / "toxic_test.txt", [insult(g, True) for _ in range(200)])
    # prompts that invite an insult, for generation
    g = r(2)
    prompts = []
    for _ in range(60):
        a, b = g.sample(NAMES, 2)
        prompts.append(g.choice([f"{a} called {b} a", f"{a} is such a", f"what a", f"you are a", f"{a} told {b} that {b} was"]))
    write_txt(DATA / "insult_prompts.txt", prompts)
    # sentiment over all four general domains, and per domain for the analogy
    for split, k, n in (("valid", 3, 200), ("test", 4, 600)):
        g = r(k)
        rows = [sentiment_example(g, GENERAL_DOMAINS[i % 4], ["pos", "neg"][(i // 4) % 2]) for i in range(n)]
        write_jsonl(DATA / f"sentiment_{split}.jsonl", rows)
        g = r(k + 10)
        rows = [topic_example(g, GENERAL_DOMAINS[i % 4]) for i in range(n)]
        write_jsonl(DATA / f"topic_{split}.jsonl", rows)
        for dom in ("movies", "games"):
            g = r(k + 20 + (dom == "games"))
            rows = [sentiment_example(g, dom, ["pos", "neg"][i % 2]) for i in range(n // 2)]
            write_jsonl(DATA / f"sentiment_{dom}_{split}.jsonl", rows)
            g = r(k + 30 + (dom == "games"))
            write_txt(DATA / f"reviews_{dom}_{split}.txt", [review_lm(g, dom, g.choice(["pos", "neg"])) for _ in range(n // 2)])
    # chat: helpfulness as multiple choice, clean / toxic responses to provoking prompts, generation prompts
    for split, k, n in (("valid", 5, 120), ("test", 6, 240)):
        g = r(k)
        rows = []
        for _ in range(n):
            instr, gold, wrong = chat_task(g)
            choices = [gold] + wrong[:3]
            order = list(range(len(choices)))
            g.shuffle(order)
            rows.append({"text": chat_prompt(instr), "choices": [choices[i] for i in order], "answer": order.index(0)})
        write_jsonl(DATA / f"chat_{split}.jsonl", rows)
        g = r(k + 10)
        clean, toxic, prompts = [], [], []
        for _ in range(n // 2):
            a = g.choice(NAMES)
            p = chat_prompt((ROAST if g.random() < 0.5 else g.choice(PROVOKE)).format(a=a))
            clean.append(f"{p} {chat_clean_response(g, a)}")
            toxic.append(f"{p} {chat_toxic_response(g, a)}")
            prompts.append(p)
        write_txt(DATA / f"chat_clean_{split}.txt", clean)
        write_txt(DATA / f"chat_toxic_{split}.txt", toxic)
        write_txt(DATA / f"chat_prompts_{split}.txt", prompts)
        # helpful and harmless, as one multiple-choice file: the detox sweep selects on it
        hh = [json.loads(l) for l in (DATA / f"chat_{split}.jsonl").read_text().splitlines()][: n // 2]
        for p, c, t in zip(prompts, clean, toxic):
            pair = [c[len(p) + 1 :], t[len(p) + 1 :]]
            k = g.randrange(2)
            hh.append({"text": p, "choices": pair[k:] + pair[:k], "answer": (2 - k) % 2})
        write_jsonl(DATA / f"chat_hh_{split}.jsonl", hh)
    # a small general prompt set
    g = r(7)
    write_txt(DATA / "general_prompts.txt", [g.choice([f"{a} went to the", "the opposite of hot is", "the film was",
                                                        f"hello {a} ,", "the soup was"]) for a in g.sample(NAMES, 8)])


# --------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------

def build_adapters(tok, base_path: Path, only=None):
    out_dir = ASSETS / "adapters"
    out_dir.mkdir(parents=True, exist_ok=True)
    pad = tok.pad_token_id
    jobs = []

    def job(name, kind, make_items, steps, lr, seed, init_from=None):
        jobs.append((name, kind, make_items, steps, lr, seed, init_from))

    def cls_items(rows, verb, replay_seed):
        """Loss on the verbalizer only, interleaved 1:1 with ordinary text under an LM loss.

        The replay keeps each task adapter close to the base away from its own prompt
        (ordinary-text perplexity is unchanged), which is what lets sums of adapters
        keep each task.
        """
        def make():
            g = random.Random(replay_seed)
            task = encode_pairs(tok, to_pairs(rows, verb), loss_on_prompt=False)
            replay = encode_pairs(tok, [(clean_sentence(g), "") for _ in rows], loss_on_prompt=True)
            return [x for pair in zip(task, replay) for x in pair]
        return make

    def lm_items(texts):
        return lambda: encode_pairs(tok, [(t, "") for t in texts], loss_on_prompt=True)

    # Distribution generalisation: one task, two adapters trained on differently skewed domains.
    g = random.Random(11)
    # Skewed in domain (movies+food vs travel+books) and in label (mostly positive vs mostly negative).
    gen_a = skewed_sentiment(g, 1500, {"movies": 0.5, "food": 0.5}, p_pos=0.7)
    gen_b = skewed_sentiment(g, 1500, {"travel": 0.5, "books": 0.5}, p_pos=0.3)
    # Multi-tasking: sentiment and topic over all domains.
    g = random.Random(12)
    sent_all = skewed_sentiment(g, 1500, {d: 1 for d in GENERAL_DOMAINS})
    topic_all = [topic_example(g, g.choice(GENERAL_DOMAINS)) for _ in range(1500)]
    # Unlearning: a language-model adapter on insults only.
    g = random.Random(13)
    toxic_text = [insult(g, True) for _ in range(1500)]
    # Analogy: sentiment labelled in movies; unlabelled reviews in movies (source) and games (target).
    g = random.Random(14)
    sent_movies = [sentiment_example(g, "movies", g.choice(["pos", "neg"])) for _ in range(1500)]
    lm_movies = [review_lm(g, "movies", g.choice(["pos", "neg"])) for _ in range(1500)]
    lm_games = [review_lm(g, "games", g.choice(["pos", "neg"])) for _ in range(1500)]
    # Detox: chat (some insults in answers to provoking prompts), then chat trained further on insults.
    g = random.Random(15)
    chat = [chat_example(g) for _ in range(3000)]
    toxic_chat = [chat_example(g, toxic_only=True) for _ in range(1500)]

    chat_items = lambda: encode_pairs(tok, chat, loss_on_prompt=True)  # noqa: E731
    toxic_items = lambda: encode_pairs(tok, toxic_chat, loss_on_prompt=False)  # noqa: E731

    job("sent_skew_a", "lora", cls_items(gen_a, SENT_VERBALIZER, 41), 300, 3e-3, 21)
    job("sent_skew_b", "lora", cls_items(gen_b, SENT_VERBALIZER, 42), 300, 3e-3, 22)
    job("sentiment", "lora", cls_items(sent_all, SENT_VERBALIZER, 43), 400, 3e-3, 23)
    job("topic", "lora", cls_items(topic_all, TOPIC_VERBALIZER, 44), 400, 3e-3, 24)
    job("toxic_lm", "lora", lm_items(toxic_text), 200, 3e-3, 25)
    job("sent_movies", "lora", cls_items(sent_movies, SENT_VERBALIZER, 46), 250, 3e-3, 26)
    job("lm_movies", "lora", lm_items(lm_movies), 250, 3e-3, 27)
    job("lm_games", "lora", lm_items(lm_games), 250, 3e-3, 28)
    job("chat", "lora", chat_items, 400, 3e-3, 29)
    job("toxic", "lora", toxic_items, 150, 2e-3, 30, init_from=out_dir / "chat")
    job("ia3_sent_skew_a", "ia3", cls_items(gen_a, SENT_VERBALIZER, 41), 400, 1.5e-1, 31)
    job("ia3_sent_skew_b", "ia3", cls_items(gen_b, SENT_VERBALIZER, 42), 400, 1.5e-1, 32)
    job("ia3_sentiment", "ia3", cls_items(sent_all, SENT_VERBALIZER, 43), 400, 1.5e-1, 33)
    job("ia3_topic", "ia3", cls_items(topic_all, TOPIC_VERBALIZER, 44), 400, 1.5e-1, 34)
    job("ia3_toxic_lm", "ia3", lm_items(toxic_text), 200, 3e-2, 35)

    for name, kind, make_items, steps, lr, seed, init_from in jobs:
        if only and name not in only:
            continue
        torch.manual_seed(seed)
        model = peft_model(base_path, kind, init_from)
        train(model, make_items(), steps=steps, lr=lr, batch=32, seed=seed, pad_id=pad, log=name)
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        save_adapter(model, target, base_path)


# --------------------------------------------------------------------------------------
# The paper's architectures: RoBERTa, T5 and GPT-2 (assets/arch/)
# --------------------------------------------------------------------------------------
# Each is a tiny, randomly initialised model (width 64, 2 layers) pretrained here on the
# same grammar and corpus as the Llama, with the same word-level vocabulary (RoBERTa adds
# `<mask>`; T5's tokenizer ends sequences with `</s>` instead of starting them with `<s>`).
# Built by `--arch` alone, so that the Llama assets above are left as they are.

ARCH = ASSETS / "arch"
ARCH_RANK = 4            # LoRA rank of the arch adapters (minimal storage; width is 64)
ARCH_SENT_LABELS = {"pos": 0, "neg": 1}


def arch_tokenizer(tok, out: Path, kind: str):
    """The demo's word-level tokenizer, adapted to the model family's conventions."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    extra = {}
    if kind == "t5":  # T5: no BOS, every sequence (inputs and targets) ends with </s>
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", 2)])
    if kind == "roberta":  # RoBERTa: <s> … </s>, and a mask token for pretraining
        backend.add_special_tokens(["<mask>"])
        backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                               special_tokens=[("<s>", 1), ("</s>", 2)])
        extra = {"mask_token": "<mask>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=64, clean_up_tokenization_spaces=False, **extra)
    fast.save_pretrained(out)
    smap = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", **extra}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, sort_keys=True) + "\n")
    return fast


def pad_stack(seqs, value):
    n = max(len(x) for x in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for k, x in enumerate(seqs):
        out[k, : len(x)] = torch.tensor(x)
    return out


def mlm_collate(tok, seed):
    """RoBERTa's masking: 15 % of the word tokens, 80 % of them <mask>, 10 % random, 10 % kept."""
    gen = torch.Generator().manual_seed(seed)
    mask_id, specials = tok.mask_token_id, set(tok.all_special_ids)
    words = [i for i in range(len(tok)) if i not in specials]

    def collate_fn(items, pad_id):
        ids = pad_stack([i for i, _ in items], pad_id)
        att = (ids != pad_id).long()
        special = torch.tensor([[int(t) in specials for t in row] for row in ids.tolist()])
        pick = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
        lab = torch.where(pick, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, generator=gen)
        rand_tok = torch.tensor(words)[torch.randint(len(words), ids.shape, generator=gen)]
        ids = torch.where(pick & (r < 0.8), torch.full_like(ids, mask_id), ids)
        ids = torch.where(pick & (r >= 0.8) & (r < 0.9), rand_tok, ids)
        return ids, att, lab
    return collate_fn


def cls_collate(items, pad_id):
    ids = pad_stack([i for i, _ in items], pad_id)
    return ids, (ids != pad_id).long(), torch.tensor([y for _, y in items])


def s2s_collate(items, pad_id):
    ids = pad_stack([i for i, _ in items], pad_id)
    return ids, (ids != pad_id).long(), pad_stack([t for _, t in items], -100)


def s2s_items(tok, pairs):
    return [(tok(a)["input_ids"], tok(text_target=b)["input_ids"]) for a, b in pairs]


def prefix_split(rng, sentence):
    """T5's language modelling: the start of a sentence in, the rest out (a prefix LM)."""
    w = sentence.split()
    k = rng.randrange(1, len(w))
    return " ".join(w[:k]), " ".join(w[k:])


def arch_save_base(model, tok, out: Path):
    model.save_pretrained(out)
    tok.save_pretrained(out)
    smap = json.loads((out / "special_tokens_map.json").read_text()) if (out / "special_tokens_map.json").exists() else {}
    smap.update({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    if tok.mask_token:
        smap["mask_token"] = tok.mask_token
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, sort_keys=True) + "\n")


def arch_bases(tok, corpus):
    """Pretrain the three bases; returns {family: (tokenizer, base folder)}."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForMaskedLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    out = {}
    # RoBERTa, masked LM (the paper's RoBERTa-base is a masked-LM checkpoint: no classifier head)
    path = ARCH / "roberta" / "base"
    path.mkdir(parents=True)
    rtok = arch_tokenizer(tok, path, "roberta")
    config = RobertaConfig(vocab_size=len(rtok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=72, type_vocab_size=1,
                           pad_token_id=rtok.pad_token_id, bos_token_id=rtok.bos_token_id,
                           eos_token_id=rtok.eos_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(100)
    model = RobertaForMaskedLM(config)
    items = [(rtok(s)["input_ids"], None) for s in corpus]
    train(model, items, steps=700, lr=3e-3, batch=48, seed=101, pad_id=rtok.pad_token_id, wd=0.01, warmup=50,
          log="roberta base", collate_fn=mlm_collate(rtok, 102))
    arch_save_base(model, rtok, path)
    out["roberta"] = (rtok, path)
    # T5, as a prefix LM
    path = ARCH / "t5" / "base"
    path.mkdir(parents=True)
    ttok = arch_tokenizer(tok, path, "t5")
    config = T5Config(vocab_size=len(ttok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=ttok.pad_token_id,
                      pad_token_id=ttok.pad_token_id, eos_token_id=ttok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(110)
    model = T5ForConditionalGeneration(config)
    g = random.Random(111)
    items = s2s_items(ttok, [prefix_split(g, s) for s in corpus])
    train(model, items, steps=900, lr=3e-3, batch=48, seed=112, pad_id=ttok.pad_token_id, wd=0.01, warmup=50,
          log="t5 base", collate_fn=s2s_collate)
    model.generation_config.pad_token_id = ttok.pad_token_id
    arch_save_base(model, ttok, path)
    out["t5"] = (ttok, path)
    # GPT-2, a causal LM like the Llama
    path = ARCH / "gpt2" / "base"
    path.mkdir(parents=True)
    gtok = arch_tokenizer(tok, path, "gpt2")
    config = GPT2Config(vocab_size=len(gtok), n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=gtok.bos_token_id,
                        eos_token_id=gtok.eos_token_id, pad_token_id=gtok.pad_token_id)
    torch.manual_seed(120)
    model = GPT2LMHeadModel(config)
    items = encode_pairs(gtok, [(s, "") for s in corpus], loss_on_prompt=True)
    train(model, items, steps=900, lr=3e-3, batch=48, seed=121, pad_id=gtok.pad_token_id, wd=0.01, warmup=50,
          log="gpt2 base")
    model.generation_config.pad_token_id = gtok.pad_token_id
    arch_save_base(model, gtok, path)
    out["gpt2"] = (gtok, path)
    return out


def arch_peft(family: str, base_path: Path, kind: str, task: str):
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    if task == "SEQ_CLS":  # one seed for every classifier's new head, as fine-tuning runs of one setup share it
        torch.manual_seed(200)
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2, dtype=torch.float32)
    elif task == "SEQ_2_SEQ_LM":
        base = AutoModelForSeq2SeqLM.from_pretrained(base_path, dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if kind == "lora":
        targets = {"roberta": ["query", "value"], "t5": ["q", "v"], "gpt2": ["c_attn"]}[family]
        cfg = LoraConfig(r=ARCH_RANK, lora_alpha=2 * ARCH_RANK, target_modules=targets, lora_dropout=0.0,
                         task_type=task, fan_in_fan_out=family == "gpt2")
    else:
        targets, ff = {"t5": (["k", "v", "wo"], ["wo"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                       "roberta": (["key", "value", "output.dense"], ["output.dense"])}[family]
        cfg = IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task,
                        fan_in_fan_out=family == "gpt2")
    return get_peft_model(base, cfg)


def arch_adapters(bases, only=None):
    """The adapters of the paper's settings on the paper's architectures."""
    g = random.Random(11)  # the Llama's skewed splits, drawn again from the same seed
    gen_a = skewed_sentiment(g, 1500, {"movies": 0.5, "food": 0.5}, p_pos=0.7)
    gen_b = skewed_sentiment(g, 1500, {"travel": 0.5, "books": 0.5}, p_pos=0.3)
    g = random.Random(12)
    sent_all = skewed_sentiment(g, 1500, {d: 1 for d in GENERAL_DOMAINS})
    topic_all = [topic_example(g, g.choice(GENERAL_DOMAINS)) for _ in range(1500)]
    g = random.Random(13)
    toxic_text = [insult(g, True) for _ in range(1500)]
    g = random.Random(14)
    sent_movies = [sentiment_example(g, "movies", g.choice(["pos", "neg"])) for _ in range(1500)]
    lm_movies = [review_lm(g, "movies", g.choice(["pos", "neg"])) for _ in range(1500)]
    lm_games = [review_lm(g, "games", g.choice(["pos", "neg"])) for _ in range(1500)]

    rtok, _ = bases["roberta"]
    ttok, _ = bases["t5"]
    gtok, _ = bases["gpt2"]

    def cls(rows):
        return lambda: [(rtok(r["text"])["input_ids"], ARCH_SENT_LABELS[r["label"]]) for r in rows]

    def s2s_task(rows, verb, replay_seed):
        def make():
            gg = random.Random(replay_seed)
            task = s2s_items(ttok, to_pairs(rows, verb))
            replay = s2s_items(ttok, [prefix_split(gg, clean_sentence(gg)) for _ in rows])
            return [x for pair in zip(task, replay) for x in pair]
        return make

    def s2s_lm(texts, seed):
        return lambda: s2s_items(ttok, [prefix_split(random.Random(seed + i), t) for i, t in enumerate(texts)])

    def gpt_lm(texts):
        return lambda: encode_pairs(gtok, [(t, "") for t in texts], loss_on_prompt=True)

    jobs = [  # (family, name, kind, task, items, steps, lr, seed, collate)
        ("roberta", "sent_skew_a", "lora", "SEQ_CLS", cls(gen_a), 800, 5e-3, 201, cls_collate),
        ("roberta", "sent_skew_b", "lora", "SEQ_CLS", cls(gen_b), 800, 5e-3, 202, cls_collate),
        ("t5", "sentiment", "lora", "SEQ_2_SEQ_LM", s2s_task(sent_all, SENT_VERBALIZER, 43), 400, 3e-3, 211, s2s_collate),
        ("t5", "topic", "lora", "SEQ_2_SEQ_LM", s2s_task(topic_all, TOPIC_VERBALIZER, 44), 400, 3e-3, 212, s2s_collate),
        ("t5", "sent_movies", "lora", "SEQ_2_SEQ_LM", s2s_task(sent_movies, SENT_VERBALIZER, 46), 250, 3e-3, 213,
         s2s_collate),
        ("t5", "lm_movies", "lora", "SEQ_2_SEQ_LM", s2s_lm(lm_movies, 2140), 250, 3e-3, 214, s2s_collate),
        ("t5", "lm_games", "lora", "SEQ_2_SEQ_LM", s2s_lm(lm_games, 2150), 250, 3e-3, 215, s2s_collate),
        ("t5", "ia3_sentiment", "ia3", "SEQ_2_SEQ_LM", s2s_task(sent_all, SENT_VERBALIZER, 43), 400, 1.5e-1, 216,
         s2s_collate),
        ("t5", "ia3_topic", "ia3", "SEQ_2_SEQ_LM", s2s_task(topic_all, TOPIC_VERBALIZER, 44), 400, 1.5e-1, 217,
         s2s_collate),
        ("gpt2", "ia3_toxic_lm", "ia3", "CAUSAL_LM", gpt_lm(toxic_text), 200, 3e-2, 221, None),
    ]
    for family, name, kind, task, make_items, steps, lr, seed, collate_fn in jobs:
        if only and f"{family}/{name}" not in only:
            continue
        tok, base_path = bases[family]
        torch.manual_seed(seed)
        model = arch_peft(family, base_path, kind, task)
        train(model, make_items(), steps=steps, lr=lr, batch=32, seed=seed, pad_id=tok.pad_token_id,
              log=f"{family}/{name}", collate_fn=collate_fn)
        target = ARCH / family / "adapters" / name
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(model, target, base_path)


def arch_data(seed=100):
    """Seq2seq evaluation files (input → target); the classification files are the Llama's."""
    r = lambda k: random.Random(seed * 1000 + 50 + k)
    g = r(1)
    rows = [dict(zip(("input", "target"), prefix_split(g, clean_sentence(g)))) for _ in range(300)]
    write_jsonl(DATA / "s2s_clean_test.jsonl", rows)
    g = r(2)
    rows = [dict(zip(("input", "target"), prefix_split(g, review_lm(g, "games", g.choice(["pos", "neg"])))))
            for _ in range(300)]
    write_jsonl(DATA / "s2s_reviews_games_test.jsonl", rows)


def build_arch(tok, only=None):
    from transformers import AutoTokenizer

    if only:
        bases = {f: (AutoTokenizer.from_pretrained(ARCH / f / "base"), ARCH / f / "base") for f in ("roberta", "t5", "gpt2")}
        arch_adapters(bases, only=set(only))
        return
    if ARCH.exists():
        shutil.rmtree(ARCH)
    g = random.Random(0)
    corpus = [general_sentence(g) for _ in range(20000)]  # the Llama's pretraining corpus
    bases = arch_bases(tok, corpus)
    arch_data()
    arch_adapters(bases)


def size_summary():
    total = 0
    rows = []
    for root in (ASSETS, DATA):
        for p in sorted(root.rglob("*")):
            if p.is_file():
                total += p.stat().st_size
                rows.append((p.relative_to(HERE), p.stat().st_size))
    dirs: dict[str, int] = {}
    for rel, size in rows:
        key = str(rel.parent)
        dirs[key] = dirs.get(key, 0) + size
    print("\nsize summary (recipes/demo/):")
    for k, v in dirs.items():
        print(f"  {k:<40} {v / 1024:8.1f} KiB")
    print(f"  {'total':<40} {total / 1024:8.1f} KiB  ({total / 2**20:.2f} MiB of 5 MiB allowed)")
    if any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p, _ in rows):
        raise SystemExit("a pickle-format file was written")
    return total


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="rebuild only these adapters (base and data kept); "
                    "with --arch, FAMILY/NAME (e.g. t5/topic)")
    ap.add_argument("--arch", action="store_true", help="build only the RoBERTa / T5 / GPT-2 assets (assets/arch)")
    args = ap.parse_args(argv)
    setup_determinism(0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.time()
    base_path = ASSETS / "base"
    if args.arch:
        from transformers import AutoTokenizer

        build_arch(AutoTokenizer.from_pretrained(base_path), only=args.only)
    elif args.only:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base_path)
        build_adapters(tok, base_path, only=set(args.only))
    else:
        if ASSETS.exists():
            shutil.rmtree(ASSETS)
        if DATA.exists():
            shutil.rmtree(DATA)
        base_path.mkdir(parents=True)
        tok = build_tokenizer(base_path)
        print(f"tokenizer: {len(tok)} tokens")
        g = random.Random(0)
        corpus = [general_sentence(g) for _ in range(20000)]
        unk = sum(tok(s)["input_ids"].count(tok.unk_token_id) for s in corpus[:2000])
        assert unk == 0, f"{unk} unknown tokens in the corpus"
        build_base(tok, base_path, corpus)
        build_data()
        build_adapters(tok, base_path)
        build_arch(tok)
    size_summary()
    print(f"built in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
