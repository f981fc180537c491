"""
GPT-2-small fact decomposition and suppression: Sections 5.2, 6.2 and A.3 of "Decomposition of
Small Transformer Models" (arXiv 2511.08854), with the SPD method of spd.py.

The paper decomposes GPT-2-small over two facts that it predicts correctly,
    "Kobe Bryant plays the sport of basketball" and "Tiger Woods plays the sport of golf",
with the A.3.1 hyperparameters (the "paper" preset below). Before the decomposition it
  0) zeroes each MLP in turn and reads P(sport) on both facts (A.3.2, Figure 9), and
 0b) traces both facts causally (Meng et al. 2022), the name's embeddings corrupted (Figures 7-8);
then:
  1) counts the active subcomponents per layer and token (paper: 96 in all) and finds those in
     the layer-0 MLP that are active at a name token ("obe", "Bryant", "Woods") and nowhere in
     the other example;
  2) suppresses those directions in the ORIGINAL model by orthogonal projection
     W <- W - Σ_k (û_kᵀ W v̂_k) û_k v̂_kᵀ (Sec. 5.2) and reads P(golf), P(basketball) on both
     prompts (paper, Figure 3: golf 0.620 -> 0.090 while basketball stays 0.630; values as first
     recorded here from the figure, the paper's text gives none);
  3) checks the edit's selectivity on a 100-fact set (A.3.4, Figure 3);
  4) splits the Kobe Bryant edit into its first-name and last-name directions (Figure 4);
  5) checks the reversed prompt "The most famous athlete in golf is" -> " Tiger Woods" (Sec. 6.2);
  6) says whether the paper's claim holds: target P down >= 5x, the other athlete and the
     100 facts' mean within 0.05, the reversed prompt still answered;
  7) looks for where the facts are: each block's output zeroed at the name tokens only, the
     search of 1) in every decomposed matrix, every active layer-0 MLP direction at the names.
Tables go to stdout, everything to <out_dir>/results.json (and figures 3, 4, 7, 8, 9 as PNGs if
matplotlib is importable), the decomposition to <out_dir>/spd.pt (unless --save=false).

The models, all `transformers.GPT2LMHeadModel` with the same Conv1D module paths
(transformer.h.{i}.attn.c_attn / attn.c_proj / mlp.c_fc / mlp.c_proj, weight (d_in, d_out)):
    "gpt2"         the real GPT-2-small (cached hub weights, or a local folder path)
    "tiny"         a 4-layer GPT-2 (d_model 64, MLP ratio 4) with a sub-word tokenizer in which
                   every athlete's name is four pieces shared with other athletes of other
                   sports ("K|obe| Bry|ant"), trained here in 20-40 s on 128 athlete -> sport
                   facts, the 100 facts and the reversed prompt: runs offline (TINY_CONFIG)
    "gpt2-random"  GPT-2-small shapes, random weights: only for memory/speed checks on a GPU
Left out: the paper's full 100-fact set is unpublished; we use its 30-sentence excerpt verbatim
plus 70 of our own in the same style.

Run:  python gpt2_facts.py                 (real GPT-2, paper preset; needs the weights, and in
                                            practice a big GPU: U, V and the CI MLPs are 3.3 B
                                            parameters, ~49 GiB with gradients and AdamW state)
      python gpt2_facts.py --model=tiny    (fully offline, tiny preset, 2.5-5 min on one core)
      python gpt2_facts.py --model=gpt2-random --steps=200 --save=false --out_dir=runs/random   (speed, memory)
      any FactsConfig field as --key=value, e.g. --steps=500 --C=32 --threshold=0.1

Dimensions: B batch (the two facts), S sequence, C subcomponents per matrix.
"""

import contextlib
import copy
import dataclasses
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import spd

# -----------------------------------------------------------------------------
# data

# Section 5.2: the two facts decomposed over; the target of each is its final word
ATHLETE_FACTS = ["Kobe Bryant plays the sport of basketball", "Tiger Woods plays the sport of golf"]
# Section 6.2: the reversed direction, expected completion " Tiger"
REVERSED_PROMPT = "The most famous athlete in golf is"
REVERSED_TARGET = "Tiger Woods"

# A.3.4: 100 facts for the selectivity check, the target of each is its final word.
# None is about golf or basketball, so suppressing an athlete -> sport direction should leave them alone.
FACTS = [
    # the paper's excerpt (Figure 10), verbatim, typo "New City" included
    "Serena Williams is a professional tennis player",
    "The Great Wall of China is in China",
    "The Mona Lisa was painted by Leonardo da Vinci",
    "Mount Everest is the tallest mountain on Earth",
    "The Eiffel Tower is located in Paris France",
    "Usain Bolt is the fastest man in the world",
    "The Pacific Ocean is the largest ocean on Earth",
    "Albert Einstein developed the theory of relativity",
    "J.K. Rowling wrote the Harry Potter series",
    "The Amazon River flows through South America",
    "William Shakespeare wrote Romeo and Juliet",
    "Beethoven composed the Fifth Symphony",
    "The Sahara Desert is in Africa",
    "Apple Inc. was founded by Steve Jobs Steve Wozniak and Ronald Wayne",
    "The sun is a star",
    "The Beatles were a British rock band",
    "Cristiano Ronaldo is a professional soccer player",
    "The Statue of Liberty is in New City",
    "Pablo Picasso was a famous painter",
    "The Nile is the longest river in the world",
    "Charles Darwin developed the theory of evolution",
    "Google was founded in 1998",
    "The Taj Mahal is in India",
    "The Titanic sank in 1912",
    "Jane Austen wrote Pride and Prejudice",
    "The Moon orbits the Earth",
    "Mount Kilimanjaro is in Tanzania",
    "The Leaning Tower of Pisa is in Italy",
    "Walt Disney created Mickey Mouse",
    "Vincent van Gogh painted Starry Night",
    # ours, same style
    "Lionel Messi is a professional soccer player",
    "Roger Federer is a professional tennis player",
    "Rafael Nadal is a professional tennis player",
    "Tom Brady is a professional football player",
    "Babe Ruth was a famous baseball player",
    "Wayne Gretzky was a famous hockey player",
    "Muhammad Ali was a famous boxer",
    "Michael Phelps is a famous swimmer",
    "Paris is the capital of France",
    "Tokyo is the capital of Japan",
    "Rome is the capital of Italy",
    "Berlin is the capital of Germany",
    "Madrid is the capital of Spain",
    "Moscow is the capital of Russia",
    "Ottawa is the capital of Canada",
    "Cairo is the capital of Egypt",
    "Athens is the capital of Greece",
    "Beijing is the capital of China",
    "The Colosseum is in Rome",
    "Big Ben is in London",
    "The Sydney Opera House is in Australia",
    "The Pyramids of Giza are in Egypt",
    "Machu Picchu is in Peru",
    "Mount Fuji is in Japan",
    "Stonehenge is in England",
    "The Golden Gate Bridge is in San Francisco",
    "The Louvre is a museum in Paris",
    "Isaac Newton discovered the law of gravity",
    "Thomas Edison invented the light bulb",
    "Alexander Graham Bell invented the telephone",
    "The Wright brothers invented the airplane",
    "Marie Curie discovered radium",
    "Neil Armstrong was the first man on the Moon",
    "George Washington was the first president of the United States",
    "Christopher Columbus sailed to America",
    "Mozart was a famous Austrian composer",
    "Michelangelo painted the Sistine Chapel",
    "Homer wrote the Iliad",
    "Charles Dickens wrote Oliver Twist",
    "George Orwell wrote Animal Farm",
    "Herman Melville wrote Moby Dick",
    "Leo Tolstoy wrote War and Peace",
    "Mark Twain wrote Tom Sawyer",
    "Microsoft was founded by Bill Gates",
    "Amazon was founded by Jeff Bezos",
    "Facebook was founded by Mark Zuckerberg",
    "The iPhone is made by Apple",
    "Michael Jackson is known as the King of Pop",
    "Elvis Presley is known as the King of Rock and Roll",
    "Bob Marley was a famous reggae singer",
    "Sherlock Holmes is a famous detective",
    "Superman comes from the planet Krypton",
    "Batman lives in Gotham City",
    "Santa Claus lives at the North Pole",
    "Harry Potter is a famous wizard",
    "Mars is known as the red planet",
    "Jupiter is the largest planet in the solar system",
    "The Earth orbits the Sun",
    "Water is made of hydrogen and oxygen",
    "Water freezes at zero degrees Celsius",
    "The human heart pumps blood",
    "Bees make honey",
    "Penguins live in Antarctica",
    "Kangaroos live in Australia",
    "A week has seven days",
    "A year has twelve months",
    "The Olympic Games are held every four years",
    "The Mississippi River flows through the United States",
    "The Thames flows through London",
    "Venice is famous for its canals",
]
assert len(FACTS) == 100 and len(set(FACTS)) == 100
# The tiny model's athletes (issue 11): GPT-2 splits a name into sub-word pieces ("K|obe",
# " Bry|ant"), and a piece alone means nothing, so some layer has to assemble the name before
# the sport can be looked up. We make that so: every athlete's first name is an onset + a rhyme
# and its last name a (spaced) onset + a rhyme, drawn from small piece lists, so each piece
# occurs in 6-24 names across 4-8 sports and only the combination of pieces gives the sport.
# Kobe Bryant and Tiger Woods are two of them: "K|obe| Bry|ant" and "T|iger| Wo|ods" (GPT-2's BPE
# has "K|obe| Bryant" and "T|iger| Woods": the paper's unique tokens are "obe", "Bryant", "Woods").
FIRST_ONSETS = ["K", "T", "D", "M", "R", "J", "L", "B"]
FIRST_RHYMES = ["obe", "iger", "arin", "elo", "ustin", "ami", "eon", "ev"]
LAST_ONSETS = [" Bry", " Wo", " Ha", " Gr", " Fa", " Mo", " Ca", " Pe"]
LAST_RHYMES = ["ant", "ods", "rden", "een", "rell", "ore", "rter", "ames"]
TINY_SPORTS = ["basketball", "golf", "tennis", "soccer", "baseball", "hockey", "football", "cricket"]
TINY_ATHLETE_TEMPLATE = "{} plays the sport of {}"     # the form of ATHLETE_FACTS

