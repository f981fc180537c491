"""
GPT-2-small fact decomposition and suppression: the model and data half of
"Decomposition of Small Transformer Models" (arXiv 2511.08854), Sections 5.2, 6.2 and A.3.

The paper decomposes GPT-2-small over two facts that it predicts correctly,
    "Kobe Bryant plays the sport of basketball" and "Tiger Woods plays the sport of golf",
suppresses the subcomponents unique to each fact, checks that the edit is selective on a
100-sentence synthetic fact set (A.3.4), and checks that the reversed direction
("The most famous athlete in golf is" -> " Tiger") survives.

This file provides:
  - the data: the two athlete facts, the reversed prompt, and 100 facts in the style of A.3.4
    (the paper's 30-sentence excerpt verbatim plus 70 of our own; the full set is unpublished);
  - the models, all `transformers.GPT2LMHeadModel`, so the same Conv1D module paths
    (transformer.h.{i}.attn.c_attn / attn.c_proj / mlp.c_fc / mlp.c_proj, weight (d_in, d_out))
    work for each:
        "gpt2"         the real GPT-2-small (cached hub weights, or a local folder path)
        "tiny"         a small GPT-2 trained here in seconds to memorise the facts (runs offline)
        "gpt2-random"  GPT-2-small shapes, random weights: only for memory/speed checks
  - helpers: split a fact into prompt + target token, pad a batch, read next-token probabilities.
Left out (comes later): the SPD decomposition itself (spd.py) and the suppression experiments.

Run:  python gpt2_facts.py                 (real GPT-2; needs the weights cached or a local folder)
      python gpt2_facts.py --model=tiny    (fully offline)
"""

import os
import socket
import sys
import time
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

# -----------------------------------------------------------------------------
# data

# Section 5.2: the two facts decomposed over; the target of each is its final word
ATHLETE_FACTS = ["Kobe Bryant plays the sport of basketball", "Tiger Woods plays the sport of golf"]
# Section 6.2: the reversed direction, expected completion " Tiger"
REVERSED_PROMPT = "The most famous athlete in golf is"
REVERSED_TARGET = "Tiger"

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
# every sentence any model here sees: the tiny model is trained on exactly these
ALL_SENTENCES = ATHLETE_FACTS + FACTS + [f"{REVERSED_PROMPT} {REVERSED_TARGET}"]

# -----------------------------------------------------------------------------
# tokenizers: GPT-2's BPE tokenizer (from transformers) or a word-level one, same interface `encode`

class WordTokenizer:
    """One token per space-separated word (punctuation stays part of the word), vocabulary built
    from `sentences` in order of first appearance. Id 0 is <pad>. Makes "Kobe", "Bryant", "Tiger",
    "Woods", "golf", "basketball" single tokens. Unknown words fail loudly."""

    def __init__(self, sentences=ALL_SENTENCES):
        self.words = ["<pad>"]
        for s in sentences:
            self.words += [w for w in s.split() if w not in self.words]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, text):
        unknown = [w for w in text.split() if w not in self.ids]
        assert not unknown, f"words not in the WordTokenizer vocabulary: {unknown}"
        return [self.ids[w] for w in text.split()]

    def decode(self, ids):
        return " ".join(self.words[int(i)] for i in ids)

def split_prompt(tokenizer, sentence):
    """A fact -> (prompt_ids, target_id): the prompt is everything before the final word, the target
    is the first token of " " + final word (GPT-2 BPE: the word with its leading space; word-level:
    the word). The sequence decomposed over is prompt_ids + [target_id]."""
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

def load_model(name="gpt2", device="cpu"):
    """name: "gpt2" (or any hub id / local folder with config.json + weights), "tiny", or
    "gpt2-random". Returns (model in eval mode, float32, dropout 0, on device; tokenizer)."""
    if name == "tiny":
        model, tokenizer = load_tiny()
    elif name == "gpt2-random":
        torch.manual_seed(0)  # GPT-2-small shapes; the word tokenizer's ids all fit in its vocab
        model, tokenizer = GPT2LMHeadModel(GPT2Config(**NO_DROPOUT)), WordTokenizer()
    else:
        model, tokenizer = load_pretrained(name)
    return model.to(device=device, dtype=torch.float32).eval(), tokenizer

