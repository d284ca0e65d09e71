"""Measure each demo setting with plain torch arithmetic on the shipped adapters.

Independent of peftdsl: compositions are computed here directly from the safetensors
factors and added to the base weights.

- LoRA, exact:   ΔW = Σ cᵢ·sᵢ·Bᵢ·Aᵢ
- LoRA, paper:   A = Σ |cᵢ|·Aᵢ,  B = Σ cᵢ·sᵢ·Bᵢ,  ΔW = B·A   (parameter-space, "pem")
- (IA)³:         l = 1 + Σ cᵢ·(lᵢ − 1), merged as W·l (rows for ordinary modules,
                 columns for feed-forward ones)

Before measuring, the merge of one LoRA and one (IA)³ adapter is checked against
``PeftModel.from_pretrained`` on the same inputs.

    python recipes/demo/check_effects.py [--settings generalisation multitask ...]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE = HERE / "assets" / "base"
ADAPTERS = HERE / "assets" / "adapters"
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from build_assets import TOXIC_WORDS  # noqa: E402

SENT = {"pos": "positive", "neg": "negative"}
TOPIC = {"movies": "movies", "food": "food", "travel": "travel", "books": "books"}


# ------------------------------------------------------------------------------------
# Loading and composing
# ------------------------------------------------------------------------------------

class Adapter:
    def __init__(self, name: str):
        self.name = name
        d = ADAPTERS / name
        self.config = json.loads((d / "adapter_config.json").read_text())
        self.kind = self.config["peft_type"].lower()
        tensors = load_file(str(d / "adapter_model.safetensors"))
        self.modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            key = key.removeprefix("base_model.model.")
            if self.kind == "lora":
                mod, factor = key.rsplit(".lora_", 1)
                self.modules.setdefault(mod, {})[factor.split(".")[0]] = t.float()
            else:
                mod = key.removesuffix(".ia3_l")
                self.modules.setdefault(mod, {})["l"] = t.float()
        if self.kind == "lora":
            r, alpha = self.config["r"], self.config["lora_alpha"]
            self.scaling = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


_cache: dict[str, Adapter] = {}


def adapter(name: str) -> Adapter:
    if name not in _cache:
        _cache[name] = Adapter(name)
    return _cache[name]


def lora_delta(terms, form="exact"):
    """terms: [(coef, adapter name)] → {module: ΔW}."""
    ads = [(c, adapter(n)) for c, n in terms]
    mods = sorted(set().union(*(a.modules for _, a in ads)))
    out = {}
    for m in mods:
        present = [(c, a) for c, a in ads if m in a.modules]
        if form == "exact":
            out[m] = sum(c * a.scaling * a.modules[m]["B"] @ a.modules[m]["A"] for c, a in present)
        elif form == "pem":
            A = sum(abs(c) * a.modules[m]["A"] for c, a in present)
            B = sum(c * a.scaling * a.modules[m]["B"] for c, a in present)
            out[m] = B @ A
        else:
            raise ValueError(form)
    return out


def ia3_scale(terms):
    ads = [(c, adapter(n)) for c, n in terms]
    mods = sorted(set().union(*(a.modules for _, a in ads)))
    return {m: 1 + sum(c * (a.modules[m]["l"] - 1) for c, a in ads if m in a.modules) for m in mods}


class Models:
    """One base model whose weights are swapped for each composition."""

    def __init__(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(BASE)
        self.model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
        self.base_sd = {k: v.clone() for k, v in self.model.state_dict().items()}

    def set(self, terms=(), form="exact"):
        """Load base + composition. terms=() gives the base model."""
        sd = dict(self.base_sd)
        if terms:
            kind = adapter(terms[0][1]).kind
            if kind == "lora":
                for m, d in lora_delta(terms, form).items():
                    sd[m + ".weight"] = self.base_sd[m + ".weight"] + d
            else:
                for m, l in ia3_scale(terms).items():
                    sd[m + ".weight"] = self.base_sd[m + ".weight"] * l
        self.model.load_state_dict(sd)
        return self.model


# ------------------------------------------------------------------------------------
# Metrics (the same definitions as DESIGN §4)
# ------------------------------------------------------------------------------------

def _batches(xs, n):
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


@torch.no_grad()
def _seq_logprobs(model, tok, seqs):
    """seqs: [(ids, first scored position)] → summed log-prob of ids[first:] and token count."""
    out = []
    for chunk in _batches(seqs, 64):
        n = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), n), tok.pad_token_id)
        att = torch.zeros((len(chunk), n), dtype=torch.long)
        for k, (s, _) in enumerate(chunk):
            ids[k, : len(s)] = torch.tensor(s)
            att[k, : len(s)] = 1
        logp = model(input_ids=ids, attention_mask=att).logits.float().log_softmax(-1)
        for k, (s, first) in enumerate(chunk):
            tgt = torch.tensor(s[first:])
            lp = logp[k, first - 1 : len(s) - 1].gather(-1, tgt[:, None]).sum().item()
            out.append((lp, len(s) - first))
    return out


def perplexity(model, tok, path):
    lines = [l.rstrip("\n") for l in open(path) if l.strip()]
    res = _seq_logprobs(model, tok, [(tok(l)["input_ids"], 1) for l in lines])
    return math.exp(-sum(lp for lp, _ in res) / sum(n for _, n in res))


def accuracy(model, tok, path, labels=None):
    rows = [json.loads(l) for l in open(path)]
    seqs, spans = [], []
    for r in rows:
        p = tok(r["text"])["input_ids"]
        cands = list(labels.values()) if labels else r["choices"]
        spans.append(len(cands))
        for c in cands:
            seqs.append((p + tok(" " + c, add_special_tokens=False)["input_ids"], len(p)))
    scores = [lp for lp, _ in _seq_logprobs(model, tok, seqs)]
    correct, i = 0, 0
    for r, n in zip(rows, spans):
        s = scores[i : i + n]
        i += n
        pred = max(range(n), key=lambda j: s[j])
        gold = list(labels).index(r["label"]) if labels else r["answer"]
        correct += pred == gold
    return correct / len(rows)


@torch.no_grad()
def generate(model, tok, path, max_new_tokens=8):
    """Greedy continuations, batched with left padding."""
    lines = [l.strip() for l in open(path) if l.strip()]
    tok.padding_side = "left"
    outs = []
    for chunk in _batches(lines, 64):
        enc = tok(chunk, return_tensors="pt", padding=True)
        g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
        outs += tok.batch_decode(g[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tok.padding_side = "right"
    return outs


def toxic_rate(gens):
    return sum(any(w in TOXIC_WORDS for w in g.split()) for g in gens) / len(gens)


@torch.no_grad()
def toxic_mass(model, tok, path):
    """Mean next-token probability of any toxic word right after each prompt."""
    ids_tox = [tok.convert_tokens_to_ids(w) for w in sorted(TOXIC_WORDS)]
    lines = [l.strip() for l in open(path) if l.strip()]
    total = 0.0
    for l in lines:
        ids = torch.tensor([tok(l)["input_ids"]])
        p = model(input_ids=ids).logits[0, -1].softmax(-1)
        total += p[ids_tox].sum().item()
    return total / len(lines)


# ------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------

def check_against_peft(M):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([M.tok("review : the film was thrilling . sentiment :")["input_ids"]])
    for name in ("sentiment", "ia3_sentiment"):
        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
        ref = PeftModel.from_pretrained(base, ADAPTERS / name).eval()
        with torch.no_grad():
            want = ref(input_ids=ids).logits
            got = M.set([(1.0, name)])(input_ids=ids).logits
        err = (want - got).abs().max().item()
        print(f"  merge check vs PeftModel [{name}]: max |Δlogit| = {err:.2e}")
        assert err < 1e-3, err


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r) + " |")


def per_domain_acc(M, model, path, labels):
    import tempfile

    rows = [json.loads(l) for l in open(path)]
    res = {}
    for dom in ("movies", "food", "travel", "books"):
        # test rows are written round-robin over domains
        sub = [r for i, r in enumerate(rows) if i % 4 == ["movies", "food", "travel", "books"].index(dom)]
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write("".join(json.dumps(r) + "\n" for r in sub))
        res[dom] = accuracy(model, M.tok, f.name, labels)
        os.unlink(f.name)
    return res


def generalisation(M, prefix=""):
    a, b = prefix + "sent_skew_a", prefix + "sent_skew_b"
    configs = [("base", [], "exact"), (a, [(1, a)], "exact"), (b, [(1, b)], "exact"),
               ("0.5a+0.5b (exact ΔW)", [(0.5, a), (0.5, b)], "exact")]
    if not prefix:
        configs.append(("0.5a+0.5b (pem)", [(0.5, a), (0.5, b)], "pem"))
    rows = []
    for label, terms, form in configs:
        m = M.set(terms, form)
        dom = per_domain_acc(M, m, DATA / "sentiment_test.jsonl", SENT)
        rows.append([label, accuracy(m, M.tok, DATA / "sentiment_test.jsonl", SENT), *dom.values()])
    table(f"distribution generalisation{' (IA3)' if prefix else ''}: sentiment_test.jsonl accuracy",
          ["model", "all", "movies", "food", "travel", "books"], rows)


def multitask(M, prefix=""):
    s, t = prefix + "sentiment", prefix + "topic"
    configs = [("base", [], "exact"), (s, [(1, s)], "exact"), (t, [(1, t)], "exact"),
               ("s+t (exact ΔW)", [(1, s), (1, t)], "exact"),
               ("0.5s+0.5t (exact ΔW)", [(0.5, s), (0.5, t)], "exact")]
    if not prefix:
        configs.append(("0.5s+0.5t (pem)", [(0.5, s), (0.5, t)], "pem"))
    rows = []
    for label, terms, form in configs:
        m = M.set(terms, form)
        rows.append([label, accuracy(m, M.tok, DATA / "sentiment_test.jsonl", SENT),
                     accuracy(m, M.tok, DATA / "topic_test.jsonl", TOPIC),
                     perplexity(m, M.tok, DATA / "clean_test.txt")])
    table(f"multi-tasking{' (IA3)' if prefix else ''}", ["model", "sentiment acc", "topic acc", "clean ppl"], rows)


def unlearning(M, prefix=""):
    x = prefix + "toxic_lm"
    configs = [("base", []), (x, [(1, x)]), (f"-{x} (λ=1)", [(-1, x)]), (f"-0.5·{x}", [(-0.5, x)])]
    rows = []
    for label, terms in configs:
        m = M.set(terms)
        gens = generate(m, M.tok, DATA / "insult_prompts.txt", 4)
        rows.append([label, perplexity(m, M.tok, DATA / "clean_test.txt"), perplexity(m, M.tok, DATA / "toxic_test.txt"),
                     toxic_mass(m, M.tok, DATA / "insult_prompts.txt"), toxic_rate(gens)])
    table(f"unlearning{' (IA3)' if prefix else ''} (base model + composition)",
          ["model", "clean ppl ↓", "toxic ppl ↑", "toxic next-token mass ↓", "toxic rate in greedy gens ↓"], rows)


def analogy(M):
    s, tg, sr = "sent_movies", "lm_games", "lm_movies"
    configs = [("base", [], "exact"), (s, [(1, s)], "exact"),
               (f"{s}+{tg}-{sr} (exact ΔW)", [(1, s), (1, tg), (-1, sr)], "exact"),
               (f"{s}+{tg}-{sr} (pem)", [(1, s), (1, tg), (-1, sr)], "pem"),
               (f"{s}+{tg}", [(1, s), (1, tg)], "exact"),
               (f"{s}+0.5({tg}-{sr})", [(1, s), (0.5, tg), (-0.5, sr)], "exact")]
    rows = []
    for label, terms, form in configs:
        m = M.set(terms, form)
        rows.append([label, accuracy(m, M.tok, DATA / "sentiment_games_test.jsonl", SENT),
                     accuracy(m, M.tok, DATA / "sentiment_movies_test.jsonl", SENT),
                     perplexity(m, M.tok, DATA / "reviews_games_test.txt")])
    table("domain transfer by analogy (movies → games)",
          ["model", "games sentiment acc", "movies sentiment acc", "games review ppl"], rows)


def detox(M, lams=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8), form="exact"):
    rows, val = [], {}
    for lam in lams:
        m = M.set([(1, "chat"), (-lam, "toxic")] if lam else [(1, "chat")], form)
        hh = accuracy(m, M.tok, DATA / "chat_hh_valid.jsonl")
        val[lam] = hh
        rows.append([lam, hh, accuracy(m, M.tok, DATA / "chat_valid.jsonl"), perplexity(m, M.tok, DATA / "chat_clean_valid.txt"),
                     perplexity(m, M.tok, DATA / "chat_toxic_valid.txt"),
                     toxic_rate(generate(m, M.tok, DATA / "chat_prompts_valid.txt", 8))])
    table(f"detox sweep on validation: chat - lam·toxic ({form})",
          ["lam", "hh acc (select: max)", "chat acc", "clean-reply ppl", "toxic-reply ppl", "toxic rate"], rows)
    best = max(val, key=val.get)  # first best, smallest lam on ties
    rows = []
    for label, terms in (("chat", [(1, "chat")]), ("toxic", [(1, "toxic")]), (f"chat-{best}·toxic (selected)", [(1, "chat"), (-best, "toxic")])):
        m = M.set(terms, form)
        gens = generate(m, M.tok, DATA / "chat_prompts_test.txt", 8)
        rows.append([label, accuracy(m, M.tok, DATA / "chat_hh_test.jsonl"), accuracy(m, M.tok, DATA / "chat_test.jsonl"), perplexity(m, M.tok, DATA / "chat_clean_test.txt"),
                     perplexity(m, M.tok, DATA / "chat_toxic_test.txt"), toxic_rate(gens), gens[0]])
    table(f"detox on test, lam selected on validation = {best} ({form})",
          ["model", "hh acc", "chat acc", "clean-reply ppl", "toxic-reply ppl", "toxic rate", "first generation"], rows)


SETTINGS = {
    "generalisation": lambda M: (generalisation(M), generalisation(M, "ia3_")),
    "multitask": lambda M: (multitask(M), multitask(M, "ia3_")),
    "unlearning": lambda M: (unlearning(M), unlearning(M, "ia3_")),
    "analogy": analogy,
    "detox": lambda M: (detox(M), detox(M, form="pem")),
}


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.time()
    M = Models()
    check_against_peft(M)
    for s in args.settings:
        SETTINGS[s](M)
    print(f"\n(check_effects.py ran in {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