def make_tiny_athletes(n=128, seed=0):
    """[(first pieces, last pieces, sport)]: Kobe Bryant and Tiger Woods, then n - 2 distinct
    random names, the sports balanced (n / 8 each) and shuffled, all from a fixed seed."""
    rng = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=rng))]
    athletes = [(("K", "obe"), (" Bry", "ant"), "basketball"), (("T", "iger"), (" Wo", "ods"), "golf")]
    names = {(a[0], a[1]) for a in athletes}
    while len(names) < n:
        name = ((pick(FIRST_ONSETS), pick(FIRST_RHYMES)), (pick(LAST_ONSETS), pick(LAST_RHYMES)))
        if name not in names:
            names.add(name)
            athletes.append((*name, None))
    sports = [TINY_SPORTS[i % len(TINY_SPORTS)] for i in range(n)]
    sports.remove("basketball"), sports.remove("golf")
    sports = [sports[i] for i in torch.randperm(len(sports), generator=rng)]
    return athletes[:2] + [(f, l, s) for (f, l, _), s in zip(athletes[2:], sports)]

TINY_ATHLETES = make_tiny_athletes()
TINY_ATHLETE_FACTS = [TINY_ATHLETE_TEMPLATE.format("".join(f) + "".join(l), s) for f, l, s in TINY_ATHLETES]
assert TINY_ATHLETE_FACTS[:2] == ATHLETE_FACTS
# every sentence the tiny model is trained on; the real GPT-2 sees only the evaluated ones
ALL_SENTENCES = TINY_ATHLETE_FACTS + FACTS + [f"{REVERSED_PROMPT} {REVERSED_TARGET}"]

# -----------------------------------------------------------------------------
# tokenizers: GPT-2's BPE tokenizer (from transformers) or the tiny model's sub-word one, same
# interface: encode(text) -> ids, decode(ids) -> text

class SubwordTokenizer:
    """A GPT-2-like tokenizer for the tiny model. Text is pre-split as GPT-2 does, into words
    with their leading space (" plays"). A word is one token if it is in `words` (every word of
    the training sentences except the athletes' names: frequent words are whole in GPT-2's BPE
    too); any other word is split greedily into the longest matching `pieces` (the name pieces
    above, with and without a leading space) and single characters. So "Kobe Bryant" is
    "K|obe| Bry|ant", and decode(encode(text)) == text for any text over the corpus' characters.
    Id 0 is <pad>. A character never seen in the corpus fails loudly."""

    def __init__(self, sentences=ALL_SENTENCES, athletes=TINY_ATHLETES):
        name_words = {"".join(p).strip() for f, l, _ in athletes for p in (f, l)}
        words = [w for s in sentences for w in self.pre_split(s) if w.strip() not in name_words]
        pieces = [p for xs in (FIRST_ONSETS, FIRST_RHYMES, LAST_ONSETS, LAST_RHYMES) for p in xs]
        pieces += [" " + p for p in FIRST_ONSETS]                       # " Tiger" after "is"
        chars = sorted({c for s in sentences for c in s})
        self.tokens = list(dict.fromkeys(["<pad>"] + words + pieces + chars))  # ordered, distinct
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.words = set(words)
        self.pieces = sorted(set(pieces + chars), key=len, reverse=True)      # longest first
        for f, l, _ in athletes:                     # the pieces the names were built from
            assert self.tokenize("".join(f) + "".join(l)) == [*f, *l], (f, l)

    @staticmethod
    def pre_split(text):
        """"Kobe Bryant plays" -> ["Kobe", " Bryant", " plays"] (GPT-2 also splits off
        punctuation; the corpus has none that matters)."""
        return re.findall(r" ?[^ ]+| +", text)

    def __len__(self):
        return len(self.tokens)

    def tokenize(self, text):
        out = []
        for w in self.pre_split(text):
            while w and w not in self.words:
                p = next((p for p in self.pieces if w.startswith(p)), None)
                if p is None:
                    raise ValueError(f"character {w[0]!r} is not in the tiny tokenizer's vocabulary")
                out.append(p)
                w = w[len(p):]
            if w:
                out.append(w)
        return out

    def encode(self, text):
        return [self.ids[t] for t in self.tokenize(text)]

    def decode(self, ids):  # ids beyond the vocabulary (gpt2-random's 50257 logits) read "<id>"
        return "".join(self.tokens[int(i)] if int(i) < len(self.tokens) else f"<{int(i)}>" for i in ids)

def split_prompt(tokenizer, sentence):
    """A fact -> (prompt_ids, target_id): the prompt is everything before the final word, the target
    is the first token of " " + final word (" basketball", with its leading space, in both GPT-2's
    BPE and the tiny tokenizer). The sequence decomposed over is prompt_ids + [target_id]."""
    prompt, word = sentence.rsplit(" ", 1)
    return tokenizer.encode(prompt), tokenizer.encode(" " + word)[0]

def make_batch(tokenizer, sentences):
    """Sentences -> (input_ids (B, S_max) right-padded with 0, valid (B, S_max) bool). Each row is
    prompt_ids + [target_id] (for a multi-token final word, only its first token). Right padding
    is harmless under causal attention: valid positions never see the pad."""
    rows = [p + [t] for p, t in (split_prompt(tokenizer, s) for s in sentences)]
    return _pad(rows)

def _pad(rows):
    S = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [0] * (S - len(r)) for r in rows])     # (B, S)
    valid = torch.tensor([[True] * len(r) + [False] * (S - len(r)) for r in rows])  # (B, S)
    return input_ids, valid

# -----------------------------------------------------------------------------
# models

TINY_PATH = "runs/gpt2_facts/tiny.pt"  # cache of the trained tiny model (relative to the cwd)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # every model here: deterministic forward

class WeightsUnavailableError(RuntimeError):
    """GPT-2 weights could not be loaded (typically: no model hub and nothing cached)."""

def load_model(name="gpt2", device="cpu", tiny_path=TINY_PATH):
    """name: "gpt2" (or any hub id / local folder with config.json + weights), "tiny", or
    "gpt2-random". Returns (model in eval mode, float32, dropout 0, on device; tokenizer)."""
    if name == "tiny":
        model, tokenizer = load_tiny(tiny_path)
    elif name == "gpt2-random":
        torch.manual_seed(0)  # GPT-2-small shapes; the word tokenizer's ids all fit in its vocab
        model, tokenizer = GPT2LMHeadModel(GPT2Config(**NO_DROPOUT)), SubwordTokenizer()
    else:
        model, tokenizer = load_pretrained(name)
    return model.to(device=device, dtype=torch.float32).eval(), tokenizer

def load_pretrained(name):
    if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise WeightsUnavailableError(f"--model={name}: there is no such folder; pass a folder with "
                                      f"config.json, model weights and tokenizer files, gpt2, or tiny")
    # from_pretrained retries an unreachable hub for ~30 s, so look for a cached copy only when
    # a quick TCP check fails (or when name is a local folder / HF_HUB_OFFLINE is set)
    local_only = os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") \
        or not _hub_reachable()
    try:
        model, info = GPT2LMHeadModel.from_pretrained(name, local_files_only=local_only, dtype=torch.float32,
                                                      output_loading_info=True, **NO_DROPOUT)
        missing = sorted(info["missing_keys"])                # (else they stay random, without a word)
        tokenizer = None if missing else AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except Exception as e:
        if os.path.isdir(name):                  # the user's own folder: say what it lacks
            why = (str(e).splitlines() or [""])[0][:120]
            raise WeightsUnavailableError(f"could not load GPT-2 from the folder {name!r} ({type(e).__name__}: "
                                          f"{why}); it needs config.json, model weights and tokenizer files") from None
        raise WeightsUnavailableError(
            f"could not load GPT-2 weights {name!r} ({type(e).__name__}; no model hub reachable?): "
            f"run once with hub access to cache them, or pass --model=/path/to/local/gpt2 "
            f"(a folder with config.json, model weights and tokenizer files), "
            f"or run offline with --model=tiny") from None
    if missing:
        raise WeightsUnavailableError(f"--model={name} is not a GPT-2: {len(missing)} of GPT-2's weights are "
                                      f"not in it ({missing[0]}, ...); pass a GPT-2 folder or gpt2, or tiny")
    return model, tokenizer