def load_pretrained(name):
    # from_pretrained retries an unreachable hub for ~30 s, so look for a cached copy only when
    # a quick TCP check fails (or when name is a local folder / HF_HUB_OFFLINE is set)
    local_only = os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") \
        or not _hub_reachable()
    try:
        model = GPT2LMHeadModel.from_pretrained(name, local_files_only=local_only, dtype=torch.float32,
                                                **NO_DROPOUT)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except Exception as e:
        raise WeightsUnavailableError(
            f"could not load GPT-2 weights {name!r} ({type(e).__name__}; no model hub reachable?): "
            f"run once with hub access to cache them, or pass --model=/path/to/local/gpt2 "
            f"(a folder with config.json, model weights and tokenizer files), "
            f"or run offline with --model=tiny") from None
    return model, tokenizer

def _hub_reachable(timeout=2.0):
    from huggingface_hub import constants
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

# the tiny stand-in: a GPT2LMHeadModel small enough to train on 2 CPU cores in seconds
TINY_CONFIG = dict(n_layer=2, n_embd=64, n_head=2, n_positions=32, bos_token_id=None, eos_token_id=None,
                   **NO_DROPOUT)

def load_tiny(path=TINY_PATH):
    """Load the cached tiny model, or train it (and cache it) if the cache is absent or stale."""
    tokenizer = WordTokenizer()
    if os.path.exists(path):
        ckpt = torch.load(path, weights_only=True)
        if ckpt["words"] == tokenizer.words and ckpt["config"] == TINY_CONFIG:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **TINY_CONFIG))
            model.load_state_dict(ckpt["model"])
            return model, tokenizer
        print(f"{path} was trained on other data or config, retraining")
    model = train_tiny(tokenizer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "words": tokenizer.words, "config": TINY_CONFIG}, path)
    return model, tokenizer

def train_tiny(tokenizer, lr=3e-3, max_steps=3000, eval_interval=50, seed=0):
    """Full-batch next-token LM loss on every token of ALL_SENTENCES, AdamW, until the argmax
    prediction of every sentence's final word is right."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **TINY_CONFIG))
    print(f"training tiny GPT-2: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(ALL_SENTENCES)} sentences, {torch.get_num_threads()} thread(s)")
    input_ids, valid = make_batch(tokenizer, ALL_SENTENCES)  # (B, S)
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
            correct = predicts_final_word(model.eval(), tokenizer, ALL_SENTENCES)
            print(f"step {step:5d} | loss {loss.item():.4f} | final word right "
                  f"{int(correct.sum())}/{len(correct)} | {time.time() - t0:.1f}s")
            if correct.all():
                return model.eval()
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

# -----------------------------------------------------------------------------
# minimal demo (to be replaced by the decomposition + suppression experiment)

if __name__ == "__main__":
    model_name = "gpt2"
    for arg in sys.argv[1:]:
        assert arg.startswith("--model="), f"unknown argument {arg!r} (only --model=... for now)"
        model_name = arg.split("=", 1)[1]
    try:
        model, tokenizer = load_model(model_name)
    except WeightsUnavailableError as e:
        sys.exit(f"error: {e}")
    print(f"model {model_name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    rows = [s.rsplit(" ", 1) for s in ATHLETE_FACTS] + [(REVERSED_PROMPT, REVERSED_TARGET)]
    probs = last_token_probs(model, tokenizer, [p for p, _ in rows], ["basketball", "golf", REVERSED_TARGET])
    top = last_logits(model, tokenizer, [p for p, _ in rows]).argmax(-1)
    print(f"{'prompt':40s} | P(basketball) | P(golf) | P(Tiger) | argmax")
    for (prompt, _), p, t in zip(rows, probs, top):
        print(f"{prompt:40s} | {p[0]:13.4f} | {p[1]:7.4f} | {p[2]:8.4f} | {tokenizer.decode([t])!r}")
    correct = predicts_final_word(model, tokenizer, FACTS)
    print(f"final word predicted (argmax) for {int(correct.sum())}/{len(FACTS)} of FACTS")
