"""Tests for simu_jax.data: loaders on the real shared data, the synthetic benchmark,
tokenization, batching and the BPE tokenizer."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest

from simu_jax.data import (
    GENERAL_FACTS,
    IGNORE_INDEX,
    TOFU_SPLITS,
    QATemplate,
    SyntheticConfig,
    batch_iterator,
    bucket_length,
    load_idontknow,
    load_lume,
    load_mia_documents,
    load_semeval,
    load_tofu,
    make_synthetic,
    parse_lume_id,
    read_json_records,
    sequence_lengths,
    tokenize_prompts,
    tokenize_qa,
    tokenize_texts,
    train_bpe_tokenizer,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data folder not found at {DATA} (expected beside the repo)"
)
TOFU = DATA / "tofu"


# =========================================================================== TOFU


@needs_data
@pytest.mark.parametrize(
    "split,count",
    [
        ("forget01", 40), ("forget05", 200), ("forget10", 400),
        ("retain90", 3600), ("retain95", 3800), ("retain99", 3960), ("full", 4000),
        ("holdout01", 40), ("holdout05", 200), ("holdout10", 400),
        ("real_authors", 100), ("world_facts", 117),
        ("forget01_perturbed", 40), ("forget05_perturbed", 200), ("forget10_perturbed", 400),
        ("retain_perturbed", 400), ("real_authors_perturbed", 100), ("world_facts_perturbed", 117),
    ],
)
def test_tofu_row_counts(split, count):
    rows = load_tofu(split, TOFU)
    assert len(rows) == count
    assert all(isinstance(r["question"], str) and r["question"] for r in rows)
    assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)


@needs_data
def test_tofu_every_split_listed_loads():
    assert len(TOFU_SPLITS) == 18
    for split in TOFU_SPLITS:
        assert load_tofu(split, str(TOFU)), split  # str paths work too


@needs_data
def test_tofu_forget_prompt_response_normalized_and_matches_perturbed():
    plain = load_tofu("forget10", TOFU)
    pert = load_tofu("forget10_perturbed", TOFU)
    assert all(set(r) == {"question", "answer"} for r in plain)  # prompt/response renamed
    assert [r["question"] for r in plain] == [r["question"] for r in pert]
    assert [r["answer"] for r in plain] == [r["answer"] for r in pert]


@needs_data
@pytest.mark.parametrize("split", ["forget10_perturbed", "retain_perturbed"])
def test_tofu_perturbed_fields(split):
    for r in load_tofu(split, TOFU):
        assert isinstance(r["perturbed_answer"], list) and len(r["perturbed_answer"]) == 5
        assert all(isinstance(p, str) and p != r["answer"] for p in r["perturbed_answer"])
        assert isinstance(r["paraphrased_answer"], str) and r["paraphrased_answer"] != r["answer"]
        assert isinstance(r["paraphrased_question"], str) and r["paraphrased_question"]


@needs_data
def test_tofu_split_relations():
    pairs = lambda split: [(r["question"], r["answer"]) for r in load_tofu(split, TOFU)]  # noqa: E731
    full = pairs("full")
    assert full == pairs("retain90") + pairs("forget10")
    assert full[-40:] == pairs("forget01") and full[:-40] == pairs("retain99")
    assert full[-200:] == pairs("forget05") and full[:-200] == pairs("retain95")
    assert [q for q, _ in pairs("retain_perturbed")] == [q for q, _ in full[:400]]
    assert not {q for q, _ in pairs("holdout10")} & {q for q, _ in full}


@needs_data
def test_tofu_real_authors_and_world_facts():
    for name in ("real_authors", "world_facts"):
        rows = load_tofu(name, TOFU)
        for r in rows:
            options = [r[f"option{i}"] for i in range(1, 5)]
            assert r["answer"] in options
        pert = load_tofu(f"{name}_perturbed", TOFU)
        assert [r["question"] for r in pert] == [r["question"] for r in rows]
        for r, p in zip(rows, pert):
            assert len(p["perturbed_answer"]) == 3 and p["answer"] not in p["perturbed_answer"]
            assert sorted(p["perturbed_answer"] + [p["answer"]]) == sorted(r[f"option{i}"] for i in range(1, 5))
    assert load_tofu("world_facts", TOFU)[0]["answer"] == "Paris"


@needs_data
def test_idontknow():
    refusals = load_idontknow(TOFU)
    assert len(refusals) == 100 and all(s and s == s.strip() for s in refusals)
    assert refusals[0] == "I'm not certain about that."
    assert load_idontknow(TOFU / "idontknow.jsonl") == refusals


def test_tofu_errors(tmp_path):
    with pytest.raises(ValueError, match="forget10.*retain_perturbed"):
        load_tofu("forget11", tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tofu("forget10", missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "forget10.json"))):
        load_tofu("forget10", tmp_path)


def test_read_json_layouts_and_normalization(tmp_path):
    recs = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    (tmp_path / "array.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "multi.json").write_text(json.dumps(recs[:3]) + "\n" + json.dumps(recs[3:]) + "\n")
    for name in ("array", "lines", "multi"):
        assert read_json_records(tmp_path / f"{name}.json") == recs, name
    # prompt/response -> question/answer; a bare perturbed string becomes a list
    (tmp_path / "forget01.json").write_text(json.dumps([{"prompt": "q", "response": "a", "perturbed_answer": "p"}]))
    assert load_tofu("forget01", tmp_path) == [{"question": "q", "answer": "a", "perturbed_answer": ["p"]}]


# =========================================================================== LUME / SemEval


def test_parse_lume_id():
    assert parse_lume_id('"8f24c511-a319"sc1') == ("8f24c511-a319", "sc", 1)
    assert parse_lume_id("12762334qa4") == ("12762334", "qa", 4)
    with pytest.raises(ValueError):
        parse_lume_id("12762334xx1")


@needs_data
def test_lume_counts_tasks_and_kinds():
    forget = load_lume("forget", DATA / "lume")
    retain = load_lume("retain", DATA / "lume")
    assert len(forget) == 2732 and len(retain) == 2734
    assert collections.Counter(r["task"] for r in forget) == {"Task1": 486, "Task2": 1500, "Task3": 746}
    assert collections.Counter(r["task"] for r in retain) == {"Task1": 492, "Task2": 1500, "Task3": 742}
    assert collections.Counter(r["kind"] for r in forget) == {"qa": 1866, "sc": 866}
    for r in forget + retain:
        assert set(r) == {"id", "input", "output", "task", "kind", "doc_id"}
        assert r["id"].endswith(r["kind"] + r["id"][-1]) and r["kind"] in ("sc", "qa")
        assert '"' not in r["doc_id"] and r["id"].replace('"', "").startswith(r["doc_id"])
    # every document has exactly one sentence-completion prompt (sc1)
    sc = collections.Counter(r["doc_id"] for r in forget if r["kind"] == "sc")
    assert set(sc.values()) == {1} and len(sc) == 866
    assert load_lume("forget", DATA)[:3] == forget[:3]  # the shared root is accepted too
    with pytest.raises(ValueError, match="forget, retain"):
        load_lume("test", DATA / "lume")


@needs_data
def test_semeval_splits_are_subsets_of_lume():
    sizes = {"forget_train": 1112, "forget_validation": 254, "retain_train": 1136, "retain_validation": 278}
    lume = {"forget": load_lume("forget", DATA / "lume"), "retain": load_lume("retain", DATA / "lume")}
    keyed = {k: {(r["id"], r["input"], r["output"], r["task"], r["kind"]) for r in v} for k, v in lume.items()}
    for split, n in sizes.items():
        rows = load_semeval(split, DATA / "semeval25_task4")
        assert len(rows) == n
        assert {(r["id"], r["input"], r["output"], r["task"], r["kind"]) for r in rows} <= keyed[split.split("_")[0]]
    train = load_semeval("forget_train", DATA / "semeval25_task4")
    assert collections.Counter(r["task"] for r in train) == {"Task1": 166, "Task2": 642, "Task3": 304}
    with pytest.raises(ValueError):
        load_semeval("forget_test", DATA / "semeval25_task4")


@needs_data
def test_mia_documents():
    member = load_mia_documents("member", DATA / "semeval25_task4")
    nonmember = load_mia_documents("nonmember", DATA / "semeval25_task4" / "mia_data")
    assert len(member) == 150 and len(nonmember) == 150
    assert all(set(d) == {"id", "document"} and d["document"] for d in member + nonmember)
    assert not {d["id"] for d in member} & {d["id"] for d in nonmember}
    task3 = {r["doc_id"] for r in load_lume("forget", DATA / "lume") if r["task"] == "Task3"}
    assert {d["id"] for d in member} <= task3
    with pytest.raises(ValueError):
        load_mia_documents("members", DATA)


# =========================================================================== synthetic


def _strings(rec):
    return [rec["question"], rec["answer"], rec["paraphrased_question"], rec["paraphrased_answer"], *rec["perturbed_answer"]]


def test_synthetic_deterministic():
    a, b = make_synthetic(SyntheticConfig(seed=3)), make_synthetic(SyntheticConfig(seed=3))
    c = make_synthetic(SyntheticConfig(seed=4))
    for split in ("forget", "retain", "holdout", "general"):
        assert getattr(a, split) == getattr(b, split)
    assert a.people == b.people
    assert a.forget != c.forget and a.people["forget"] != c.people["forget"]
    # independent streams: the general set does not move the people
    d = make_synthetic(SyntheticConfig(seed=3, num_general=10))
    assert d.forget == a.forget and d.retain == a.retain and len(d.general) == 10


def test_synthetic_default_sizes():
    bench = make_synthetic()
    assert (len(bench.forget), len(bench.holdout), len(bench.retain)) == (20, 20, 160)
    assert len(bench.general) == 40
    assert [len(bench.people[k]) for k in ("forget", "holdout", "retain")] == [4, 4, 32]
    per_person = collections.Counter(r["person"] for r in bench.forget + bench.retain + bench.holdout)
    assert set(per_person.values()) == {5}
    assert all(len(r["answer"].split()) <= 12 for r in bench.train_set())  # short answers
    assert len(bench.train_set()) == 220 and len(bench.train_set(include_general=False)) == 180


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_forget_people_isolated(seed):
    bench = make_synthetic(SyntheticConfig(seed=seed, num_people=60))
    names = bench.people["forget"] + bench.people["holdout"] + bench.people["retain"]
    assert len(set(names)) == len(names) == 60
    assert len({n.split()[1] for n in names}) == 60  # last names unique as well
    others = " \n ".join(s for r in bench.retain + bench.holdout + bench.general for s in _strings(r))
    for name in bench.people["forget"]:
        assert not re.search(rf"\b{re.escape(name)}\b", others), name
        assert not re.search(rf"\b{re.escape(name.split()[1])}\b", others), name
    assert all(r["person"] in bench.people["forget"] for r in bench.forget)
    assert not {r["question"] for r in bench.forget} & {r["question"] for r in bench.retain + bench.holdout}


@pytest.mark.parametrize("seed", [0, 7])
def test_synthetic_paraphrases_and_perturbations(seed):
    bench = make_synthetic(SyntheticConfig(seed=seed, facts_per_person=9, num_general=len(GENERAL_FACTS)))
    for rec in bench.forget + bench.retain + bench.holdout:
        assert rec["value"] in rec["answer"] and rec["value"].lower() in rec["paraphrased_answer"].lower()
        assert rec["person"] in rec["question"] and rec["person"] in rec["answer"]
        assert rec["paraphrased_answer"] != rec["answer"]
        assert rec["paraphrased_question"] != rec["question"]
        pert = rec["perturbed_answer"]
        assert len(pert) == 5 and len(set(pert)) == len(pert)
        assert rec["answer"] not in pert and rec["paraphrased_answer"] not in pert
        assert all(rec["value"].lower() not in p.lower() for p in pert)
    for rec in bench.general:
        pert = rec["perturbed_answer"]
        assert len(set(pert)) >= 3 and rec["answer"] not in pert
        assert rec["paraphrased_answer"] != rec["answer"] and rec["person"] is None
    capital = {r["question"]: r["answer"] for r in bench.general}
    assert capital["What is the capital of France?"] == "Paris"
    assert len(set(bench.refusals)) >= 15


def test_synthetic_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig(forget_fraction=0.6, holdout_fraction=0.5)
    with pytest.raises(ValueError):
        SyntheticConfig(facts_per_person=0)
    with pytest.raises(ValueError):
        SyntheticConfig(num_general=10_000)


# =========================================================================== tokenizer


@pytest.fixture(scope="module")
def bench():
    return make_synthetic()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, bench):
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(bench.texts(), out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_bpe_roundtrip_and_specials(tok_dir, tokenizer, bench):
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) <= 512
    for text in bench.texts()[:50] + ["Zoë wrote 日本語 ✓ — \t tabs & émojis 🎉"]:
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert ids[0] == 1 and 3 not in ids  # bos added, never unknown (byte-level)
        assert tokenizer.decode(ids[1:]) == text


def test_bpe_deterministic(tmp_path, bench, tok_dir):
    again = tmp_path / "again"
    returned = train_bpe_tokenizer(bench.texts(), again, vocab_size=512)
    assert (again / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()
    assert returned.encode("Where was Paris born?") == returned.encode("Where was Paris born?")
    other = train_bpe_tokenizer(bench.texts()[::-1][:300], tmp_path / "other", vocab_size=512)
    assert other.get_vocab() != returned.get_vocab()


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 32, 33, 64, 65, 2048, 5000)] == [32, 32, 64, 64, 128, 2048, 8192]
    assert bucket_length(10_000) == 16_384
    assert bucket_length(10, buckets=(16, 8)) == 16 and bucket_length(20, buckets=(8, 16)) == 32


def test_tokenize_qa_labels_cover_answer(tokenizer, bench):
    recs = bench.forget + bench.general[:5]
    template = QATemplate()
    out = tokenize_qa(tokenizer, recs, template)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == np.int32 and v.shape == (len(recs), 64) for v in out.values())
    for i, rec in enumerate(recs):
        ids, mask, labels = out["input_ids"][i], out["attention_mask"][i], out["labels"][i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tokenizer.pad_token_id).all() and ids[0] == tokenizer.bos_token_id
        on = labels != IGNORE_INDEX
        first = int(np.argmax(on))
        assert on[first:n].all() and not on[:first].any() and not on[n:].any()  # contiguous answer span
        assert (labels[on] == ids[on]).all()
        assert tokenizer.decode(labels[on]) == rec["answer"] + "</s>"
        assert tokenizer.decode(ids[1:first]) == template.prompt(rec["question"])
    # another template / answer key
    tpl = QATemplate("[Q] ", " ", "[A] ")
    alt = tokenize_qa(tokenizer, recs[:3], tpl, answer_key="paraphrased_answer")
    lab = alt["labels"][0]
    assert tokenizer.decode(lab[lab != IGNORE_INDEX]) == recs[0]["paraphrased_answer"] + "</s>"
    assert tokenizer.decode(alt["input_ids"][0][alt["attention_mask"][0] == 1]).startswith("<s>[Q] ")


def test_tokenize_qa_buckets_and_pad_to(tokenizer, bench):
    short = tokenize_qa(tokenizer, [{"question": "Hi?", "answer": "Yes."}])
    assert short["input_ids"].shape == (1, 32)
    long = tokenize_qa(tokenizer, [{"question": "Where was " * 12, "answer": "Yes."}])
    n = int(long["attention_mask"].sum())
    assert 64 < n <= 128 and long["input_ids"].shape == (1, 128)
    fixed = tokenize_qa(tokenizer, bench.forget[:2], pad_to=128)
    assert fixed["labels"].shape == (2, 128)
    custom = tokenize_qa(tokenizer, bench.forget[:2], buckets=(40, 48, 80))
    assert custom["input_ids"].shape[1] in (40, 48)


def test_tokenize_qa_truncation(tokenizer, bench):
    recs = bench.forget[:4]
    full = tokenize_qa(tokenizer, recs)
    with pytest.warns(UserWarning, match="longer than 20 tokens"):
        cut = tokenize_qa(tokenizer, recs, max_length=20)
    assert cut["input_ids"].shape == (4, 20)
    assert (cut["input_ids"] == full["input_ids"][:, :20]).all()  # the end was cut
    assert (cut["labels"] == full["labels"][:, :20]).all()
    with pytest.raises(ValueError, match="longer than 20 tokens") as err:
        tokenize_qa(tokenizer, recs, max_length=20, truncation="error")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        tokenize_qa(tokenizer, recs, truncation="sometimes")


class _CharTokenizer:
    """Minimal tokenizer without BOS and without a pad token: ids = code points + 10."""

    bos_token_id = None
    pad_token_id = None
    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) + 10 for c in t] for t in texts]}

    def encode(self, text, add_special_tokens=True):
        return self([text])["input_ids"][0]


def test_tokenize_qa_without_bos_or_pad():
    tok = _CharTokenizer()
    out = tokenize_qa(tok, [{"question": "ab", "answer": "cd"}], QATemplate("", "|", ""))
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert list(ids[:6]) == [ord("a") + 10, ord("b") + 10, ord("|") + 10, ord("c") + 10, ord("d") + 10, 1]
    assert (ids[6:] == 1).all()  # padded with eos
    assert list(labels[:6]) == [IGNORE_INDEX] * 3 + [ord("c") + 10, ord("d") + 10, 1]
    assert out["attention_mask"][0].sum() == 6


def test_tokenize_prompts_left_padded_and_consistent(tokenizer, bench):
    recs = bench.forget[:6]
    prompts = tokenize_prompts(tokenizer, [r["question"] for r in recs])
    assert set(prompts) == {"input_ids", "attention_mask"}
    assert prompts["input_ids"].dtype == np.int32 and prompts["input_ids"].shape[1] in (32, 64)
    qa = tokenize_qa(tokenizer, recs)
    for i in range(len(recs)):
        mask = prompts["attention_mask"][i]
        n = int(mask.sum())
        assert mask[-n:].all() and not mask[:-n].any()  # left padding
        prompt_ids = prompts["input_ids"][i][-n:]
        answer_start = int(np.argmax(qa["labels"][i] != IGNORE_INDEX))
        assert list(prompt_ids) == list(qa["input_ids"][i][:answer_start])  # same ids as in training
    assert (tokenize_prompts(tokenizer, recs)["input_ids"] == prompts["input_ids"]).all()  # records accepted


def test_tokenize_texts(tokenizer):
    texts = ["A short document.", "A somewhat longer document with more words in it. " * 3]
    out = tokenize_texts(tokenizer, texts)
    mask = out["attention_mask"] == 1
    assert (out["labels"][mask] == out["input_ids"][mask]).all() and (out["labels"][~mask] == IGNORE_INDEX).all()
    assert tokenizer.decode(out["input_ids"][0][mask[0]]) == "<s>" + texts[0]
    cut = tokenize_texts(tokenizer, texts, max_length=8)
    assert cut["input_ids"].shape == (2, 8) and cut["attention_mask"].all()
    eos = tokenize_texts(tokenizer, texts[:1], add_eos=True)
    assert eos["input_ids"][0][int(eos["attention_mask"][0].sum()) - 1] == tokenizer.eos_token_id


# =========================================================================== batching


def _arrays(n=10, t=6):
    return {
        "idx": np.arange(n, dtype=np.int32),
        "input_ids": np.arange(n * t, dtype=np.int32).reshape(n, t) + 5,
        "attention_mask": np.ones((n, t), np.int32),
        "labels": np.ones((n, t), np.int32),
    }


def test_batch_iterator_fixed_shapes_and_padding():
    it = batch_iterator(_arrays(), 4, seed=0, epochs=1)
    batches = list(it)
    assert len(batches) == 3 == it.steps_per_epoch
    assert all(b["input_ids"].shape == (4, 6) and b["idx"].shape == (4,) for b in batches)
    last = batches[-1]
    assert (last["attention_mask"][2:] == 0).all() and (last["labels"][2:] == IGNORE_INDEX).all()
    assert (last["input_ids"][2:] == 0).all() and (last["attention_mask"][:2] == 1).all()
    seen = np.concatenate([b["idx"] for b in batches[:-1]] + [last["idx"][:2]])
    assert sorted(seen) == list(range(10))  # each row exactly once per epoch
    assert list(seen) != list(range(10))  # shuffled
    dropped = list(batch_iterator(_arrays(), 4, seed=0, epochs=1, drop_remainder=True))
    assert len(dropped) == 2 and all(b["attention_mask"].all() for b in dropped)
    ordered = list(batch_iterator(_arrays(), 5, shuffle=False, epochs=2))
    assert [list(b["idx"]) for b in ordered] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] * 2


def test_batch_iterator_deterministic_and_epochs_differ():
    take = lambda seed, k=9: [b["idx"].tolist() for _, b in zip(range(k), batch_iterator(_arrays(), 4, seed=seed))]  # noqa: E731
    assert take(1) == take(1)
    assert take(1) != take(2)
    run = take(1)
    assert run[:3] != run[3:6]  # a new permutation each epoch


def test_batch_iterator_resume():
    reference = batch_iterator(_arrays(), 3, seed=5)
    expected = [next(reference)["idx"].tolist() for _ in range(11)]
    first = batch_iterator(_arrays(), 3, seed=5)
    for _ in range(6):
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["index"] == 2 and first.position == (1, 2)
    resumed = batch_iterator(_arrays(), 3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialization
    assert [next(resumed)["idx"].tolist() for _ in range(5)] == expected[6:]
    started = batch_iterator(_arrays(), 3, seed=5, start=(1, 2))
    assert [next(started)["idx"].tolist() for _ in range(5)] == expected[6:]
    with pytest.raises(ValueError):
        batch_iterator(_arrays(), 3, seed=6).load_state_dict(state)
    with pytest.raises(ValueError):
        batch_iterator(_arrays(), 3, seed=5, start=(0, 4))
    with pytest.raises(ValueError):
        batch_iterator({"a": np.zeros(3), "b": np.zeros(4)}, 2)


def _ragged(n=203, t=96, seed=0):
    """Right-padded rows of random lengths 1..t: ids 1..=token position, pad 0."""
    lengths = np.random.default_rng(seed).integers(1, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, np.arange(1, t + 1)[None], 0).astype(np.int32)
    return {"idx": np.arange(n, dtype=np.int32), "input_ids": ids, "attention_mask": mask,
            "labels": np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int32)}, lengths


def test_sequence_lengths():
    m = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert sequence_lengths(m).tolist() == [2, 4, 0, 3]  # left padding is never trimmed


GROUP_KW = dict(group_by_length=True, group_chunk=4, trim_buckets=(32, 64, 96))


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_grouped_batches_cover_each_row_once_and_trim_to_bucket(drop_remainder):
    arrays, lengths = _ragged()
    it = batch_iterator(arrays, 8, seed=3, epochs=2, drop_remainder=drop_remainder, **GROUP_KW)
    assert it.steps_per_epoch == (203 // 8 if drop_remainder else 26)
    widths = set()
    for epoch in range(2):
        batches = [next(it) for _ in range(it.steps_per_epoch)]
        assert it.position == (epoch + 1, 0)
        rows = []
        for b in batches:
            real = b["attention_mask"].any(axis=1)
            rows.extend(b["idx"][real].tolist())
            longest = int(lengths[b["idx"][real]].max())
            # the batch's width is the bucket of its longest member, and no real token is cut
            assert b["input_ids"].shape == (8, bucket_length(longest, (32, 64, 96)))
            assert {v.shape[1] for k, v in b.items() if k != "idx"} == {b["input_ids"].shape[1]}
            for i in np.flatnonzero(real):
                n = lengths[b["idx"][i]]
                assert b["attention_mask"][i].sum() == n and b["input_ids"][i, :n].tolist() == list(range(1, n + 1))
                assert (b["labels"][i, n:] == IGNORE_INDEX).all()
            assert (b["labels"][~real] == IGNORE_INDEX).all() and (b["attention_mask"][~real] == 0).all()
            widths.add(b["input_ids"].shape[1])
        if drop_remainder:
            assert len(rows) == 203 // 8 * 8 and len(set(rows)) == len(rows)
        else:
            assert sorted(rows) == list(range(203))  # every example exactly once per epoch
        assert sum(not b["attention_mask"].any(axis=1).all() for b in batches) == (0 if drop_remainder else 1)
        # the plan's helper predicts the widths without building the batches
        assert it.epoch_widths(epoch).tolist() == [b["input_ids"].shape[1] for b in batches]
    assert widths == {32, 64, 96}


def test_grouped_batches_hold_similar_lengths_and_shuffle():
    arrays, lengths = _ragged()
    grouped = batch_iterator(arrays, 8, seed=3, epochs=1, **GROUP_KW)
    plain = batch_iterator(arrays, 8, seed=3, epochs=1, trim_buckets=(32, 64, 96))
    g_widths, p_widths = grouped.epoch_widths(0), plain.epoch_widths(0)
    assert g_widths.sum() < 0.8 * p_widths.sum()  # far less padding than random batches
    assert [b.shape[1] for b in (next(plain)["input_ids"],)] == [p_widths[0]]
    # within a chunk the rows are sorted longest first; the batch order is shuffled
    batches = grouped.epoch_batches(0)
    maxima = [lengths[b].max() for b in batches]
    assert maxima != sorted(maxima, reverse=True)
    assert all(np.all(np.diff(lengths[b]) <= 0) for b in batches)
    # the epoch's rows (before sorting) are exactly the ungrouped permutation: seeds agree
    order = plain._epoch_order(0)
    first_chunk = set(order[: 4 * 8].tolist())
    assert first_chunk == set(np.concatenate([b for b in batches if set(b.tolist()) <= first_chunk]).tolist())
    # without shuffle: input order, sorted per chunk, batches not shuffled
    ordered = batch_iterator(arrays, 8, shuffle=False, epochs=1, group_by_length=True, group_chunk=1000)
    got = np.concatenate([b["idx"][b["attention_mask"].any(axis=1)] for b in ordered])
    assert np.all(np.diff(lengths[got]) <= 0) and sorted(got.tolist()) == list(range(203))


def test_grouped_batches_deterministic_and_resume_exactly():
    arrays, _ = _ragged()

    def take(it, k):
        return [(b["idx"].tolist(), b["input_ids"].shape) for _, b in zip(range(k), it)]

    expected = take(batch_iterator(arrays, 8, seed=7, **GROUP_KW), 70)  # 26 batches/epoch: 2.7 epochs
    assert expected == take(batch_iterator(arrays, 8, seed=7, **GROUP_KW), 70)
    assert expected != take(batch_iterator(arrays, 8, seed=8, **GROUP_KW), 70)
    assert expected[:26] != expected[26:52]  # a new grouping each epoch
    first = batch_iterator(arrays, 8, seed=7, **GROUP_KW)
    take(first, 33)
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["index"]) == (1, 7)
    resumed = batch_iterator(arrays, 8, seed=7, **GROUP_KW)
    resumed.load_state_dict(state)
    assert take(resumed, 37) == expected[33:]
    assert take(batch_iterator(arrays, 8, seed=7, start=(1, 7), **GROUP_KW), 37) == expected[33:]
    with pytest.raises(ValueError, match="lengths"):
        batch_iterator({"input_ids": arrays["input_ids"]}, 8, group_by_length=True)
    with pytest.raises(ValueError, match="group_chunk"):
        batch_iterator(arrays, 8, group_by_length=True, group_chunk=0)


@needs_data
def test_bpe_handles_unseen_real_text(tokenizer):
    recs = load_tofu("forget01", TOFU)[:5]
    out = tokenize_qa(tokenizer, recs, max_length=512)
    for i, rec in enumerate(recs):
        lab = out["labels"][i]
        assert tokenizer.decode(lab[lab != IGNORE_INDEX]) == rec["answer"] + "</s>"