def _hub_reachable(timeout=2.0):
    from huggingface_hub import constants
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

# The tiny stand-in (issue 11), fixed before any suppression result was seen, by what GPT-2-small
# is (12 layers, d_model 768, 12 heads of 64, MLP ratio 4, GELU, pre-LayerNorm, learned positions,
# tied embeddings) scaled to train in 20-40 s on one CPU core:
#   n_layer 4     a few blocks, so that "an early MLP" and "a later MLP" are different places
#                 (GPT-2's facts are editable in MLPs 0-5 of 12, A.3.2); 4 blocks are 16 matrices
#                 to decompose, which still fits the 5-minute budget (8 blocks would not)
#   n_embd 64     the tokens (434) and facts (~230) are few; C = d_model as in the paper
#   n_head 4      heads of 16 (GPT-2: d_model / 64 heads; one head of 64 would leave a single
#                 attention pattern per layer to gather the name pieces)
#   n_inner 256   MLP ratio 4, GELU, LayerNorm, learned positions, tied embeddings: GPT-2's own
#                 (GPT2Config's defaults)
TINY_CONFIG = dict(n_layer=4, n_embd=64, n_head=4, n_inner=256, n_positions=32, bos_token_id=None,
                   eos_token_id=None, **NO_DROPOUT)

def load_tiny(path=TINY_PATH):
    """Load the cached tiny model, or train it (and cache it) if the cache is absent or stale:
    made with another tokenizer, other sentences or another architecture."""
    tokenizer = SubwordTokenizer()
    made_of = {"tokens": tokenizer.tokens, "sentences": ALL_SENTENCES, "config": TINY_CONFIG}
    if os.path.exists(path):
        ckpt = spd.read_file(path, "tiny model cache", "pass the right --tiny_path (at a path with no "
                             "file, the tiny model is trained), or delete it if it is a broken cache",
                             keys=("model", "config", "sentences"))    # (a file of ours; else not over it)
        if all(ckpt.get(k) == v for k, v in made_of.items()):
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **TINY_CONFIG))
            model.load_state_dict(ckpt["model"])
            return model, tokenizer
        print(f"{path} was trained with another tokenizer, data or config, retraining")
    spd.make_dir(os.path.dirname(path), "--tiny_path")       # before training, not after
    model = train_tiny(tokenizer)
    obj = {"model": model.state_dict(), **made_of}
    spd.atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return model, tokenizer

def train_tiny(tokenizer, lr=3e-3, max_steps=4000, eval_interval=50, seed=0):
    """Full-batch next-token LM loss on every token of ALL_SENTENCES, AdamW, until the argmax
    prediction of every sentence's final word is right and the reversed prompt completes
    greedily with " Tiger Woods"."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **TINY_CONFIG))
    print(f"training tiny GPT-2: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{TINY_CONFIG['n_layer']} layers, d_model {TINY_CONFIG['n_embd']}, {len(tokenizer)} tokens, "
          f"{len(ALL_SENTENCES)} sentences, {torch.get_num_threads()} thread(s)")
    input_ids, valid = _pad([tokenizer.encode(s) for s in ALL_SENTENCES])  # (B, S) whole sentences
    targets = input_ids[:, 1:].masked_fill(~valid[:, 1:], -100)  # (B, S-1) next tokens, pads ignored
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, max_steps + 1):
        model.train()
        logits = model(input_ids=input_ids).logits[:, :-1]  # (B, S-1, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_interval == 0:
            model.eval()
            correct = predicts_final_word(model, tokenizer, ALL_SENTENCES)
            reversed_ok = greedy_completion(model, tokenizer, REVERSED_PROMPT, REVERSED_TARGET) \
                == " " + REVERSED_TARGET
            print(f"step {step:5d} | loss {loss.item():.4f} | final word right "
                  f"{int(correct.sum())}/{len(correct)} | reversed {'right' if reversed_ok else 'wrong'} "
                  f"| {time.time() - t0:.1f}s")
            if correct.all() and reversed_ok:
                return model
    raise RuntimeError(f"tiny model did not learn every fact in {max_steps} steps")

# -----------------------------------------------------------------------------
# analysis helpers

@torch.no_grad()
def last_logits(model, tokenizer, prompts):
    """Next-token logits (len(prompts), vocab) at the end of each prompt (prompts right-padded)."""
    input_ids, valid = _pad([tokenizer.encode(p) for p in prompts])   # (B, S)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device)).logits              # (B, S, vocab)
    last = valid.sum(1).to(device) - 1                                 # (B,) last real position
    return logits[torch.arange(len(prompts), device=device), last]     # (B, vocab)

def last_token_probs(model, tokenizer, prompts, words):
    """P(next token = first token of " " + word) at the end of each prompt: (len(prompts), len(words))."""
    word_ids = [tokenizer.encode(" " + w)[0] for w in words]
    return last_logits(model, tokenizer, prompts).softmax(-1)[:, word_ids]

def predicts_final_word(model, tokenizer, sentences):
    """Bool (len(sentences),): is the argmax next token after the prompt the final word's first token?"""
    prompts, targets = zip(*(s.rsplit(" ", 1) for s in sentences))
    target_ids = torch.tensor([tokenizer.encode(" " + w)[0] for w in targets])
    return last_logits(model, tokenizer, list(prompts)).argmax(-1).cpu() == target_ids

def final_word_probs(model, tokenizer, sentences):
    """P(first token of " " + final word | prompt) for each sentence: (len(sentences),) on the CPU."""
    prompts, words = zip(*(s.rsplit(" ", 1) for s in sentences))
    target_ids = torch.tensor([tokenizer.encode(" " + w)[0] for w in words])
    probs = last_logits(model, tokenizer, list(prompts)).softmax(-1).cpu()   # (N, vocab)
    return probs[torch.arange(len(sentences)), target_ids]

