"""Tests for gpt2_facts.py: the whole --model=tiny run in-process (every analysis and every key of
results.json, the saved decomposition reloaded), suppression on GPT-2's Conv1D layers against the
dense formula, one-line errors for missing weights and bad input, and the presets (A.3.1).
Offline throughout: HF_HUB_OFFLINE=1 wherever a load could touch the hub."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2_facts
import spd

torch.set_num_threads(1)  # tiny tensors: one thread is fastest and immune to a busy core
HERE = os.path.dirname(os.path.abspath(__file__))


def test_tiny_end_to_end_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir, tiny_path = tmp_path / "out", tmp_path / "cache" / "tiny.pt"
    res = gpt2_facts.main(["--model=tiny", "--steps=20", "--log_every=10", "--threads=1",
                           f"--out_dir={out_dir}", f"--tiny_path={tiny_path}"])
    printed = capsys.readouterr().out
    for k in range(1, 7):                                       # all six analyses, and 1b
        assert f"\n({k}) " in printed, f"analysis ({k}) not printed"
    assert "\n(1b) " in printed
    assert tiny_path.exists() and (out_dir / "spd.pt").exists()

    # results.json holds what main returned (up to JSON's tuples -> lists)
    with open(out_dir / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    assert set(saved) == {"config", "model", "tokens", "target_check", "training", "active",
                          "unique_layer0_mlp", "suppression", "fact_set", "names", "reversed",
                          "zero_mlp", "wall_seconds"}
    cfg = saved["config"]
    assert (cfg["model"], cfg["preset"], cfg["steps"], cfg["C"]) == ("tiny", "tiny", 20, 64)
    assert saved["model"]["name"] == "tiny" and saved["model"]["threads"] == 1
    n_layer = gpt2_facts.TINY_CONFIG["n_layer"]
    layers = [f"transformer.h.{i}.{m}" for i in range(n_layer)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    tokens = saved["tokens"]                                    # word-level: one token per word
    assert tokens == [f.split() for f in gpt2_facts.ATHLETE_FACTS]
    tc = saved["target_check"]
    assert len(tc["P(basketball)"]) == len(tc["P(golf)"]) == 2 and tc["correct"] == [True, True]
    assert tc["argmax"] == gpt2_facts.SPORTS

    # training: history at steps 0, 10 and the last, the file saved
    tr = saved["training"]
    assert tr["steps"] == 20 and [h["step"] for h in tr["history"]] == [0, 10, 19]
    assert tr["saved"] == os.path.join(str(out_dir), "spd.pt")
    assert tr["final"] == tr["history"][-1] and set(tr["final"]["L0"]) == set(layers)
    assert tr["trainable_parameters"] > 0 and tr["peak_gpu_memory_gib"] is None

    # (1) active subcomponents per layer and token; totals add up
    act = saved["active"]
    assert act["threshold"] == 0.0 and list(act["per_layer"]) == layers   # block by block
    for name, v in act["per_layer"].items():
        assert [len(row) for row in v["per_token"]] == [len(t) for t in tokens]
        assert all(isinstance(c, int) and 0 <= c <= v["total"] for row in v["per_token"] for c in row)
        assert max(max(row) for row in v["per_token"]) <= v["total"] <= 64
        assert len(v["only_in"]) == 2 and sum(v["only_in"]) <= v["total"]
    assert isinstance(act["total"], int)
    assert act["total"] == sum(v["total"] for v in act["per_layer"].values())
    assert act["only_in"] == [sum(v["only_in"][b] for v in act["per_layer"].values()) for b in range(2)]

    # (1b) unique layer-0 MLP subcomponents at each name token
    edit_layers = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    uniq = saved["unique_layer0_mlp"]
    assert list(uniq) == ["Kobe Bryant", "Tiger Woods"]
    for (first, last), (athlete, u) in zip(gpt2_facts.ATHLETES, uniq.items()):
        assert u[first]["kind"] == "first" and u[first]["position"] == 0
        assert u[last]["kind"] == "last" and u[last]["position"] == 1
        for e in u.values():
            assert list(e["unique"]) == edit_layers
            assert all(0 <= c < 64 for cs in e["unique"].values() for c in cs)

    # (2) suppression: before and after probabilities on both prompts, the chosen directions
    sup = saved["suppression"]
    assert set(sup) == {"before", "basketball", "golf"}
    assert sup["before"] == [[tc["P(basketball)"][b], tc["P(golf)"][b]] for b in range(2)]
    for b, sport in enumerate(gpt2_facts.SPORTS):
        first, last = gpt2_facts.ATHLETES[b]
        u = uniq[f"{first} {last}"]
        assert sup[sport]["chosen"] == gpt2_facts.merge(u[first]["unique"], u[last]["unique"])
        assert sup[sport]["n_directions"] == sum(map(len, sup[sport]["chosen"].values()))
        after = sup[sport]["after"]
        assert len(after) == 2 and all(len(r) == 2 and all(0 <= p <= 1 for p in r) for r in after)

    # (3) the fact-set effect (Figure 3): 100 facts
    assert set(saved["fact_set"]) == {"basketball", "golf"}
    for b, (sport, e) in enumerate(saved["fact_set"].items()):
        assert e["target"] == gpt2_facts.ATHLETE_FACTS[b]
        assert len(e["facts_before"]) == len(e["facts_after"]) == 100
        assert e["facts_mean_before"] == pytest.approx(sum(e["facts_before"]) / 100)
        assert e["facts_mean_after"] == pytest.approx(sum(e["facts_after"]) / 100)
        assert e["target_before"] == pytest.approx(sup["before"][b][b])
        assert e["target_after"] == pytest.approx(sup[sport]["after"][b][b])
        assert e["other_athlete_before"] == pytest.approx(sup["before"][1 - b][1 - b])
        assert e["other_athlete_after"] == pytest.approx(sup[sport]["after"][1 - b][1 - b])
        assert e["others_max_drop_fact"] in gpt2_facts.ATHLETE_FACTS + gpt2_facts.FACTS
        assert isinstance(e["selective"], bool)

    # (4) names (Figure 4): first name alone, last name alone, both
    names = saved["names"]
    assert list(names) == ["Kobe Bryant", "Tiger Woods"]
    for b, (athlete, n) in enumerate(names.items()):
        first, last = gpt2_facts.ATHLETES[b]
        assert (n["sport"], n["first_token"], n["last_token"]) == (gpt2_facts.SPORTS[b], first, last)
        for k in ("none", "first", "last", "both"):
            assert 0 <= n[k] <= 1
        assert n["none"] == pytest.approx(sup["before"][b][b])
        assert n["both"] == pytest.approx(sup[n["sport"]]["after"][b][b])  # the same edit
        nd = n["n_directions"]
        assert nd["none"] == 0 and nd["both"] == sup[n["sport"]]["n_directions"]
        assert nd["both"] <= nd["first"] + nd["last"]

    # (5) the reversed prompt
    rev = saved["reversed"]
    assert rev["prompt"] == gpt2_facts.REVERSED_PROMPT
    assert 0 <= rev["before"] <= 1 and 0 <= rev["after"] <= 1
    assert rev["argmax_before"] == "Tiger"               # the tiny model learned it
    assert rev["still_tiger"] == (rev["argmax_after"] == "Tiger")

    # (6) one MLP zeroed at a time: one entry per layer
    z = saved["zero_mlp"]
    assert z["full"] == sup["before"][0][0] and len(z["layers"]) == n_layer
    assert all(0 <= p <= 1 for p in z["layers"])

    # the saved decomposition reloads on the cached target and reproduces the results
    model, tokenizer = gpt2_facts.load_model("tiny", "cpu", str(tiny_path))
    assert "training tiny" not in capsys.readouterr().out   # the cache was used, no retraining
    s, saved_cfg = spd.load(str(out_dir / "spd.pt"), model)
    assert saved_cfg["C"] == 64 and saved_cfg["steps"] == 20 and set(s.layers) == set(layers)
    x, valid = gpt2_facts.make_batch(tokenizer, gpt2_facts.ATHLETE_FACTS)
    g = spd.causal_importances(s, x)
    g = {n: g[n] for n, _ in model.named_modules() if n in g}      # block by block, as run does
    on = gpt2_facts.activity(g, valid.float(), act["threshold"])
    again = gpt2_facts.report_active(on, tokens, act["threshold"])
    assert again["total"] == act["total"] and again["only_in"] == act["only_in"]
    assert list(again["per_layer"]) == layers
    assert json.loads(json.dumps(again["per_layer"])) == act["per_layer"]
    for sport in gpt2_facts.SPORTS:
        P = gpt2_facts.athlete_probs(gpt2_facts.suppress(model, s, sup[sport]["chosen"]), tokenizer)
        assert sum(P, []) == pytest.approx(sum(sup[sport]["after"], []), abs=1e-6)


def test_suppression_on_conv1d_matches_dense_formula():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=23, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double().eval()
    name, cs = "transformer.h.1.mlp.c_fc", [1, 4]
    conv = model.get_submodule(name)
    assert isinstance(conv, Conv1D) and conv.weight.shape == (8, 32)   # (d_in, d_out)
    before = copy.deepcopy(model.state_dict())
    s = spd.SPDModel(model, name, C=6, ci="vector", d_gate=4).double()
    L = s.layers[name]
    edited = spd.suppress_subcomponents(model, s, {name: cs})

    # W' by hand, (d_out, d_in), the coefficients all from the original W
    W = conv.weight.detach().T.clone()
    Wp = W.clone()
    for c in cs:
        u, v = L.U[:, c].detach(), L.V[c].detach()
        u, v = u / u.norm(), v / v.norm()
        Wp -= (u @ W @ v) * torch.outer(u, v)
    # (1) the edited layer computes x W'^T + b
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    layer = edited.get_submodule(name)
    assert torch.allclose(layer(x), x @ Wp.T + conv.bias, atol=1e-12, rtol=0)
    assert torch.allclose(layer.weight.T, Wp, atol=1e-12, rtol=0)

    # (2) the whole edited model equals a copy with W' written in by hand
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_submodule(name).weight.copy_(Wp.T)
    ids = torch.randint(0, 23, (2, 8))
    with torch.no_grad():
        y_edit, y_ref, y_orig = (m(input_ids=ids).logits for m in (edited, ref, model))
    assert torch.allclose(y_edit, y_ref, atol=1e-12, rtol=0)

    # (3) the edit changes the output; only that one weight changed; the caller's model untouched
    assert (y_edit - y_orig).abs().max() > 1e-6
    changed = [k for k, v in edited.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [name + ".weight"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (Wp - W).norm() > 1e-4


def test_default_model_offline_is_a_one_line_error(tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    p = subprocess.run([sys.executable, "gpt2_facts.py"], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "gpt2" in lines[0] and "--model=tiny" in lines[0]
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize("case", ["missing_folder", "empty_folder", "unknown_key", "bad_type",
                                  "bad_bool", "unknown_preset", "odd_batch", "not_key_value"])
def test_bad_input_is_a_one_line_error(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    argv, expect = {
        "missing_folder": ([f"--model={tmp_path / 'no_such_model'}"], "could not load GPT-2 weights"),
        "empty_folder": ([f"--model={tmp_path / 'empty'}"], "could not load GPT-2 weights"),
        "unknown_key": (["--nope=1"], "unknown config key 'nope'"),
        "bad_type": (["--model=tiny", "--steps=abc"], "--steps needs an int"),
        "bad_bool": (["--model=tiny", "--save=maybe"], "--save needs true or false"),
        "unknown_preset": (["--model=tiny", "--preset=huge"], "unknown preset 'huge'"),
        "odd_batch": (["--model=tiny", "--batch_size=3"], "multiple of 2"),
        "not_key_value": (["--model=tiny", "steps"], "use --key=value"),
    }[case]

    def no_training(*a, **k):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(gpt2_facts, "train_tiny", no_training)
    monkeypatch.setattr(spd, "train", no_training)
    monkeypatch.setattr(spd, "SPDModel", no_training)
    with pytest.raises(SystemExit) as e:
        gpt2_facts.main(argv + [f"--out_dir={tmp_path / 'out'}",
                                f"--tiny_path={tmp_path / 'tiny.pt'}"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [l for l in (out + err).splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], lines
    assert not (tmp_path / "tiny.pt").exists() and not (tmp_path / "out" / "spd.pt").exists()


def test_presets():
    paper = gpt2_facts.PRESETS["paper"]
    a31 = dict(batch_size=2, optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="constant",
               lr_warmup=0.01, steps=20_000, C=768, d_gate=64, ci="vector",
               beta_stochastic_recon=0.1, beta_stochastic_partial_recon=10,
               beta_stochastic_layerwise_recon=0.1, beta_recon=0.1, beta_partial_recon=10,
               beta_faithfulness=1e6, beta_minimality=0.05, p_start=0.9, p_final=0.1,
               last_token_only=False)
    for k, v in a31.items():
        assert paper[k] == v, k
    assert paper["beta_layerwise_recon"] == 0                  # not in the table
    # every preset key is a config field, and a parsed config carries the table
    fields = set(gpt2_facts.FactsConfig.__dataclass_fields__)
    for preset in gpt2_facts.PRESETS.values():
        assert set(preset) <= fields
    cfg = gpt2_facts.parse_config([])
    assert cfg.model == "gpt2" and cfg.preset == "paper"
    for k, v in a31.items():
        assert getattr(cfg, k) == v, k

    # tiny: the same losses and schedule at the tiny model's size
    tiny = gpt2_facts.PRESETS["tiny"]
    assert {k: v for k, v in tiny.items() if k not in ("C", "d_gate", "steps", "log_every", "threads")} \
        == {k: v for k, v in paper.items() if k not in ("C", "d_gate", "steps", "log_every")}
    assert tiny["C"] == gpt2_facts.TINY_CONFIG["n_embd"] and tiny["threads"] == 1

    # each model picks its default preset; --preset and --key=value override
    for model, preset in [("tiny", "tiny"), ("gpt2", "paper"), ("gpt2-random", "paper"),
                          ("/some/local/gpt2", "paper")]:
        cfg = gpt2_facts.parse_config([f"--model={model}"])
        assert cfg.preset == preset and cfg.model == model
        assert cfg.C == gpt2_facts.PRESETS[preset]["C"] and cfg.steps == gpt2_facts.PRESETS[preset]["steps"]
    assert gpt2_facts.parse_config(["--model=tiny", "--preset=paper"]).C == 768
    cfg = gpt2_facts.parse_config(["--model=tiny", "--C=8", "--steps=1e3"])
    assert (cfg.C, cfg.steps, cfg.d_gate) == (8, 1000, 16)
