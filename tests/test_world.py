"""The embedded world: deterministic, held-out splits that really are held out, and the one answer checker."""
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest

import world

SMALL = dict(corpus_mb=0.15, n_people=30, n_sft=1500, n_sft_val=200, n_pref=1500, n_pref_val=200,
             n_prompts=600, n_prompts_val=160, val_pool_size=120)
TRAIN_SETS = ("sft_train", "pref_train", "prompts_train")
VAL_SETS = ("sft_val", "pref_val", "prompts_val")


@pytest.fixture(scope="module")
def w():
    return world.generate_world(seed=7, **SMALL)  # with the default demonstration flaws


@pytest.fixture(scope="module")
def clean():
    return world.generate_world(seed=7, **SMALL, flaw_rates=world.NO_FLAWS)


def _id(key):
    return json.dumps(key)


# ------------------------------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_bytes_and_another_seed_does_not(w):
    again = world.generate_world(seed=7, **SMALL)
    dump = lambda d: json.dumps(d, ensure_ascii=False, sort_keys=True).encode("utf-8")  # noqa: E731
    assert dump(again) == dump(w)
    other = world.generate_world(seed=8, **SMALL)
    assert other["corpus_train"] != w["corpus_train"] and other["people"] != w["people"]


def test_identical_across_processes_with_different_string_hashing():
    # Python salts str hashes per process: iterating a set of strings would change the data from run to run
    code = ("import hashlib, json, world; w = world.generate_world(seed=3, corpus_mb=0.03, n_people=20, n_sft=200, "
            "n_sft_val=20, n_pref=200, n_pref_val=20, n_prompts=50, n_prompts_val=32, val_pool_size=40); "
            "t = list(world.tokenizer_texts(w)); "
            "print(hashlib.sha256(json.dumps([w, t], ensure_ascii=False).encode()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(digests) == 1


def test_set_sizes_do_not_reshuffle_the_rest(w):
    # each part has its own random stream: asking for more SFT rows must not change the world or the corpus
    bigger = world.generate_world(seed=7, **{**SMALL, "n_sft": 1600})
    assert bigger["people"] == w["people"] and bigger["corpus_train"] == w["corpus_train"]
    assert bigger["prompts_val"] == w["prompts_val"] and bigger["sft_train"][:1500] == w["sft_train"]


def test_sizes_and_corpus_bytes(w):
    assert [len(w[n]) for n in ("sft_train", "sft_val", "pref_train", "pref_val", "prompts_train", "prompts_val")] \
        == [SMALL[n] for n in ("n_sft", "n_sft_val", "n_pref", "n_pref_val", "n_prompts", "n_prompts_val")]
    size = sum(len(d.encode("utf-8")) + 1 for d in w["corpus_train"])
    assert 0.15e6 <= size < 0.15e6 + 2000
    assert all("<|" not in d for d in w["corpus_train"])  # plain text: specials come only from the tokenizer


# ------------------------------------------------------------------------------------------------------ splits

def test_no_train_turn_uses_a_held_out_key(w):
    val = {_id(k) for k in w["val_keys"]}
    for name in TRAIN_SETS:
        for r in w[name]:
            for k in r["keys"]:  # every turn, the history included
                assert _id(k) not in val, (name, r["messages"])
    for name in VAL_SETS:
        for r in w[name]:
            assert all(_id(k) in val for k in r["keys"]), (name, r["messages"])


def test_no_earlier_turn_gives_away_the_checked_answer(w):
    for name in TRAIN_SETS + VAL_SETS:
        for r in w[name]:
            assert r["keys"][-1] not in r["keys"][:-1], (name, r["messages"])


def test_val_prompts_never_appear_in_training(w):
    train_prompts = {json.dumps(r["messages"], ensure_ascii=False) for n in TRAIN_SETS for r in w[n]
                     for r in [r if n != "sft_train" else {"messages": r["messages"][:-1]}]}
    train_questions = {m["content"] for n in TRAIN_SETS for r in w[n] for m in r["messages"] if m["role"] == "user"}
    for r in w["prompts_val"]:
        assert json.dumps(r["messages"], ensure_ascii=False) not in train_prompts
        q = r["messages"][-1]["content"]
        if not (q.startswith("What about") or q.startswith("那")):  # a follow-up means nothing without its history
            assert q not in train_questions, q


def test_held_out_questions_never_in_the_pretraining_text(w):
    corpus = "\n".join(w["corpus_train"])
    wp = {"people": w["people"]}
    for key in map(tuple, w["val_keys"]):
        task = key[0]
        if task in ("add", "sub"):
            _, a, b = key
            op = "+" if task == "add" else "-"
            assert not re.search(rf"(?<!\d){a} \{op} {b} =", corpus), key
        if task == "numword":
            n = key[1]
            for direction in ("to_words", "to_digits"):
                for lang in world.LANGS:
                    for tpl in world.NUMWORD_QUESTIONS[direction, lang]:
                        q = tpl.format(n=n, w=world.number_words(n, lang))
                        assert not re.search(rf"(?<![\d\w]){re.escape(q)}", corpus), q
            assert f"\n{n} is {world.en_number(n)}." not in "\n" + corpus
            assert f"{world.zh_number(n)}写作{n}。" not in corpus
        if task == "compare":
            _, lo, hi = key
            for x, y in ((lo, hi), (hi, lo)):
                assert not re.search(rf"(?<!\d){x} or {y}(?!\d)", corpus), key
                assert not re.search(rf"(?<!\d){x}和{y}(?!\d)", corpus), key
        if task == "fact":  # the whole point: held-out facts ARE stated in the corpus, in both languages
            person = wp["people"][key[1]]
            for lang, split in (("en", r"(?<=[.!?])\s+"), ("zh", r"(?<=[。！？])")):
                value = world.fact_value(person, key[2], lang)
                sentences = [s for d in w["corpus_train"] for s in re.split(split, d)]
                assert any(person[lang] in s and value in s for s in sentences), (person[lang], value)


def test_every_attribute_has_held_out_people_and_facts_split_by_person_and_attribute(w):
    facts = [k for k in w["val_keys"] if k[0] == "fact"]
    assert {k[2] for k in facts} == set(world.ATTRIBUTES)
    per_attr = {a: sum(k[2] == a for k in facts) for a in world.ATTRIBUTES}
    assert set(per_attr.values()) == {round(0.2 * SMALL["n_people"])}
    # a held-out person's *other* attributes are asked in training: the model has to read the corpus, not the name
    trained = {(k[1], k[2]) for r in w["sft_train"] for k in r["keys"] if k[0] == "fact"}
    assert any((k[1], a) in trained for k in facts for a in world.ATTRIBUTES if a != k[2])


def test_prompts_val_is_balanced_interleaved_and_distinct(w):
    cells = [(t, lg) for t in world.TASKS for lg in world.LANGS]
    rows = w["prompts_val"]
    assert [(r["task"], r["lang"]) for r in rows[:len(cells)]] == cells  # the first 16 cover every cell once
    counts = {c: sum((r["task"], r["lang"]) == c for r in rows) for c in cells}
    assert set(counts.values()) == {160 // len(cells)}
    assert len({json.dumps(r["messages"], ensure_ascii=False) for r in rows}) == len(rows)


def test_every_task_language_system_and_multi_turn_occur_in_sft(w):
    rows = w["sft_train"]
    assert {(r["task"], r["lang"]) for r in rows} == {(t, lg) for t in world.TASKS for lg in world.LANGS}
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 2 for r in rows)
    follow = [r for r in rows if r["messages"][-2]["content"].startswith(("What about", "那"))]
    assert follow, "no follow-up questions"
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant"
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        lang_zh = r["lang"] == "zh"
        # one language per conversation: Chinese questions contain Chinese, English ones do not
        assert all(bool(re.search(r"[\u4e00-\u9fff]", m["content"])) == lang_zh
                   for m in r["messages"] if m["role"] == "user"), r["messages"]


def test_replies_answers_and_rejected_are_consistent_with_the_checker(w, clean):
    for data in (w, clean):
        for name in ("sft_train", "sft_val"):
            for r in data[name]:
                last_flaws = r["flaws"][-1]
                ok = world.check_answer(r["messages"][-1]["content"], r["answer"], r["task"])
                if not last_flaws:
                    assert ok, r
                if "pleasantry" in last_flaws:  # chatter after the answer costs exact match: the flaw is visible
                    assert not ok, r
    for data, kinds_expected in ((w, set(world.REJECTED_KINDS)), (clean, set(world.REJECTED_KINDS) - {"pleasantry"})):
        kinds = set()
        for name in ("pref_train", "pref_val"):
            for r in data[name]:
                assert r["chosen"] != r["rejected"]
                assert world.check_answer(r["chosen"], r["answer"], r["task"]), r
                assert world.is_clean_reply(r["chosen"], r["lang"]), r
                if r["rejected_kind"] in world.FLAW_KINDS and data is w:
                    continue  # the right answer with a flaw: test_rejected_kinds_cover_every_flaw_kind
                assert not world.check_answer(r["rejected"], r["answer"], r["task"]), r  # plausibly wrong, wrong
                assert not world.check_answer(r["rejected"], r["answer"]), r
                kinds.add(r["rejected_kind"])
        assert kinds | (set(world.FLAW_KINDS) if data is w else set()) == kinds_expected


def test_fact_replies_end_with_the_answer_and_questions_name_the_person(w):
    for r in w["prompts_train"]:
        if r["task"] == "fact" and not r["messages"][-1]["content"].startswith(("What about", "那")):
            person = w["people"][r["keys"][-1][1]]
            assert person[r["lang"]] in r["messages"][-1]["content"]


def test_rejected_kinds_look_as_described(w):
    by_kind = {}
    for r in w["pref_train"]:
        by_kind.setdefault(r["rejected_kind"], []).append(r)
    for r in by_kind["wrong_language"]:
        has_zh = bool(re.search(r"[\u4e00-\u9fff]", r["rejected"]))
        if r["task"] != "reverse" or not r["answer"].replace(" ", "").isdigit():
            assert has_zh == (r["lang"] == "en"), r
    for r in by_kind["rambling"]:
        assert len(r["rejected"]) > 2 * len(r["chosen"]) and r["chosen"] in r["rejected"]
    for r in by_kind["off_by_one"]:
        if r["task"] in ("add", "sub", "count"):
            got = int(re.findall(r"\d+", r["rejected"])[-1])
            assert abs(got - int(r["answer"])) == 1, r


# ------------------------------------------------------------------------------------------------ vocabulary

def test_no_answer_is_a_suffix_of_another_of_its_kind():
    # the checker accepts an answer at the end of a sentence: 粉红色 would pass for 红色, 熊猫 for 猫
    for table in (world.CITIES, world.PETS, world.JOBS, world.COLOURS):
        for col in (0, 1):
            values = [row[col].lower() for row in table]
            for a in values:
                for b in values:
                    if a != b:
                        assert not world.check_answer(b, a), (a, b)


def test_people_have_unique_names_in_both_languages(w):
    people = w["people"]
    assert len({p["en"] for p in people}) == len(people) == len({p["zh"] for p in people})


@pytest.mark.parametrize("n,en,zh", [
    (0, "zero", "零"), (7, "seven", "七"), (10, "ten", "十"), (15, "fifteen", "十五"), (20, "twenty", "二十"),
    (47, "forty-seven", "四十七"), (100, "one hundred", "一百"), (105, "one hundred five", "一百零五"),
    (110, "one hundred ten", "一百一十"), (115, "one hundred fifteen", "一百一十五"),
    (347, "three hundred forty-seven", "三百四十七"), (999, "nine hundred ninety-nine", "九百九十九"),
    (1006, "one thousand six", "一千零六"), (1046, "one thousand forty-six", "一千零四十六"),
    (1100, "one thousand one hundred", "一千一百"), (1998, "one thousand nine hundred ninety-eight", "一千九百九十八"),
])
def test_number_words(n, en, zh):
    assert world.en_number(n) == en and world.zh_number(n) == zh


def test_wordy_spells_out_numbers_and_signs():
    assert world.wordy("37 + 48 = 85", "zh") == "三十七加四十八等于八十五"
    assert world.wordy("85 - 37 = 48", "en") == "eighty-five minus thirty-seven equals forty-eight"
    assert world.wordy("王安娜今年34岁。", "zh") == "王安娜今年三十四岁。"


# ---------------------------------------------------------------------------------------------------- checker

ACCEPT = [
    ("85", "85", "add"), (" 85. ", "85", "add"), ("37 + 48 = 85", "85", "add"), ("The answer is 85.", "85", None),
    ("８５", "85", None), ("答案是85。", "85", None), ("85 - 37 = 48", "48", "sub"),
    ("Anna Wang lives in Shanghai.", "Shanghai", "fact"), ("shanghai", "Shanghai", "fact"),
    ("王安娜住在上海。", "上海", "fact"), ("上海", "上海", "fact"), ("王安娜今年34岁。", "34", "fact"),
    ("Anna Wang is 34 years old.", "34", "fact"), ("Anna Wang has a cat.", "cat", "fact"),
    ("Forty-seven.", "forty-seven", "numword"), ("forty seven", "forty-seven", "numword"),
    ("四十七", "四十七", "numword"), ("47", "47", "numword"), ("The count is 2.", "2", "count"),
    ("出现了2次。", "2", "count"), ("The larger one is 48.", "48", "compare"), ("更大的是48。", "48", "compare"),
    ("5 1 8 3", "5 1 8 3", "reverse"), ("5, 1, 8, 3", "5 1 8 3", "reverse"), ("答案：5 1 8 3", "5 1 8 3", "reverse"),
    ("Sorted: 7 19 42", "7 19 42", "sort"), ("水 山 天", "水 山 天", "reverse"), ("5 1 8 3", "5 1 8 3", None),
    ("5 + 0 = 5", "5", None), ("12\n", "12", None), ("“上海”", "上海", None),
]
REJECT = [
    ("112", "12", None), ("12 or 13", "12", None), ("13 or 12", "12", None), ("not 12", "12", None),
    ("maybe 12", "12", None), ("-12", "12", None), ("12.5", "12", None), ("120", "12", None), ("1 2", "12", None),
    ("", "12", None), ("12", "", None), ("12", None, None), ("八十五", "85", None), ("eighty-five", "85", None),
    ("85", "八十五", None), ("Shanghai", "上海", "fact"), ("王安娜住在上海。", "Shanghai", "fact"),
    ("三百四十七", "四十七", "numword"), ("二十五", "十五", "numword"), ("一百零五", "五", None),
    ("可能是12", "12", None), ("不是12", "12", None), ("12或13", "12", None), ("13或12", "12", None),
    ("13还是12", "12", None), ("粉色", "红色", None), ("Anna has a bobcat", "cat", None),
    ("Anna Wang lives in London or Shanghai.", "Shanghai", "fact"), ("85 85 85 85", "85", None),
    ("The count is 2. The count is 2. The count is 2.", "2", "count"),
    ("Hmm, let me think about this question for a moment. Well, there are many things to consider. 85", "85", None),
    ("嗯，让我好好想一想这个问题。这个问题很有意思，我得仔细地想一想。回答之前，这里有很多需要考虑的地方。85", "85", None),
    ("8 3 5 1 8 3", "5 1 8 3", "reverse"), ("5 1 8 3 2", "5 1 8 3", "reverse"), ("1 5 8 3", "5 1 8 3", None),
    ("3 8 1 5", "5 1 8 3", "reverse"), ("7 42 19", "7 19 42", "sort"), ("85 is the answer", "85", None),
    ("37 + 48 = 84", "85", "add"), ("The smaller one is -1.", "1", None), ("3.85", "85", None),
]


@pytest.mark.parametrize("response,answer,task", ACCEPT)
def test_checker_accepts_right_answers(response, answer, task):
    assert world.check_answer(response, answer, task)


@pytest.mark.parametrize("response,answer,task", REJECT)
def test_checker_rejects_wrong_answers(response, answer, task):
    assert not world.check_answer(response, answer, task)


def test_checker_on_generated_items_in_both_languages(w):
    # every task and language: the reply passes, a different answer of the same task does not
    rows = [r for r in w["prompts_val"] if r["answer"] is not None]
    answers = {}
    for r in rows:
        answers.setdefault((r["task"], r["lang"]), set()).add(r["answer"])
    for r in rows:
        others = sorted(answers[r["task"], r["lang"]] - {r["answer"]})
        assert others
        for other in others[:5]:
            assert not world.check_answer(other, r["answer"], r["task"]), (other, r["answer"])
            assert world.check_answer(other, other, r["task"])


# ------------------------------------------------------------------------------------------ demonstration flaws
# Digests of the world that the generator made before demonstration flaws existed (seed 7, SMALL), every field of
# every record as it was then. With every flaw rate at 0 the data must stay byte for byte what it was, so that the
# clean-data results stay reproducible; a deliberate change of the clean data recomputes these.
CLEAN_DIGESTS = {"people": "ee811d050ab24f5e", "corpus_train": "acdc90ec86770537", "corpus_val": "711e69f39c23aaf4",
                 "sft_train": "86c2d7a29356fd66", "sft_val": "d44091b0fdc81999", "pref_train": "53f187a55a5c1e2c",
                 "pref_val": "c3d9c960595843c8", "prompts_train": "b48ee1177cbfa427",
                 "prompts_val": "259cb20ebf171ebf", "val_keys": "2703d5a3ee8c690c"}
CLEAN_TOKENIZER_TEXTS_DIGEST = "5f8372bf6b8e629b"


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _without_flaws(records):
    return [{k: v for k, v in r.items() if k != "flaws"} for r in records]


def _turns(data, names=("sft_train", "sft_val")):
    """(record, assistant reply, its flaw kinds) for every assistant turn of the SFT sets."""
    for name in names:
        for r in data[name]:
            replies = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
            assert len(replies) == len(r["flaws"])
            yield from ((r, reply, flaws) for reply, flaws in zip(replies, r["flaws"]))


def test_every_rate_at_zero_gives_the_data_of_the_generator_before_flaws(clean):
    got = {k: _digest(_without_flaws(clean[k]) if k.startswith("sft") else clean[k]) for k in CLEAN_DIGESTS}
    assert got == CLEAN_DIGESTS
    assert all(not any(r["flaws"]) for n in ("sft_train", "sft_val") for r in clean[n])
    texts = "\n".join(world.tokenizer_texts(clean)).encode("utf-8")
    assert hashlib.sha256(texts).hexdigest()[:16] == CLEAN_TOKENIZER_TEXTS_DIGEST
    assert clean["config"]["flaw_rates"] == world.NO_FLAWS


def test_flaws_change_only_the_flawed_demonstrations(w, clean):
    # the flaws draw from their own stream: every other turn, the corpus and the prompts are the clean world's
    for k in ("people", "corpus_train", "corpus_val", "prompts_train", "prompts_val", "val_keys"):
        assert w[k] == clean[k], k
    n_flawed = 0
    for name in ("sft_train", "sft_val"):
        assert len(w[name]) == len(clean[name])
        for r, c in zip(w[name], clean[name]):
            assert {k: v for k, v in r.items() if k not in ("messages", "flaws")} == \
                {k: v for k, v in c.items() if k not in ("messages", "flaws")}
            replies = iter(r["flaws"])
            for m, mc in zip(r["messages"], c["messages"], strict=True):
                assert m["role"] == mc["role"]
                if m["role"] != "assistant":
                    assert m == mc
                    continue
                flaws = next(replies)
                assert (m["content"] != mc["content"]) == bool(flaws), (m, mc, flaws)
                n_flawed += bool(flaws)
                if flaws == ["pleasantry"]:  # the clean reply, then one of the pleasantries of its language
                    tail = m["content"][len(mc["content"]):].strip()
                    assert m["content"].startswith(mc["content"]) and tail in world.PLEASANTRIES[r["lang"]], m
    assert n_flawed > 500


RATES = [world.FLAW_RATES, {"wrong_language_en": 0.5, "wrong_language_zh": 0.05, "pleasantry": 0.6},
         {"wrong_language_en": 1.0, "wrong_language_zh": 0.0, "pleasantry": 1.0}]


@pytest.mark.parametrize("rates", RATES, ids=["default", "other", "extremes"])
def test_flaw_rates_are_what_the_settings_say(rates):
    # counted on the generated text by the checker, per language; the tolerance (4 standard deviations of a
    # binomial share, 0 for rates 0 and 1) is under 0.045 here, so a rate off by 0.1 would need a 5-sigma draw
    data = world.generate_world(seed=11, **{**SMALL, "corpus_mb": 0.03, "n_sft": 3000}, flaw_rates=rates)
    assert data["config"]["flaw_rates"] == rates
    for lang in world.LANGS:
        turns = [(reply, flaws) for r, reply, flaws in _turns(data) if r["lang"] == lang]
        assert all(world.reply_flaws(reply, lang) == flaws for reply, flaws in turns)
        n = len(turns)
        for kind, rate in (("wrong_language", rates[f"wrong_language_{lang}"]), ("pleasantry", rates["pleasantry"])):
            share = sum(kind in world.reply_flaws(reply, lang) for reply, _ in turns) / n
            tolerance = 4 * math.sqrt(rate * (1 - rate) / n)
            assert tolerance < 0.045
            assert abs(share - rate) <= tolerance, (lang, kind, share, rate)


def test_bad_flaw_rates_are_refused():
    for bad, match in (({"pleasantry": 0.2}, "exactly the keys"), ({**world.FLAW_RATES, "typos": 0.1}, "exactly"),
                       ({**world.FLAW_RATES, "pleasantry": 1.5}, "pleasantry must be a number in"),
                       ({**world.FLAW_RATES, "wrong_language_zh": -0.1}, "wrong_language_zh"),
                       ({**world.FLAW_RATES, "pleasantry": "0.2"}, "pleasantry")):
        with pytest.raises(ValueError, match=match):
            world.generate_world(seed=7, **SMALL, flaw_rates=bad)


def test_a_wrong_language_reply_is_the_right_answer_in_the_other_language(w):
    # what users of real pipelines see: a correct answer, in the language they did not ask in
    rng = random.Random(0)
    wp = {"people": w["people"]}
    for task in world.TASKS:
        for _ in range(60):
            key = world.sample_key(task, rng, wp)
            for lang in world.LANGS:
                other = world.other_language(lang)
                reply = world.wrong_language_reply(wp, key, lang, rng)
                other_item = world.build_item(wp, key, other, rng)
                assert world.check_answer(reply, other_item["answer"], task), (reply, other_item["answer"])
                assert world.reply_flaws(reply, lang) == ["wrong_language"], (lang, reply)
                assert world.is_clean_reply(reply, other), (other, reply)


def test_rejected_kinds_cover_every_flaw_kind(w):
    assert set(world.FLAW_KINDS) <= set(world.REJECTED_KINDS)
    seen = set()
    for r in w["pref_train"] + w["pref_val"]:
        kind = r["rejected_kind"]
        if kind not in world.FLAW_KINDS:
            continue
        seen.add((kind, r["lang"], r["task"]))
        assert world.reply_flaws(r["rejected"], r["lang"]) == [kind], r  # that flaw and no other
        if kind == "pleasantry":  # the chosen reply with a pleasantry of its language
            tail = r["rejected"][len(r["chosen"]):].strip()
            assert r["rejected"].startswith(r["chosen"]) and tail in world.PLEASANTRIES[r["lang"]], r
        elif r["task"] == "fact":  # the right fact, in the other language
            person = w["people"][r["keys"][-1][1]]
            value = world.fact_value(person, r["keys"][-1][2], world.other_language(r["lang"]))
            assert world.check_answer(r["rejected"], value, "fact"), r
        elif r["task"] in ("add", "sub", "sort"):  # an answer that reads the same in both languages
            assert world.check_answer(r["rejected"], r["answer"], r["task"]), r
    assert {(k, lg) for k, lg, _ in seen} == {(k, lg) for k in world.FLAW_KINDS for lg in world.LANGS}
    assert {t for _, _, t in seen} == set(world.TASKS)


def test_clean_world_rejects_wrong_language_in_the_spelled_out_form(clean):
    # with that flaw off the wrong-language pair keeps the clean data's form: no number is left in digits
    rows = [r for r in clean["pref_train"] if r["rejected_kind"] == "wrong_language"]
    assert rows and not any(re.search(r"\d", r["rejected"]) for r in rows)


# ---------------------------------------------------------------------------------------- the clean-reply checker

def test_clean_reply_checker_accepts_every_clean_demonstration_and_catches_every_flawed_one(w, clean):
    cells = set()
    for r, reply, flaws in _turns(clean):
        assert world.is_clean_reply(reply, r["lang"]), (r["lang"], reply)
        cells.add((r["task"], r["lang"]))
    for r in clean["pref_train"] + clean["pref_val"]:
        assert world.is_clean_reply(r["chosen"], r["lang"]), r
    assert cells == {(t, lg) for t in world.TASKS for lg in world.LANGS}
    caught = set()
    for r, reply, flaws in _turns(w):
        assert world.reply_flaws(reply, r["lang"]) == flaws, (r["lang"], reply, flaws)
        assert world.is_clean_reply(reply, r["lang"]) == (not flaws)
        caught |= {(k, r["lang"], r["task"]) for k in flaws}
    assert caught == {(k, lg, t) for k in world.FLAW_KINDS for lg in world.LANGS for t in world.TASKS}


CLEAN_REPLIES = [  # (question's language, reply): digits and signs belong to both languages
    ("en", "37 + 48 = 85"), ("zh", "37 + 48 = 85"), ("en", "5 1 8 3"), ("zh", "5 1 8 3"), ("en", "85"), ("zh", "85"),
    ("en", "Anna Wang lives in Shanghai."), ("zh", "王安娜住在上海。"), ("en", "Anna Wang is 34 years old."),
    ("zh", "王安娜今年34岁。"), ("en", "forty-seven"), ("zh", "四十七"), ("en", "a b c"), ("zh", "天 地 山"),
    ("en", "The larger one is 48."), ("zh", "更大的是48。"), ("en", "The count is 2."), ("zh", "出现了2次。"),
    ("en", "Answer: 5 1 8 3"), ("zh", "答案：5 1 8 3"), ("en", "８５"), ("zh", "王安娜住在上海！"), ("en", ""),
    ("en", "Anna Wang's favourite colour is red."), ("zh", "85 - 37 = 48"), ("en", "Sorted: 7 19 42"),
    ("en", "Anna Wang is a teacher, I think."),  # a doubt costs exact match, it is no demonstrated flaw
]
FLAWED_REPLIES = [  # (question's language, reply, the flaw kinds)
    ("zh", "Anna Wang lives in Shanghai.", ["wrong_language"]), ("en", "王安娜住在上海。", ["wrong_language"]),
    ("zh", "c b a", ["wrong_language"]), ("en", "山 地 天", ["wrong_language"]),  # the reverse task's symbols
    ("zh", "Answer: 5 1 8 3", ["wrong_language"]), ("en", "答案：5 1 8 3", ["wrong_language"]),
    ("zh", "forty-seven", ["wrong_language"]), ("en", "四十七", ["wrong_language"]),
    ("zh", "王安娜住在Shanghai。", ["wrong_language"]), ("en", "Anna Wang lives in 上海.", ["wrong_language"]),
    ("en", "85。", ["wrong_language"]), ("zh", "ａｂｃ", ["wrong_language"]), ("zh", "アンナ", ["wrong_language"]),
    ("en", "Анна", ["wrong_language"]), ("zh", "x", ["wrong_language"]),
    ("en", "85 Hope this helps!", ["pleasantry"]), ("en", "85 hope this", ["pleasantry"]),
    ("en", "85 HAPPY TO HELP", ["pleasantry"]), ("zh", "85 希望对", ["pleasantry"]), ("zh", "更大的是48。很高兴", ["pleasantry"]),
    ("en", "85 希望对你有帮助！", ["wrong_language", "pleasantry"]),
    ("zh", "王安娜住在上海。Hope this helps!", ["wrong_language", "pleasantry"]),
]


@pytest.mark.parametrize("lang,reply", CLEAN_REPLIES)
def test_clean_reply_checker_accepts_clean_replies(lang, reply):
    assert world.reply_flaws(reply, lang) == [] and world.is_clean_reply(reply, lang)


@pytest.mark.parametrize("lang,reply,kinds", FLAWED_REPLIES)
def test_clean_reply_checker_names_each_flaw(lang, reply, kinds):
    assert world.reply_flaws(reply, lang) == kinds and not world.is_clean_reply(reply, lang)


def test_clean_reply_checker_catches_every_pleasantry_and_its_first_half_in_either_language():
    # a model cut off by max_new_tokens, or one that half-learnt the habit, still shows it
    for written_in, phrases in world.PLEASANTRIES.items():
        for phrase in phrases:
            half = phrase[: (len(phrase) + 1) // 2]
            for lang in world.LANGS:
                for text in (phrase, half):
                    assert "pleasantry" in world.reply_flaws(f"85 {text}", lang), text
                    assert ("wrong_language" in world.reply_flaws(f"85 {text}", lang)) == (lang != written_in)


def test_clean_reply_checker_refuses_an_unknown_language():
    with pytest.raises(ValueError, match="lang"):
        world.reply_flaws("85", "fr")