@torch.no_grad()
def greedy_completion(model, tokenizer, prompt, answer):
    """The model's greedy continuation of prompt, as many tokens long as " " + answer."""
    ids = tokenizer.encode(prompt)
    n = len(ids)
    device = next(model.parameters()).device
    for _ in tokenizer.encode(" " + answer):
        ids.append(int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return tokenizer.decode(ids[n:])

@torch.no_grad()
def name_zeroed_probs(model, tokenizer, module, facts):
    """P(final word) of athlete facts ("First Last ..."), with `module`'s output (a block's attention
    or MLP) set to 0 at the name tokens only, every other position untouched. A forward hook, used
    only for this diagnostic (the method itself never hooks)."""
    prompts = [f.rsplit(" ", 1)[0] for f in facts]
    n_name = [len(tokenizer.encode(" ".join(p.split()[:2]))) for p in prompts]
    rows = [[0.0] * k + [1.0] * (len(tokenizer.encode(p)) - k) for p, k in zip(prompts, n_name)]
    keep = _pad(rows)[0].float().to(next(model.parameters()).device)      # (B, S) 0 at the names

    def zero_names(mod, inputs, out):                # attention returns (output, weights)
        if isinstance(out, tuple):
            return (out[0] * keep[..., None],) + out[1:]
        return out * keep[..., None]
    with _hooked([(module, zero_names)]):
        return final_word_probs(model, tokenizer, facts)

def token_strings(tokenizer, ids):
    """Each id decoded on its own ("K", "obe", " Bryant" for GPT-2's BPE)."""
    return [tokenizer.decode([int(i)]) for i in ids]

# -----------------------------------------------------------------------------
# config and presets

DEFAULT_PATTERNS = ("transformer.h.*.attn.c_attn,transformer.h.*.attn.c_proj,"
                    "transformer.h.*.mlp.c_fc,transformer.h.*.mlp.c_proj")
ATHLETES = [("Kobe", "Bryant"), ("Tiger", "Woods")]   # the names of ATHLETE_FACTS, in order
SPORTS = ["basketball", "golf"]                       # their final words, in order

@dataclass
class FactsConfig(spd.Config):
    """spd.Config plus this script's own fields. The SPD hyperparameters come from a preset
    (PRESETS) and then from --key=value overrides; spd.Config's defaults are the induction task's."""
    model: str = "gpt2"               # "gpt2" (or another hub id, or a local folder), "tiny", "gpt2-random"
    preset: str = ""                  # a PRESETS key; "" = "tiny" for --model=tiny, else "paper"
    patterns: str = DEFAULT_PATTERNS  # globs of the layers to decompose: every block's linear maps
    edit_patterns: str = "transformer.h.0.mlp.c_fc,transformer.h.0.mlp.c_proj"  # where the unique
                                      # directions are looked for: "the layer 0 MLP", both its matrices
    threshold: float = 0.0            # subcomponent c is active at a token when g_c > threshold (as L0)
    out_dir: str = "runs/gpt2_facts"  # results.json, spd.pt and (with matplotlib) the figures
    tiny_path: str = TINY_PATH        # cache of the trained tiny model (--model=tiny)
    save: bool = True                 # write the decomposition to <out_dir>/spd.pt
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    trace_noise: float = 3.0          # causal tracing (Figures 7-8): noise std in units of the
                                      # embeddings' std (Meng et al.: 3)
    trace_samples: int = 10           # noise draws per corrupted run (Meng et al.: 10)
    trace_window: int = 10            # MLP / attention outputs restored in this many layers around
                                      # each (Meng et al.: 10; the tiny preset: 1 of its 4 layers)
    ci: str = "vector"                # (spd.Config fields with another default here)
    last_token_only: bool = False
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    RUN_ONLY: ClassVar = spd.Config.RUN_ONLY | {"threads", "out_dir", "threshold", "save", "edit_patterns",
                                                "trace_noise", "trace_samples", "trace_window"}

PRESETS = {
    # A.3.1 (Figure 6), every row; the non-stochastic layerwise loss is not in the table: 0
    "paper": dict(batch_size=2, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                  lr_schedule="constant", lr_warmup=0.01, steps=20_000, C=768, d_gate=64,
                  ci="vector", beta_stochastic_recon=0.1, beta_stochastic_partial_recon=10,
                  beta_stochastic_layerwise_recon=0.1, beta_recon=0.1, beta_partial_recon=10,
                  beta_layerwise_recon=0.0, beta_faithfulness=1e6, beta_minimality=0.05,
                  p_start=0.9, p_final=0.1, last_token_only=False, n_mask_samples=1,
                  log_every=1000, checkpoint_every=0),  # at GPT-2 size a checkpoint is ~40 GB:
                                                        # only on Ctrl-C unless asked for
}
# the same losses, betas and schedule at the tiny model's size: C = d_model (as the paper's
# C = 768 = GPT-2's d_model), D_gate = C/4, one thread (tiny tensors: a second thread only adds
# overhead, and on a busy machine it slows the run many-fold). 16 matrices run at 10-21 steps/s
# on one core, by the hour (per-op overhead: every loss term is a forward through 16 decomposed
# layers), so 2500 steps (2-4 min) fit the 5-minute budget with training the target (~20-40 s)
PRESETS["tiny"] = {**PRESETS["paper"], "C": TINY_CONFIG["n_embd"], "d_gate": 16, "steps": 2500,
                   "log_every": 250, "threads": 1, "trace_window": 1}

RULES = {**spd.CONFIG_RULES,  # the allowed values of FactsConfig's own fields
         "model": (lambda v: v != "", "gpt2, a hub id, a local folder, tiny or gpt2-random"),
         "preset": (lambda v: True, "any text"), "patterns": (lambda v: v != "", "module globs"),
         "edit_patterns": (lambda v: v != "", "module globs"),
         "threshold": (lambda v: 0 <= v < 1, "in [0, 1)"), "out_dir": (lambda v: v != "", "a folder"),
         "tiny_path": spd._FILE, "threads": spd._THREADS, "trace_noise": spd._NONNEGATIVE,
         "trace_samples": spd._at_least(1), "trace_window": spd._at_least(1)}

def parse_config(argv):
    """FactsConfig from '--key=value' strings: the preset's dict first, then the overrides."""
    probe = spd.apply_overrides(FactsConfig(), argv)   # fails on an unknown key or a bad value
    preset = probe.preset or ("tiny" if probe.model == "tiny" else "paper")
    if preset not in PRESETS:
        raise spd.SPDError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = spd.apply_overrides(FactsConfig(**PRESETS[preset]), argv)
    cfg.preset = preset
    spd.check_config(cfg, RULES)
    if cfg.batch_size % len(ATHLETE_FACTS):
        raise spd.SPDError(f"--batch_size must be a multiple of {len(ATHLETE_FACTS)} "
                           f"(every batch holds both facts), got {cfg.batch_size}")
    if cfg.last_token_only:  # spd takes the last column, a pad token for the shorter fact
        raise spd.SPDError("--last_token_only=true: the facts are right-padded to different "
                           "lengths, so the last position is not each fact's own; use false (A.3.1)")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg

# -----------------------------------------------------------------------------
# analyses (Sections 5.2, 6.2, A.3.2)

def short(name):
    return name.removeprefix("transformer.")

def activity(g, weight, threshold):
    """{layer: on (B, S, C) bool}: g > threshold at the valid positions (weight (B, S) > 0)."""
    return {n: (v > threshold) & (weight[..., None] > 0) for n, v in g.items()}

def unique_at(on, layers, b, pos):
    """{layer: [c, ...]}: active at example b's position pos and nowhere in the other example."""
    return {n: (on[n][b, pos] & ~on[n][1 - b].any(0)).nonzero().flatten().tolist() for n in layers}

def merge(*chosen):
    """Union of {layer: [c, ...]} dicts, empty layers dropped."""
    out = {}
    for ch in chosen:
        for n, cs in ch.items():
            out[n] = sorted(set(out.get(n, [])) | set(cs))
    return {n: cs for n, cs in out.items() if cs}

def orthogonal_projection(W, u, v):
    """W - Σ_k (û_kᵀ W v̂_k) û_k v̂_kᵀ with û = u/|u|, v̂ = v/|v| (Sec. 5.2); an edited copy.

    W (d_out, d_in), u (k, d_out) output directions, v (k, d_in) input directions. The paper's
    formula as written: with one pair, ûᵀ W' v̂ = 0; with pairs that are not orthogonal to each
    other the sum is not a projection (û_kᵀ W' v̂_k need not be 0, and a second edit changes W)."""
    if W.dim() != 2 or u.dim() != 2 or v.dim() != 2 or u.shape != (len(v), W.shape[0]) \
            or v.shape[1] != W.shape[1]:
        raise spd.SPDError(f"orthogonal_projection needs W (d_out, d_in), u (k, d_out), v (k, d_in); "
                           f"got W {tuple(W.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}")
    if not (u.norm(dim=1).all() and v.norm(dim=1).all()):
        raise spd.SPDError("orthogonal_projection: a direction is zero, so there is nothing to "
                           "project out")
    u, v = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    coef = torch.einsum("ko,oi,ki->k", u, W, v)                 # û_kᵀ W v̂_k
    return W - torch.einsum("k,ko,ki->oi", coef, u, v)          # (d_out, d_in)

@torch.no_grad()
def suppress_subcomponents(target, s, chosen):
    """A copy of `target` with each chosen subcomponent's direction pair (U[:, c], V[c]) of the
    decomposition s projected out of its layer's weight (Sec. 5.2; any spd.SPDModel, not only
    GPT-2's). chosen: {layer name: [c, ...]}. The caller's model is untouched, and an edited
    layer's weight is untied in the copy first (GPT-2's lm_head shares wte's), so only it changes."""
    edited = copy.deepcopy(target)
    for name, cs in chosen.items():
        if name not in s.layers:
            raise spd.SPDError(f"{name!r} is not a decomposed layer; decomposed: {', '.join(s.layers)}")
        layer = s.layers[name]
        try:
            cs = [int(c) if float(c).is_integer() and not isinstance(c, (bool, str)) else c  # (3.0 -> 3;
                  for c in cs]                                  # tensors hash by id; "1", True stay: refused)
        except (TypeError, ValueError):                                 # (not a list; nan, inf)
            cs = None
        if cs is None or len(set(cs)) != len(cs) or not all(type(c) is int and 0 <= c < layer.V.shape[0]
                                                             for c in cs):
            raise spd.SPDError(f"{name}: subcomponents {chosen[name]} must be a list of distinct "
                               f"integers in 0..{layer.V.shape[0] - 1}")
        module = edited.get_submodule(name)
        if not torch.equal(spd.layer_weight(module), layer.W.to(module.weight)):
            raise spd.SPDError(f"{name}: this model's weight is not the one s decomposed; pass "
                               f"that model")
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), module.weight.requires_grad)
        W = spd.layer_weight(module)                            # a view into the copy's own weight
        W.copy_(orthogonal_projection(W, layer.U[:, cs].T.to(W), layer.V[cs].to(W)))
    return edited

def suppress(model, s, chosen):
    """The original model with the chosen directions projected out (an unchanged copy if none)."""
    return suppress_subcomponents(model, s, {n: cs for n, cs in chosen.items() if cs})

def athlete_probs(model, tokenizer):
    """[[P(basketball), P(golf)] for the Kobe prompt, same for the Tiger prompt]."""
    prompts = [f.rsplit(" ", 1)[0] for f in ATHLETE_FACTS]
    return last_token_probs(model, tokenizer, prompts, SPORTS).cpu().tolist()

def fact_set_effect(before, after, target):
    """Figure 3 numbers for one edit: P(final word) of the target fact vs the other athlete fact
    and FACTS. before/after: (2 + len(FACTS) + k,) tensors, ATHLETE_FACTS first, FACTS next, then
    k more athlete facts (the tiny model's other athletes; k = 0 for GPT-2).
    "selective" is issue 11's reading of the paper's claim: the target's P falls at least 5x while
    the other athlete's P and the FACTS mean each move by at most 0.05."""
    n = 2 + len(FACTS)
    others = [i for i in range(n) if i != target]
    drop = before - after
    o_drop = drop[others]
    e = {"target": ATHLETE_FACTS[target], "target_before": before[target].item(),
         "target_after": after[target].item(),
         "other_athlete_before": before[1 - target].item(),
         "other_athlete_after": after[1 - target].item(),
         "facts_before": before[2:n].tolist(), "facts_after": after[2:n].tolist(),
         "facts_mean_before": before[2:n].mean().item(), "facts_mean_after": after[2:n].mean().item(),
         "others_mean_abs_change": o_drop.abs().mean().item(),
         "others_max_drop": o_drop.max().item(),
         "others_max_drop_fact": (ATHLETE_FACTS + FACTS)[others[int(o_drop.argmax())]]}
    if len(before) > n:
        e["more_athletes_mean_before"] = before[n:].mean().item()
        e["more_athletes_mean_after"] = after[n:].mean().item()
    e["selective"] = bool(e["target_after"] <= e["target_before"] / 5
                          and abs(e["other_athlete_after"] - e["other_athlete_before"]) <= 0.05
                          and abs(e["facts_mean_after"] - e["facts_mean_before"]) <= 0.05)
    return e

@torch.no_grad()
def zero_mlp_probs(model, tokenizer):
    """Figure 9 (A.3.2): [[P(basketball | Kobe prompt), P(golf | Tiger prompt)] with block i's MLP
    zeroed (c_fc and c_proj weights and biases = 0, so the MLP adds exactly 0 to the residual
    stream), i = 0..L-1], and the mean P(final word) over FACTS with it zeroed (how much of the
    model in general that MLP is: GPT-2's MLP 0 is most of it, A.3.2)."""
    out = []
    for i in range(len(model.transformer.h)):
        m = copy.deepcopy(model)
        for p in m.transformer.h[i].mlp.parameters():
            p.zero_()
        out.append(sport_and_facts(m, tokenizer))
        del m
    return out


def sport_and_facts(model, tokenizer):
    """{"P(sport)": [P(basketball | Kobe prompt), P(golf | Tiger prompt)], "facts_mean": the mean
    P(final word) over FACTS}: the Figure 9 numbers of one model."""
    P = athlete_probs(model, tokenizer)
    return {"P(sport)": [P[0][0], P[1][1]], "facts_mean": final_word_probs(model, tokenizer, FACTS).mean().item()}

@torch.no_grad()
def causal_trace(model, prompt_ids, target_id, eps, kind, window=10):
    """Causal tracing (Meng et al. 2022, Sec. 2.1), the paper's Figures 7-8 (A.3.2).

    Three runs of the prompt: clean; corrupted, eps (samples, n, d) added to the token embeddings
    of its first n tokens (the subject: the athlete's name); and corrupted with one state
    restored to its clean value, for each token i and layer l:
        kind "hidden": block l's output at token i;
        kind "mlp" / "attn": the MLP's / attention's output at token i in each of the `window`
        layers around l, l - window//2 .. l - window//2 + window - 1 (clipped to the model), as
        Meng et al. restore sublayers (their window: 10).
    Returns (P clean, P corrupted, grid (S, L) of P restored): P(target_id) after the prompt,
    averaged over the noise samples, which every corrupted run shares."""
    blocks, (samples, n, _) = model.transformer.h, eps.shape
    L, S = len(blocks), len(prompt_ids)
    x = torch.tensor([prompt_ids], device=eps.device)                   # (1, S)
    part = lambda l: blocks[l] if kind == "hidden" else getattr(blocks[l], kind)
    state = lambda out: out[0] if isinstance(out, tuple) else out       # (rows, S, d), in place
    P = lambda rows: model(x.expand(rows, S)).logits[:, -1].softmax(-1)[:, target_id]  # (rows,)

    def corrupt(mod, inputs, out):                                      # out (R·samples, S, d)
        out[:, :n] += eps.repeat(len(out) // samples, 1, 1)
    # 1) the clean run: each layer's state at every token
    clean = {}

    def keep(l):
        def hook(mod, inputs, out):
            clean[l] = state(out)[0].clone()                            # (S, d)
        return hook
    with _hooked([(part(l), keep(l)) for l in range(L)]):
        p_clean = P(1).item()
    # 2) corrupted: the subject's token embeddings + eps
    with _hooked([(model.transformer.wte, corrupt)]):
        p_corrupted = P(samples).mean().item()
    # 3) corrupted, rows i·samples .. (i+1)·samples - 1 restoring token i at layer l (or its window)
    tok = torch.arange(S, device=eps.device)

    def restore(l):
        def hook(mod, inputs, out):
            state(out).view(S, samples, S, -1)[tok, :, tok] = clean[l][:, None]   # (S, samples, d)
        return hook
    grid = torch.zeros(S, L, dtype=torch.float64)
    for l in range(L):
        lo = l if kind == "hidden" else max(0, l - window // 2)
        hi = l + 1 if kind == "hidden" else min(L, l - window // 2 + window)
        with _hooked([(model.transformer.wte, corrupt)] + [(part(j), restore(j)) for j in range(lo, hi)]):
            grid[:, l] = P(S * samples).view(S, samples).mean(1).cpu()
    return p_clean, p_corrupted, grid

@contextlib.contextmanager
def _hooked(pairs):
    """Inside, each (module, hook) pair's forward hook is registered (diagnostics only)."""
    handles = [m.register_forward_hook(f) for m, f in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

# -----------------------------------------------------------------------------
# the experiment

def run(cfg):
    """Decompose the target over the two athlete facts, run analyses 0-7, write results.json.
    Returns the results dict. Holds the out_dir's lock throughout: a second run into it stops."""
    spd.make_dir(cfg.out_dir, "--out_dir")
    same_dir = os.path.realpath(os.path.dirname(cfg.tiny_path) or ".") == os.path.realpath(cfg.out_dir)
    if same_dir and os.path.basename(cfg.tiny_path).startswith(("spd.pt", "checkpoint.pt", "results",
                                                                 "figure")):
        raise spd.SPDError(f"--tiny_path={cfg.tiny_path} is where this run writes its results; pass "
                           f"another --tiny_path")
    with spd._locked(os.path.join(cfg.out_dir, "checkpoint.pt"), whole_run=True):
        return _run(cfg)

def _run(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spd.keep_freed_memory()  # fewer page faults per step (README, "Step time"); process-wide
    torch.manual_seed(cfg.seed)
    t_start, device = time.time(), torch.device(cfg.device)
    done = [f for f in ("results.json", "spd.pt") if os.path.exists(os.path.join(cfg.out_dir, f))]
    checkpoint = os.path.join(cfg.out_dir, "checkpoint.pt")
    if cfg.resume and not os.path.exists(checkpoint):         # checked before the model is loaded
        raise spd.SPDError(f"no checkpoint to resume in {cfg.out_dir}" + (
            f" (it holds an earlier run's {done[0]})" if done else "; run without --resume=true"))
    if done and not cfg.resume:
        raise spd.SPDError(f"{cfg.out_dir} holds an earlier run's {done[0]}; pass another --out_dir, "
                           f"or delete it to run again")
    res = {"config": dataclasses.asdict(cfg)}

    # 1) the target, and a check that it predicts both facts
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.tiny_path)
    edit_layers = spd.match_modules(model, cfg.edit_patterns)      # (bad patterns: before any work)
    decomposed = spd.match_modules(model, cfg.patterns)
    missing = [n for n in edit_layers if n not in decomposed]
    if missing:
        raise spd.SPDError(f"--edit_patterns names {missing[0]!r}, which --patterns does not decompose")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.model}: GPT2LMHeadModel, {n_params:,} parameters, "
          f"{model.config.n_layer} layers, d_model {model.config.n_embd}, device {device}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    x, valid = make_batch(tokenizer, ATHLETE_FACTS)                   # (B, S)
    x, weight = x.to(device), valid.float().to(device)
    tokens = [token_strings(tokenizer, row[v]) for row, v in zip(x.cpu(), valid)]
    P0 = athlete_probs(model, tokenizer)
    top = last_logits(model, tokenizer, [f.rsplit(" ", 1)[0] for f in ATHLETE_FACTS]).argmax(-1)
    correct = predicts_final_word(model, tokenizer, ATHLETE_FACTS).tolist()
    print(f"\n{'prompt':32s} | P(basketball) | P(golf) | argmax")
    for f, p, t in zip(ATHLETE_FACTS, P0, top):
        print(f"{f.rsplit(' ', 1)[0]:32s} | {p[0]:13.4f} | {p[1]:7.4f} | {tokenizer.decode([int(t)])!r}")
    if not all(correct):
        print("warning: the target does not predict every fact's final word (meaningless on gpt2-random)")
    res["model"] = {"name": cfg.model, "parameters": n_params, "device": str(device),
                    "threads": torch.get_num_threads()}
    res["tokens"] = tokens
    res["target_check"] = {"P(basketball)": [p[0] for p in P0], "P(golf)": [p[1] for p in P0],
                           "argmax": [tokenizer.decode([int(t)]) for t in top], "correct": correct}

    if cfg.model != "gpt2-random":                         # (random weights: speed and memory only)
        res["zero_mlp"] = report_zero_mlp(model, tokenizer)    # Figure 9, before any SPD
        res["causal_trace"] = report_causal_trace(model, tokenizer, cfg)   # Figures 7-8

    # 2) the decomposition (Algorithm 3, A.3.1): batch = both facts, loss on every valid token
    torch.manual_seed(cfg.seed)  # the same start whether the tiny target was trained or loaded
    with device:  # U, V and the CI MLPs are created on the device (3.3 B numbers for the paper preset)
        s = spd.SPDModel(model, cfg.patterns, C=cfg.C, ci=cfg.ci, d_gate=cfg.d_gate,
                         max_seq_len=model.config.n_positions, causal=cfg.ci_causal).to(device)
    n_train = sum(p.numel() for p in s.trainable_parameters())
    reps = cfg.batch_size // len(ATHLETE_FACTS)
    xb, wb = x.repeat(reps, 1), weight.repeat(reps, 1)                  # (batch_size, S)
    step_s = time_step(s, cfg, xb, wb)
    print(f"\npreset {cfg.preset}: decomposing {len(s.layers)} matrices ({cfg.patterns}), "
          f"C {cfg.C} each = {cfg.C * len(s.layers):,} subcomponents, {cfg.ci} CI with "
          f"D_gate {cfg.d_gate}, {n_train:,} trainable parameters")
    print(f"{cfg.steps} steps, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr}, "
          f"expected ~{step_s * cfg.steps / 60:.1f} min ({1 / step_s:.4g} steps/s measured)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    history = spd.train(s, cfg, lambda: (xb, wb), log=print, checkpoint=checkpoint)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.time() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    last = history[-1]
    terms = [k for k in last if k not in ("step", "total", "L0", "it/s")]
    print(f"\ndecomposition done: {train_s:.0f} s, {cfg.steps / train_s:.4g} steps/s"
          + (f", peak GPU memory {peak:.1f} GiB" if peak is not None else ""))
    print("final losses: " + ", ".join(f"{k} {last[k]:.2e}" for k in terms))
    res["training"] = {"steps": cfg.steps, "seconds": train_s, "steps_per_s": cfg.steps / train_s,
                       "peak_gpu_memory_gib": peak, "trainable_parameters": n_train,
                       "final": last, "history": history}
    if cfg.save:
        path = os.path.join(cfg.out_dir, "spd.pt")
        spd.save(s, path, cfg)
        res["training"]["saved"] = path

    # 3) analyses; every edit below is applied to the ORIGINAL model, never the decomposed one
    if cfg.model == "gpt2-random":
        print("\ngpt2-random has random weights: the analyses would measure nothing, so they are "
              "skipped (speed and memory only)")
    else:
        res.update(analyses(model, s, x, weight, tokens, tokenizer, edit_layers, P0, cfg))

    res["wall_seconds"] = time.time() - t_start
    spd.atomic_write(os.path.join(cfg.out_dir, "results.json"), res)
    if os.path.exists(checkpoint):
        os.remove(checkpoint)                                    # complete: results.json holds it
    figures = save_figures(res, cfg.out_dir) if "fact_set" in res else None
    print(f"\nwrote {os.path.join(cfg.out_dir, 'results.json')}"
          + (f", {res['training']['saved']}" if "saved" in res["training"] else "")
          + (f" and {', '.join(figures)}" if figures else " (no matplotlib: no figures)"
             if figures is not None else "")
          + f"; total {res['wall_seconds']:.0f} s")
    return res

def analyses(model, s, x, weight, tokens, tokenizer, edit_layers, P0, cfg):
    """Analyses 1-7 of the module docstring on the trained decomposition s; a dict."""
    res = {"config": dataclasses.asdict(cfg)}                         # (report_claim reads it)
    g = spd.causal_importances(s, x)                                 # {layer: (B, S, C)}
    order = [n for n, _ in model.named_modules() if n in g]          # block by block
    on = activity({n: g[n] for n in order}, weight, cfg.threshold)
    res["active"] = report_active(on, tokens, cfg.threshold)
    res["unique_layer0_mlp"], chosen, labels = report_unique(on, edit_layers, tokenizer, tokens)
    edits = {SPORTS[b]: merge(chosen[b]["first"], chosen[b]["last"]) for b in range(2)}
    edited = {sport: suppress(model, s, ch) for sport, ch in edits.items()}
    res["suppression"] = report_suppression(model, edited, edits, tokenizer, P0)
    more = TINY_ATHLETE_FACTS[2:] if cfg.model == "tiny" else ()   # the tiny model's other athletes
    res["fact_set"] = report_fact_set(model, edited, tokenizer, more)
    res["names"] = report_names(model, s, chosen, labels, tokenizer)
    res["reversed"] = report_reversed(model, edited["golf"], tokenizer)
    res["claim"] = report_claim(res)
    res["where"] = report_where(model, s, on, tokenizer, edit_layers, more)
    return res

def time_step(s, cfg, x, weight, n=2):
    """Seconds per training step (forward + backward, no update) for the runtime estimate."""
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)
    spd.training_step(s, x, cfg, 0, weight)[0].backward()          # warm-up
    sync()
    t = time.time()
    for _ in range(n):
        spd.training_step(s, x, cfg, 0, weight)[0].backward()
    sync()
    for p in s.trainable_parameters():
        p.grad = None
    return (time.time() - t) / n

def report_active(on, tokens, threshold):
    """Analysis 1: active subcomponents per layer and token, the total, those on one example only."""
    B = len(tokens)
    print(f"\n(1) active subcomponents (g > {threshold}) per layer and token; 'total' = distinct "
          f"over both examples, 'only k' = active in example k and nowhere in the other")
    head = " ".join(f"{t.strip()[:7]:>7s}" for row in tokens for t in row)
    print(f"{'layer':18s} {head} | total only0 only1")
    per_layer, total, only = {}, 0, [0] * B
    for n, v in on.items():
        per_token = [v[b, :len(tokens[b])].sum(-1).tolist() for b in range(B)]   # counts per position
        in_ex = v.any(1)                                                        # (B, C)
        n_total = int(in_ex.any(0).sum())
        n_only = [int((in_ex[b] & ~in_ex[1 - b]).sum()) for b in range(B)]
        per_layer[n] = {"per_token": per_token, "total": n_total, "only_in": n_only}
        total += n_total
        only = [a + c for a, c in zip(only, n_only)]
        print(f"{short(n):18s} " + " ".join(f"{c:7d}" for row in per_token for c in row)
              + f" | {n_total:5d} {n_only[0]:5d} {n_only[1]:5d}")
    print(f"total active subcomponents: {total} (paper, GPT-2-small: 96); only in "
          f"'{ATHLETE_FACTS[0]}': {only[0]}, only in '{ATHLETE_FACTS[1]}': {only[1]}")
    return {"threshold": threshold, "per_layer": per_layer, "total": total, "only_in": only}

def report_unique(on, edit_layers, tokenizer, tokens):
    """Analysis 1b: the edit-layer subcomponents unique to each athlete at its name tokens: the
    first name's last token ("obe" of "K|obe", in GPT-2's BPE and the tiny tokenizer) and the
    last name's last token (GPT-2: " Bryant", " Woods"; tiny: "ant", "ods" of " Bry|ant", " Wo|ods")."""
    out, chosen, labels = {}, [], []
    print(f"\n(1b) subcomponents of {', '.join(short(n) for n in edit_layers)} active at a name "
          f"token and nowhere in the other example")
    for b, (first, last) in enumerate(ATHLETES):
        pos = {"first": len(tokenizer.encode(first)) - 1,
               "last": len(tokenizer.encode(f"{first} {last}")) - 1}
        lab = {k: tokens[b][p].strip() for k, p in pos.items()}
        ch = {k: unique_at(on, edit_layers, b, p) for k, p in pos.items()}
        for k in pos:
            found = "  ".join(f"{short(n)} {cs}" for n, cs in ch[k].items() if cs) or "none found"
            print(f"{first + ' ' + last:12s} token {lab[k]!r:9} (position {pos[k]}): {found}")
        out[f"{first} {last}"] = {lab[k]: {"position": pos[k], "kind": k, "unique": ch[k]} for k in pos}
        chosen.append(ch)
        labels.append(lab)
    return out, chosen, labels

def report_suppression(model, edited, edits, tokenizer, P0):
    """Analysis 2: P(golf) and P(basketball) on both prompts, before and after each edit."""
    print("\n(2) suppression by orthogonal projection in the original model "
          "(paper's Figure 3, golf edit: P(golf) 0.620 -> 0.090, P(basketball) stays 0.630)")
    print(f"{'edit':14s} {'directions':28s} | Kobe: P(basketball) P(golf) | Tiger: P(basketball) P(golf)")
    fmt = lambda P: f"{P[0][0]:19.4f} {P[0][1]:7.4f} | {P[1][0]:20.4f} {P[1][1]:7.4f}"
    print(f"{'none':14s} {'':28s} | {fmt(P0)}")
    out = {"before": P0}
    for sport, m in edited.items():
        P = athlete_probs(m, tokenizer)
        k = sum(len(cs) for cs in edits[sport].values())
        desc = " ".join(f"{short(n).replace('.mlp', '')}{cs}" for n, cs in edits[sport].items())
        print(f"{'-' + sport:14s} {desc or 'none found':28s} | {fmt(P)}")
        out[sport] = {"chosen": edits[sport], "n_directions": k, "after": P}
    return out

def report_fact_set(model, edited, tokenizer, more=()):
    """Analysis 3 (Figure 3): each edit on its target fact vs the other athlete and FACTS (and
    `more` athlete facts: the tiny model's other athletes, who share the name pieces)."""
    sentences = ATHLETE_FACTS + FACTS + list(more)
    before = final_word_probs(model, tokenizer, sentences)
    out = {}
    print(f"\n(3) Figure 3: P(final word) before -> after, target fact vs the other athlete and the "
          f"{len(FACTS)} facts" + (f" (and the {len(more)} other athletes of the training set)" if more else ""))
    print(f"{'edit':12s} | {'target':15s} | {'other athlete':15s} | {'FACTS mean':15s} | "
          + (f"{'more athletes':15s} | " if more else "")
          + "largest drop among the 101 others | selective")
    for b, (sport, m) in enumerate(edited.items()):
        e = fact_set_effect(before, final_word_probs(m, tokenizer, sentences), b)
        out[sport] = e
        print(f"{'-' + sport:12s} | {e['target_before']:.4f} -> {e['target_after']:.4f} | "
              f"{e['other_athlete_before']:.4f} -> {e['other_athlete_after']:.4f} | "
              f"{e['facts_mean_before']:.4f} -> {e['facts_mean_after']:.4f} | "
              + (f"{e['more_athletes_mean_before']:.4f} -> {e['more_athletes_mean_after']:.4f} | " if more else "")
              + f"{e['others_max_drop']:.4f} ({e['others_max_drop_fact'][:30]!r}) | "
              f"{'yes' if e['selective'] else 'no'}")
    print("selective = the target's P falls at least 5x, the other athlete's P and the FACTS mean "
          "each move by at most 0.05")
    return out

def report_names(model, s, chosen, labels, tokenizer):
    """Analysis 4 (Figure 4): each athlete with its first-name direction(s) alone, its last-name
    direction(s) alone, both."""
    print("\n(4) Figure 4: P(sport) with the first-name / last-name / both directions suppressed")
    out = {}
    for b, (first, last) in enumerate(ATHLETES):
        prompt = ATHLETE_FACTS[b].rsplit(" ", 1)[0]
        ch = chosen[b]
        variants = {"none": {}, "first": ch["first"], "last": ch["last"],
                    "both": merge(ch["first"], ch["last"])}
        P = {k: last_token_probs(suppress(model, s, v), tokenizer, [prompt], [SPORTS[b]]).item()
             for k, v in variants.items()}
        out[f"{first} {last}"] = {"sport": SPORTS[b], "first_token": labels[b]["first"],
                                  "last_token": labels[b]["last"], **P,
                                  "n_directions": {k: sum(map(len, v.values())) for k, v in variants.items()}}
        print(f"P({SPORTS[b]}) on '{prompt}': full {P['none']:.4f} | "
              f"-{labels[b]['first']!r} {P['first']:.4f} | -{labels[b]['last']!r} {P['last']:.4f} | "
              f"both {P['both']:.4f}")
    return out

def report_reversed(model, edited_golf, tokenizer):
    """Analysis 5 (Sec. 6.2): "The most famous athlete in golf is" -> " Tiger Woods", before and
    after the golf edit: P(" Tiger Woods") (the product over its tokens) and the greedy completion."""
    ids = tokenizer.encode(REVERSED_PROMPT + " " + REVERSED_TARGET)
    n = len(tokenizer.encode(REVERSED_PROMPT))
    out = {"prompt": REVERSED_PROMPT, "target": REVERSED_TARGET}
    for k, m in (("before", model), ("after", edited_golf)):
        with torch.no_grad():
            logp = m(input_ids=torch.tensor([ids], device=next(m.parameters()).device)).logits[0].log_softmax(-1)
        out[k] = logp[n - 1:-1].gather(-1, torch.tensor(ids[n:], device=logp.device)[:, None]).sum().exp().item()
        out[f"greedy_{k}"] = greedy_completion(m, tokenizer, REVERSED_PROMPT, REVERSED_TARGET)
    out["still_answers"] = out["greedy_after"] == " " + REVERSED_TARGET
    print(f"\n(5) reversed prompt '{REVERSED_PROMPT}': P({REVERSED_TARGET}) {out['before']:.4f} -> "
          f"{out['after']:.4f} after the golf edit; greedy {out['greedy_before']!r} -> "
          f"{out['greedy_after']!r} (still answers {REVERSED_TARGET}: "
          f"{'yes' if out['still_answers'] else 'no'})")
    return out

def report_zero_mlp(model, tokenizer):
    """Analysis 0 (Figure 9), before any SPD: where the model needs an MLP for the two facts."""
    rows, full = zero_mlp_probs(model, tokenizer), sport_and_facts(model, tokenizer)
    print(f"\n(0) Figure 9: one MLP zeroed at a time | Kobe: P(basketball) | Tiger: P(golf) | FACTS mean")
    for name, r in [("none", full)] + [(f"MLP {i}", r) for i, r in enumerate(rows)]:
        print(f"{name:38s} | {r['P(sport)'][0]:17.4f} | {r['P(sport)'][1]:13.4f} | {r['facts_mean']:.4f}")
    return {"full": full, "layers": rows}

def report_causal_trace(model, tokenizer, cfg):
    """Analysis 0b (Figures 7-8), before any SPD: causal tracing of each athlete fact, the name's
    token embeddings corrupted. The noise's std is cfg.trace_noise times the std of the token
    embeddings of every fact here (Meng et al. take it over their facts' subjects, which we do not
    have). "Half" (our reading; the figures give no numbers): the layers where restoring the MLP
    outputs at the last name token brings back at least half of what the noise took."""
    ids = sorted({i for f in ATHLETE_FACTS + FACTS for i in tokenizer.encode(f)})
    wte = model.transformer.wte.weight
    sigma = wte[ids].std().item()
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {"noise_std": cfg.trace_noise * sigma, "samples": cfg.trace_samples, "window": cfg.trace_window}
    print(f"\n(0b) Figures 7-8, causal tracing (Meng et al.): the name's embeddings + noise of std "
          f"{cfg.trace_noise} x {sigma:.3g}, {cfg.trace_samples} draws; P(sport) with one state "
          f"restored at a token (rows) and layer (columns); MLP and attention: in a window of "
          f"{cfg.trace_window} layer{'s' if cfg.trace_window > 1 else ''}")
    for (first, last), fact in zip(ATHLETES, ATHLETE_FACTS):
        prompt, target = split_prompt(tokenizer, fact)
        n = len(tokenizer.encode(f"{first} {last}"))                    # the name's tokens lead
        eps = out["noise_std"] * torch.randn(cfg.trace_samples, n, wte.shape[1], generator=gen)
        r = {"tokens": token_strings(tokenizer, prompt)}
        for kind in ("hidden", "mlp", "attn"):
            r["clean"], r["corrupted"], grid = causal_trace(model, prompt, target, eps.to(wte),
                                                            kind, cfg.trace_window)
            r[kind] = grid.tolist()
        got = [r["mlp"][n - 1][l] - r["corrupted"] for l in range(len(r["mlp"][0]))]
        r["half"] = [l for l, g in enumerate(got) if g >= (r["clean"] - r["corrupted"]) / 2 > 0]
        out[f"{first} {last}"] = r
        print(f"{fact}: clean {r['clean']:.4f}, corrupted {r['corrupted']:.4f}; MLP restored at "
              f"{r['tokens'][n - 1]!r} brings back half at layers {r['half'] or 'none'}")
        for kind in ("hidden", "mlp", "attn"):
            print(f"  {kind:8s}" + "".join(f"{l:>6d}" for l in range(len(r[kind][0]))))
            for t, row in zip(r["tokens"], r[kind]):
                print(f"  {t!r:>8s}" + "".join(f"{p:6.3f}" for p in row))
    return out

def report_where(model, s, on, tokenizer, edit_layers, more=()):
    """Analysis 7: where the two facts are, to read Analysis 6 by. (a) each block's attention / MLP
    output zeroed at the name tokens only (is the fact assembled there?); (b) the (1b) search in
    every decomposed matrix in turn, and in all at once (do the unique subcomponents of some layer
    carry it?); (c) every edit-layer subcomponent active at any name token, unique or not (does the
    edit layer carry it in directions the two examples share?)."""
    out, prompts = {}, [f.rsplit(" ", 1)[0] for f in ATHLETE_FACTS]
    print(f"\n(7) where the facts are\n(7a) one block's attention or MLP output zeroed at the name "
          f"tokens only | Kobe: P(basketball) | Tiger: P(golf)" + (" | other athletes' mean" if more else ""))
    rows = {"none": None} | {f"h.{i}.{part}": getattr(blk, part) for i, blk in enumerate(model.transformer.h)
                             for part in ("attn", "mlp")}
    out["zeroed_at_names"] = {}
    for name, module in rows.items():
        P = (final_word_probs(model, tokenizer, ATHLETE_FACTS + list(more)) if module is None
             else name_zeroed_probs(model, tokenizer, module, ATHLETE_FACTS + list(more)))
        out["zeroed_at_names"][name] = r = {"P(sport)": P[:2].tolist(),
                                            "more_athletes_mean": P[2:].mean().item() if more else None}
        print(f"{name:10s} | {r['P(sport)'][0]:.4f} | {r['P(sport)'][1]:.4f}"
              + (f" | {r['more_athletes_mean']:.4f}" if more else ""))

    def effect(b, chosen):             # P(own sport), P(the other's) and the FACTS mean after an edit
        edited = suppress(model, s, chosen)
        P = athlete_probs(edited, tokenizer)
        return {"n": sum(map(len, chosen.values())), "own": P[b][b], "other": P[1 - b][1 - b],
                "facts_mean": final_word_probs(edited, tokenizer, FACTS).mean().item()}
    pos = [[len(tokenizer.encode(first)) - 1, len(tokenizer.encode(f"{first} {last}")) - 1]
           for first, last in ATHLETES]
    print("(7b) suppressing the subcomponents unique at the name tokens, as (1b), one matrix at a "
          "time | Kobe edit: n, P(basketball), Tiger's P(golf), FACTS mean | Tiger edit: n, P(golf), "
          "Kobe's P(basketball), FACTS mean")
    out["unique_per_matrix"] = {}
    for name in list(on) + ["all"]:
        layers = list(on) if name == "all" else [name]
        e = [effect(b, merge(*(unique_at(on, layers, b, p) for p in pos[b]))) for b in range(2)]
        out["unique_per_matrix"][name] = e
        print(f"{short(name):16s} | " + " | ".join(f"{x['n']:3d} {x['own']:.4f} {x['other']:.4f} "
                                                   f"{x['facts_mean']:.4f}" for x in e))
    print(f"(7c) every {', '.join(short(n) for n in edit_layers)} subcomponent active at any name "
          f"token, unique or not | n, P(own sport), the other's P(sport), FACTS mean")
    out["all_active_at_names"] = []
    for b, (first, last) in enumerate(ATHLETES):
        n_name = len(tokenizer.encode(f"{first} {last}"))
        chosen = {n: on[n][b, :n_name].any(0).nonzero().flatten().tolist() for n in edit_layers}
        out["all_active_at_names"].append(e := effect(b, chosen))
        print(f"{first + ' ' + last:16s} | {e['n']:3d} {e['own']:.4f} {e['other']:.4f} {e['facts_mean']:.4f}")
    return out

def report_claim(res):
    """Analysis 6: issue 11's test of the paper's claim: each edit selective (Analysis 3) and the
    reversed prompt still answered after the golf edit (Analysis 5)."""
    fs, rev = res["fact_set"], res["reversed"]
    holds = {sport: e["selective"] for sport, e in fs.items()}
    holds["reversed"] = rev["still_answers"]
    print(f"\n(6) the paper's claim (edit layer {res['config']['edit_patterns']}): "
          + ", ".join(f"{k} {'holds' if v else 'fails'}" for k, v in holds.items())
          + "; target P falls " + ", ".join(f"{e['target_before'] / max(e['target_after'], 1e-12):.1f}x"
                                           for e in fs.values())
          + f" (needs >= 5x); other athlete moves "
          + ", ".join(f"{e['other_athlete_after'] - e['other_athlete_before']:+.4f}" for e in fs.values())
          + "; FACTS mean moves "
          + ", ".join(f"{e['facts_mean_after'] - e['facts_mean_before']:+.4f}" for e in fs.values())
          + " (each needs |.| <= 0.05)")
    return {"holds": all(holds.values()), **holds}

def save_figures(res, out_dir):
    """Figures 3, 4, 7, 8 and 9 as PNGs, only if matplotlib is importable. Returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))                # Figure 3
    for ax, (sport, e) in zip(axes, res["fact_set"].items()):
        before = [e["target_before"], e["other_athlete_before"], e["facts_mean_before"]]
        after = [e["target_after"], e["other_athlete_after"], e["facts_mean_after"]]
        xs = range(3)
        ax.bar([i - 0.2 for i in xs], before, 0.4, label="before")
        ax.bar([i + 0.2 for i in xs], after, 0.4, label="after")
        ax.set_xticks(list(xs), ["target fact", "other athlete", "fact set (mean)"])
        ax.set_title(f"suppress the {sport} directions")
        ax.set_ylabel("P(correct final word)")
        ax.set_ylim(0, 1.15)
        ax.legend(loc="upper center", ncol=2)
    paths.append(_savefig(fig, out_dir, "figure3.png"))
    fig, ax = plt.subplots(figsize=(5, 4))                            # Figure 4
    n = res["names"]["Kobe Bryant"]
    ax.bar(["none", n["first_token"], n["last_token"], "both"], [n["none"], n["first"], n["last"], n["both"]])
    ax.set_ylabel("P(basketball)")
    ax.set_title("Kobe Bryant: directions suppressed")
    paths.append(_savefig(fig, out_dir, "figure4.png"))
    fig, ax = plt.subplots(figsize=(6, 4))                            # Figure 9
    z = res["zero_mlp"]
    L = range(len(z["layers"]))
    for b, sport in enumerate(SPORTS):
        ax.bar([i + 0.4 * b - 0.2 for i in L], [r["P(sport)"][b] for r in z["layers"]], 0.4,
               label=f"P({sport})")
        ax.axhline(z["full"]["P(sport)"][b], linestyle="--", color=f"C{b}")
    ax.set_xticks(list(L))
    ax.legend()
    ax.set_xlabel("MLP layer zeroed")
    ax.set_ylabel("P(sport); dashed: full model")
    paths.append(_savefig(fig, out_dir, "figure9.png"))
    for number, athlete in zip((7, 8), (f"{a} {b}" for a, b in ATHLETES)):   # Figures 7, 8
        r = res["causal_trace"][athlete]
        fig, axes = plt.subplots(1, 3, figsize=(13, 0.35 * len(r["tokens"]) + 1.5))
        for ax, kind in zip(axes, ("hidden", "mlp", "attn")):
            im = ax.imshow(r[kind], cmap="Purples", vmin=0, vmax=1, aspect="auto")   # one scale: P
            ax.set_xticks(range(len(r[kind][0])))
            ax.set_yticks(range(len(r["tokens"])), r["tokens"])
            ax.set_xlabel("layer")
            ax.set_title(f"{kind} restored")
            fig.colorbar(im, ax=ax, label="P(sport)")
        fig.suptitle(f"{athlete}: causal tracing (clean {r['clean']:.3f}, corrupted {r['corrupted']:.3f})")
        paths.append(_savefig(fig, out_dir, f"figure{number}.png"))
    return paths

def _savefig(fig, out_dir, name):
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    spd.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def main(argv=None):
    """Entry point: `python gpt2_facts.py [--key=value ...]`; input errors and missing weights
    print one line `error: ...` and exit with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:                # (the settings: as the default preset has them)
        cfg = parse_config([])
        return print(__doc__.strip() + "\n\nSettings, --key=value (here the paper preset's values):\n"
                     + spd.settings_text(cfg))
    try:
        return run(parse_config(argv))
    except (spd.SPDError, WeightsUnavailableError) as e:
        print(f"error: {spd.resume_command(e, 'gpt2_facts.py', argv)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:                           # outside training (which saves first)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:            # torch.OutOfMemoryError is a RuntimeError
        if not any(m in str(e) for m in ("allocate memory", "out of memory", "not enough memory")):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:160]}); use a smaller --batch_size, "
              f"--C, --d_gate, --n_mask_samples or --trace_samples", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:                 # the output went to a reader that stopped (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (no error at exit)
        sys.exit(1)
