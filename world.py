"""
The embedded default data set: a small bilingual (English + Chinese) world, generated from a seed.

Why generated: every stage (pretrain, SFT, DPO, reward model, PPO/GRPO) needs something real to learn and a gain
that can be *measured* in minutes on a laptop CPU with a ~1-5M parameter model. So the world is small, the
prompts are short and every answer is short and exact, checkable by one function, `check_answer`.

The world: people with an English and a Chinese name ("Anna Wang" / "王安娜": the English surname is the pinyin
of the Chinese one and the Chinese given name transliterates the English one), each with a city, a pet, a job,
an age and a favourite colour. The pretraining corpus states every fact many times, in many phrasings, in both
languages (biographies, short stories), plus worked examples of the task families in plain text.

Task families (`task`), each asked in English and Chinese (`lang`):
    fact     a person's city / pet / job / age / favourite colour    "Where does Anna Wang live?"
    add      two- or three-digit addition                           "What is 37 + 48?"
    sub      two- or three-digit subtraction (never negative)       "计算85 - 37。"
    compare  the larger / smaller of two numbers                    "Which is larger, 37 or 48?"
    count    how many times a word occurs in a short list           "How many times does cat appear in: ..."
    reverse  a short sequence backwards                             "倒序写出：3 8 1 5"
    sort     a few numbers in ascending / descending order          "Sort from smallest to largest: 42 7 19"
    numword  digits <-> English number words / Chinese numerals     "Write 47 in words." -> "forty-seven"

Reply format (the same in SFT, in `chosen`, in the corpus's worked examples), so exact match is well defined:
facts are a short sentence that ends with the value ("Anna Wang lives in Shanghai." / "王安娜住在上海。"),
arithmetic is the equation ("37 + 48 = 85"), compare/count a short sentence ending with the number, reverse,
sort and numword the answer alone. The reference `answer` is always the bare value ("Shanghai", "85", "5 1 8 3").
A fact reply ends like the statements of the corpus, so answering a question is completing a sentence the
pretraining taught: this is what lets a tiny model answer questions about facts it was never asked in SFT.

Demonstration flaws (FLAW_KINDS, at the rates of FLAW_RATES): SFT demonstrations carry the habits of the people
who write real ones, a question answered in the other language (the right answer, in that language) and a closing
pleasantry, so that preference learning and RL have something to remove. `reply_flaws` / `is_clean_reply` find
them in any reply. The corpus's worked examples, the chosen replies and the prompts carry none.

Held-out splits test generalisation, not recall. Every item has a language-independent key (`canon`: the person
and attribute, the pair of numbers, the multiset to sort...). A val pool of keys is drawn first; every validation
item (prompts_val, sft_val, pref_val, the worked examples of the pretraining val text) uses only val keys and every
training item (SFT, preference, RL prompts, the pretraining corpus's worked examples) only the others. Held-out
facts are stated in the pretraining corpus like all facts; only their questions are held out. Held-out numbers of
numword never appear as a worked example in the training text, in either direction or language.

Everything is drawn from named `random.Random` streams (string seeds hash with SHA-512, not with Python's salted
hash) and no set is ever iterated, so the same seed and sizes give the same bytes on every machine and run.
"""
import random
import re
import unicodedata

# ---------------------------------------------------------------------------------------------------------- vocabulary
# (English, Chinese). Chinese answers are chosen so that none is a suffix of another of the same kind (no
# 粉红色 next to 红色, no 熊猫 next to 猫): the checker accepts an answer at the end of a sentence, so a suffix
# would let a wrong value pass. tests/test_world.py checks this.
FEMALE_NAMES = [("Anna", "安娜"), ("Emma", "艾玛"), ("Lily", "莉莉"), ("Grace", "格蕾丝"), ("Chloe", "克洛伊"),
                ("Mia", "米娅"), ("Sophie", "索菲"), ("Ella", "艾拉"), ("Lucy", "露西"), ("Alice", "爱丽丝"),
                ("Ruby", "露比"), ("Zoe", "佐伊"), ("Hannah", "汉娜"), ("Nora", "诺拉"), ("Iris", "艾瑞丝"),
                ("Clara", "克拉拉"), ("Ivy", "艾薇"), ("Daisy", "黛西"), ("Amy", "艾米"), ("Rose", "罗丝")]
MALE_NAMES = [("Tom", "汤姆"), ("Jack", "杰克"), ("Leo", "利奥"), ("Sam", "山姆"), ("Ben", "本"),
              ("Max", "麦克斯"), ("Oscar", "奥斯卡"), ("Henry", "亨利"), ("Noah", "诺亚"), ("Ethan", "伊桑"),
              ("Owen", "欧文"), ("Adam", "亚当"), ("Lucas", "卢卡斯"), ("Felix", "费利克斯"), ("Oliver", "奥利弗"),
              ("Ryan", "瑞安"), ("David", "大卫"), ("Eric", "埃里克"), ("Kevin", "凯文"), ("Peter", "彼得")]
SURNAMES = [("Wang", "王"), ("Li", "李"), ("Zhang", "张"), ("Liu", "刘"), ("Chen", "陈"), ("Yang", "杨"),
            ("Zhao", "赵"), ("Huang", "黄"), ("Zhou", "周"), ("Wu", "吴"), ("Xu", "徐"), ("Sun", "孙"),
            ("Ma", "马"), ("Zhu", "朱"), ("Hu", "胡"), ("Guo", "郭"), ("He", "何"), ("Lin", "林"),
            ("Gao", "高"), ("Luo", "罗")]
CITIES = [("Beijing", "北京"), ("Shanghai", "上海"), ("Chengdu", "成都"), ("Hangzhou", "杭州"), ("Wuhan", "武汉"),
          ("Nanjing", "南京"), ("London", "伦敦"), ("Paris", "巴黎"), ("Tokyo", "东京"), ("Sydney", "悉尼"),
          ("Toronto", "多伦多"), ("Berlin", "柏林")]
PETS = [("cat", "猫"), ("dog", "狗"), ("rabbit", "兔子"), ("parrot", "鹦鹉"), ("goldfish", "金鱼"),
        ("hamster", "仓鼠"), ("turtle", "乌龟"), ("pony", "小马")]
PET_MEASURE = {"金鱼": "一条", "小马": "一匹"}  # Chinese measure word; 一只 for the others
JOBS = [("teacher", "老师"), ("doctor", "医生"), ("nurse", "护士"), ("cook", "厨师"), ("farmer", "农民"),
        ("pilot", "飞行员"), ("driver", "司机"), ("painter", "画家"), ("singer", "歌手"), ("lawyer", "律师"),
        ("baker", "面包师"), ("engineer", "工程师")]
COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
           ("black", "黑色"), ("white", "白色"), ("orange", "橙色"), ("pink", "粉色"), ("grey", "灰色")]
AGE_RANGE = (18, 70)
ATTRIBUTES = ("city", "pet", "job", "age", "colour")
CATEGORIES = {"city": CITIES, "pet": PETS, "job": JOBS, "colour": COLOURS}
# symbols of the reverse task: a letter in English, a character in Chinese (none of them a numeral)
SYMBOLS = [("a", "天"), ("b", "地"), ("c", "山"), ("d", "水"), ("e", "火"), ("f", "木"), ("g", "日"), ("h", "月"),
           ("k", "风"), ("m", "云"), ("p", "花"), ("r", "草")]
COUNT_WORDS = PETS + COLOURS  # the words of the count task's lists

TASKS = ("fact", "add", "sub", "compare", "count", "reverse", "sort", "numword")
LANGS = ("en", "zh")
TASK_WEIGHTS = {"fact": 2, "add": 1, "sub": 1, "compare": 1, "count": 1, "reverse": 1, "sort": 1, "numword": 1}
REJECTED_KINDS = ("off_by_one", "wrong_fact", "wrong_language", "rambling", "pleasantry")
# Demonstration flaws: the habits of the people who write SFT demonstrations, which preference learning and RL are
# there to remove. Each assistant turn of an SFT conversation (train and val) draws each flaw independently:
#     wrong_language  the right answer, written in the other language (rate per language of the question)
#     pleasantry      the reply, then a closing pleasantry in the reply's language ("Hope this helps!")
# The pretraining text, the preference pairs' prompts and chosen replies, and the RL and held-out prompts carry no
# flaw. Every rate at 0 gives the clean data, byte for byte the same as without this feature.
FLAW_KINDS = ("wrong_language", "pleasantry")
FLAW_RATES = {"wrong_language_en": 0.1, "wrong_language_zh": 0.4, "pleasantry": 0.25}
NO_FLAWS = {k: 0.0 for k in FLAW_RATES}
SYSTEM_PROMPTS = {
    "en": ["You are a helpful assistant.", "Answer the question briefly.", "You are a friendly assistant who "
           "knows everyone in town."],
    "zh": ["你是一个乐于助人的助手。", "请简短地回答问题。", "你是一个认识镇上每个人的友好助手。"],
}

# ------------------------------------------------------------------------------------------------------ number words
EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ZH_DIGITS = "零一二三四五六七八九"


def en_number(n: int) -> str:
    """0..9999 in English words, American style: 347 -> 'three hundred forty-seven'."""
    if not 0 <= n <= 9999:
        raise ValueError(f"en_number covers 0..9999, got {n}")
    if n < 20:
        return EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return EN_TENS[tens] + (f"-{EN_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{EN_ONES[hundreds]} hundred" + (f" {en_number(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{EN_ONES[thousands]} thousand" + (f" {en_number(rest)}" if rest else "")


def zh_number(n: int) -> str:
    """0..9999 in Chinese numerals: 15 -> 十五, 110 -> 一百一十, 305 -> 三百零五, 1046 -> 一千零四十六."""
    if not 0 <= n <= 9999:
        raise ValueError(f"zh_number covers 0..9999, got {n}")
    if n < 10:
        return ZH_DIGITS[n]
    if n < 20:  # 十五, not 一十五, when it stands alone
        return "十" + (ZH_DIGITS[n - 10] if n > 10 else "")
    out, zero_run = "", False
    for unit_value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // unit_value % 10
        if d == 0:
            zero_run = bool(out)  # one 零 stands for any run of zeros inside the number: 一千零六
        else:
            out += ("零" if zero_run else "") + ZH_DIGITS[d] + unit
            zero_run = False
    return out


def number_words(n: int, lang: str) -> str:
    return en_number(n) if lang == "en" else zh_number(n)


# ------------------------------------------------------------------------------------------------------------- people

def make_people(seed: int, n_people: int) -> list[dict]:
    """n_people distinct people with their facts. Depends only on (seed, n_people)."""
    rng = random.Random(f"{seed}:people")
    names = [(first, last, female) for female, firsts in ((True, FEMALE_NAMES), (False, MALE_NAMES))
             for first in firsts for last in SURNAMES]
    if not 1 <= n_people <= len(names):
        raise ValueError(f"n_people must be in 1..{len(names)}, got {n_people}")
    people = []
    for (first, last, female) in rng.sample(names, n_people):
        people.append({
            "en": f"{first[0]} {last[0]}", "zh": last[1] + first[1], "female": female,
            "city": rng.randrange(len(CITIES)), "pet": rng.randrange(len(PETS)), "job": rng.randrange(len(JOBS)),
            "age": rng.randint(*AGE_RANGE), "colour": rng.randrange(len(COLOURS)),
        })
    return people


def fact_value(person: dict, attr: str, lang: str, value=None) -> str:
    """The answer string of a fact; `value` (an index, or an age) overrides the person's own (for wrong replies)."""
    v = person[attr] if value is None else value
    if attr == "age":
        return str(v)
    return CATEGORIES[attr][v][0 if lang == "en" else 1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pronouns(person: dict, lang: str) -> dict:
    if lang == "zh":
        return {"he": "她" if person["female"] else "他"}
    f = person["female"]
    return {"he": "she" if f else "he", "He": "She" if f else "He", "his": "her" if f else "his",
            "His": "Her" if f else "His", "him": "her" if f else "him"}


# ------------------------------------------------------------------------------------------- questions and replies
FACT_QUESTIONS = {
    "en": {"city": ["Where does {n} live?", "Which city does {n} live in?", "In which city does {n} live?"],
           "pet": ["What pet does {n} have?", "What is {n}'s pet?", "Which animal does {n} keep as a pet?"],
           "job": ["What is {n}'s job?", "What does {n} do for a living?", "What does {n} work as?"],
           "age": ["How old is {n}?", "What is {n}'s age?"],
           "colour": ["What is {n}'s favourite colour?", "Which colour does {n} like best?"]},
    "zh": {"city": ["{n}住在哪里？", "{n}住在哪个城市？", "{n}在哪座城市生活？"],
           "pet": ["{n}的宠物是什么？", "{n}养了什么宠物？", "{n}养的是什么动物？"],
           "job": ["{n}的职业是什么？", "{n}是做什么工作的？", "{n}从事什么工作？"],
           "age": ["{n}今年几岁？", "{n}多大了？"],
           "colour": ["{n}最喜欢什么颜色？", "{n}最喜欢的颜色是什么？"]},
}
FOLLOW_UP = {"en": "What about {n}?", "zh": "那{n}呢？"}


def fact_reply(person: dict, attr: str, lang: str, value: str) -> str:
    """The one reply form of a fact: a short sentence that ends with the value (ages end with 'years old'/岁)."""
    n = person[lang]
    if lang == "en":
        return {"city": f"{n} lives in {value}.", "pet": f"{n} has {_article(value)} {value}.",
                "job": f"{n} is {_article(value)} {value}.", "age": f"{n} is {value} years old.",
                "colour": f"{n}'s favourite colour is {value}."}[attr]
    return {"city": f"{n}住在{value}。", "pet": f"{n}的宠物是{value}。", "job": f"{n}是一名{value}。",
            "age": f"{n}今年{value}岁。", "colour": f"{n}最喜欢的颜色是{value}。"}[attr]


ARITH_QUESTIONS = {
    ("add", "en"): ["What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}."],
    ("add", "zh"): ["{a}加{b}等于多少？", "计算{a} + {b}。", "{a}加上{b}是多少？"],
    ("sub", "en"): ["What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}."],
    ("sub", "zh"): ["{a}减{b}等于多少？", "计算{a} - {b}。", "{a}减去{b}是多少？"],
}
COMPARE_QUESTIONS = {
    ("larger", "en"): ["Which is larger, {x} or {y}?", "Which number is bigger: {x} or {y}?"],
    ("smaller", "en"): ["Which is smaller, {x} or {y}?", "Which number is less: {x} or {y}?"],
    ("larger", "zh"): ["{x}和{y}哪个大？", "{x}和{y}中哪个数更大？"],
    ("smaller", "zh"): ["{x}和{y}哪个小？", "{x}和{y}中哪个数更小？"],
}
COMPARE_REPLY = {("larger", "en"): "The larger one is {v}.", ("smaller", "en"): "The smaller one is {v}.",
                 ("larger", "zh"): "更大的是{v}。", ("smaller", "zh"): "更小的是{v}。"}
COUNT_QUESTIONS = {"en": ["How many times does {w} appear in this list: {items}?", "Count the word {w} in: {items}"],
                   "zh": ["这个列表里{w}出现了几次：{items}？", "数一数{w}出现了几次：{items}"]}
COUNT_REPLY = {"en": "The count is {v}.", "zh": "出现了{v}次。"}
REVERSE_QUESTIONS = {"en": ["Reverse this sequence: {s}", "Write this sequence backwards: {s}"],
                     "zh": ["把这个序列倒过来：{s}", "倒序写出：{s}"]}
SORT_QUESTIONS = {
    ("asc", "en"): ["Sort from smallest to largest: {s}", "Sort these numbers in ascending order: {s}"],
    ("desc", "en"): ["Sort from largest to smallest: {s}", "Sort these numbers in descending order: {s}"],
    ("asc", "zh"): ["从小到大排序：{s}", "把这些数从小到大排列：{s}"],
    ("desc", "zh"): ["从大到小排序：{s}", "把这些数从大到小排列：{s}"],
}
NUMWORD_QUESTIONS = {
    ("to_words", "en"): ["Write {n} in words.", "How do you write {n} in English words?"],
    ("to_digits", "en"): ["Write {w} in digits.", "What is {w} as a number?"],
    ("to_words", "zh"): ["用汉字写出{n}。", "{n}用中文数字怎么写？"],
    ("to_digits", "zh"): ["把{w}写成阿拉伯数字。", "{w}用阿拉伯数字怎么写？"],
}


def _seq(items) -> str:
    return " ".join(items)


def _count_items(key, lang):
    _, target, items = key
    col = 0 if lang == "en" else 1
    return COUNT_WORDS[target][col], [COUNT_WORDS[i][col] for i in items]


def _swap_adjacent(items: list, rng: random.Random) -> list:
    """A copy with two neighbouring unequal items swapped (an off-by-one sequence); the input if all are equal."""
    spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    out = list(items)
    if spots:
        i = rng.choice(spots)
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def build_item(world: dict, key: tuple, lang: str, rng: random.Random) -> dict:
    """One concrete question for `key` in `lang`: {task, lang, key, question, answer, reply, wrong} where `wrong`
    maps a rejected kind (off_by_one, wrong_fact) to a well-formed reply built around a wrong value."""
    task = key[0]
    wrong = {}
    if task == "fact":
        _, p, attr = key
        person = world["people"][p]
        answer = fact_value(person, attr, lang)
        question = rng.choice(FACT_QUESTIONS[lang][attr]).format(n=person[lang])

        def reply_of(v):
            return fact_reply(person, attr, lang, v)
        others = [fact_value(q, attr, lang) for q in world["people"]]
        others = sorted({v for v in others if v != answer})  # another person's value (sorted: no set order)
        if attr == "age":  # the only number among the facts
            wrong["off_by_one"] = reply_of(str(person["age"] + rng.choice((-1, 1))))
        if others:
            wrong["wrong_fact"] = reply_of(rng.choice(others))
    elif task in ("add", "sub"):
        _, a, b = key
        c = a + b if task == "add" else a - b
        answer = str(c)
        question = rng.choice(ARITH_QUESTIONS[task, lang]).format(a=a, b=b)
        op = "+" if task == "add" else "-"

        def reply_of(v):
            return f"{a} {op} {b} = {v}"
        wrong["off_by_one"] = reply_of(c + rng.choice((-1, 1)) if c > 0 else c + 1)
        wrong["wrong_fact"] = reply_of(c + 10 if c < 10 or rng.random() < 0.5 else c - 10)  # a dropped carry
    elif task == "compare":
        _, x, y, which = key
        v = max(x, y) if which == "larger" else min(x, y)
        other = min(x, y) if which == "larger" else max(x, y)
        answer = str(v)
        question = rng.choice(COMPARE_QUESTIONS[which, lang]).format(x=x, y=y)

        def reply_of(val):
            return COMPARE_REPLY[which, lang].format(v=val)
        wrong["off_by_one"] = reply_of(v + 1 if v + 1 != other else v - 1)
        wrong["wrong_fact"] = reply_of(other)
    elif task == "count":
        word, items = _count_items(key, lang)
        n = items.count(word)
        answer = str(n)
        question = rng.choice(COUNT_QUESTIONS[lang]).format(w=word, items=(", " if lang == "en" else "、").join(items))

        def reply_of(v):
            return COUNT_REPLY[lang].format(v=v)
        wrong["off_by_one"] = reply_of(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
        alt = sorted({items.count(w) for w in items if items.count(w) != n})  # another word's count
        wrong["wrong_fact"] = reply_of(rng.choice(alt) if alt else len(items) + 1)
    elif task == "reverse":
        _, kind, items = key
        seq = list(items) if kind == "digits" else [SYMBOLS[i][0 if lang == "en" else 1] for i in items]
        answer = _seq(seq[::-1])
        question = rng.choice(REVERSE_QUESTIONS[lang]).format(s=_seq(seq))
        reply_of = str
        swapped = _swap_adjacent(seq[::-1], rng)
        if swapped != seq[::-1]:
            wrong["off_by_one"] = _seq(swapped)
        if seq != seq[::-1]:
            wrong["wrong_fact"] = _seq(seq)  # copied, not reversed
    elif task == "sort":
        _, direction, numbers = key
        ordered = sorted(numbers, reverse=(direction == "desc"))
        answer = _seq(str(v) for v in ordered)
        question = rng.choice(SORT_QUESTIONS[direction, lang]).format(s=_seq(str(v) for v in numbers))
        reply_of = str
        wrong["off_by_one"] = _seq(str(v) for v in _swap_adjacent(ordered, rng))
        wrong["wrong_fact"] = _seq(str(v) for v in ordered[::-1])  # the other direction
    elif task == "numword":
        _, n, direction = key
        spell = (lambda v: number_words(v, lang)) if direction == "to_words" else str
        answer = spell(n)
        if direction == "to_words":
            question = rng.choice(NUMWORD_QUESTIONS[direction, lang]).format(n=n)
        else:
            question = rng.choice(NUMWORD_QUESTIONS[direction, lang]).format(w=number_words(n, lang))
        reply_of = str  # the answer alone
        wrong["off_by_one"] = spell(n + 1 if n < 999 and (n == 0 or rng.random() < 0.5) else n - 1)
        swapped = int(str(n)[::-1])  # digits read backwards: 47 -> 74
        wrong["wrong_fact"] = spell(swapped if swapped != n else (n + 10 if n < 990 else n - 10))
    else:
        raise ValueError(f"unknown task {task!r}")
    reply = reply_of(answer)
    wrong = {k: v for k, v in wrong.items() if v != reply}
    return {"task": task, "lang": lang, "key": key, "question": question, "answer": answer, "reply": reply,
            "wrong": wrong}


# how the wrong-language reply spells numbers: in the other language's words, so that an English question answered
# "王安娜今年三十四岁。" is visibly the wrong language (and is not accepted by the checker, which wants "34")
_WORDY_OPS = {"en": {"+": "plus", "-": "minus", "=": "equals"}, "zh": {"+": "加", "-": "减", "=": "等于"}}


def wordy(text: str, lang: str) -> str:
    """Digits and arithmetic signs of `text` written out in `lang`'s words: '37 + 48 = 85' -> '三十七加四十八等于八十五'."""
    text = re.sub(r"\d+", lambda m: number_words(int(m.group()), lang), text)
    sep = " " if lang == "en" else ""
    return re.sub(r"\s*([+=]|(?<=\s)-(?=\s))\s*", lambda m: f"{sep}{_WORDY_OPS[lang][m.group(1)]}{sep}", text)


RAMBLE = {
    "en": ["Hmm, let me think about this question for a moment.", "That is a really interesting question, and I "
           "want to be careful here.", "I am not completely sure, so let me go over it once more.", "Well, there "
           "are many things to consider before answering."],
    "zh": ["嗯，让我好好想一想这个问题。", "这个问题很有意思，我得仔细地想一想。", "我不太确定，让我再回忆一下。",
           "回答之前，这里有很多需要考虑的地方。"],
}


def rejected_reply(world: dict, item: dict, kind: str, rng: random.Random, flaw_rates: dict = NO_FLAWS) -> str:
    """A plausibly wrong reply to `item` of the given kind (see REJECTED_KINDS). A demonstration flaw's kind is
    the right reply with that flaw, as the flawed demonstrations write it; so is wrong_language when the
    demonstrations of the item's language have that flaw (else the other language with its numbers spelled out,
    which no checker accepts: the clean data's form)."""
    if kind in ("off_by_one", "wrong_fact"):
        return item["wrong"][kind]
    if kind == "wrong_language":
        if flaw_rates[f"wrong_language_{item['lang']}"] > 0:
            return wrong_language_reply(world, item["key"], item["lang"], rng)
        other = other_language(item["lang"])
        return wordy(build_item(world, item["key"], other, rng)["reply"], other)
    if kind == "pleasantry":
        return with_pleasantry(item["reply"], item["lang"], rng)
    if kind == "rambling":
        lang = item["lang"]
        if rng.random() < 0.5:  # the right reply, buried in filler
            filler = rng.sample(RAMBLE[lang], 3)
            return (" " if lang == "en" else "").join(filler + [item["reply"]])
        sep = "" if item["reply"].endswith("。") else " "
        return sep.join([item["reply"]] * rng.randint(3, 5))  # repeating itself
    raise ValueError(f"unknown rejected kind {kind!r}")


# ------------------------------------------------------------------------------------------- demonstration flaws
PLEASANTRIES = {
    "en": ["Hope this helps!", "Let me know if you have any other questions.", "Happy to help!",
           "Is there anything else you would like to know?", "Glad I could help!"],
    "zh": ["希望对你有帮助！", "如果还有其他问题，欢迎随时提问。", "很高兴能帮到你！", "还有什么想知道的吗？",
           "有问题随时问我哦！"],
}
# An answer that reads the same in both languages (an equation, a sorted list, digits) is written in the other
# language by a lead-in, the way a writer who answers in that language would put it
ANSWER_LEAD_INS = {"en": ["The answer is: {r}", "Answer: {r}"], "zh": ["答案是：{r}", "答案：{r}"]}


def other_language(lang: str) -> str:
    return "zh" if lang == "en" else "en"


def wrong_language_reply(world: dict, key: tuple, lang: str, rng: random.Random) -> str:
    """The right answer to a question about `key` asked in `lang`, written in the other language: the other
    language's reply ("王安娜住在上海。" for "Where does Anna Wang live?", "c b a" for "倒序写出：山 地 天"), after
    a lead-in in that language when it would read the same in both ("答案是：37 + 48 = 85"). check_answer accepts
    it against the other language's answer."""
    other = other_language(lang)
    reply = build_item(world, key, other, rng)["reply"]
    if "wrong_language" not in reply_flaws(reply, lang):
        reply = rng.choice(ANSWER_LEAD_INS[other]).format(r=reply)
    return reply


def with_pleasantry(reply: str, lang: str, rng: random.Random) -> str:
    """`reply` followed by a closing pleasantry in `lang`."""
    return reply + ("" if reply.endswith(("。", "！", "？")) else " ") + rng.choice(PLEASANTRIES[lang])


def check_flaw_rates(flaw_rates: dict) -> dict:
    """flaw_rates with every key of FLAW_RATES, each a probability; ValueError naming the key otherwise."""
    if set(flaw_rates) != set(FLAW_RATES):
        raise ValueError(f"flaw_rates must have exactly the keys {sorted(FLAW_RATES)}, got {sorted(flaw_rates)}")
    for k, v in flaw_rates.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"flaw rate {k} must be a number in [0, 1], got {v!r}")
    return {k: float(flaw_rates[k]) for k in FLAW_RATES}


def add_flaws(world: dict, messages: list, turn_keys: list, lang: str, flaw_rates: dict,
              rng: random.Random) -> list:
    """Give each assistant turn of `messages` (in place) its demonstration flaws, drawn from `rng` (its own
    stream: the draws are made, two per turn, whatever the rates, so that the clean conversations never depend
    on them). Returns the flaw kinds of every assistant turn, in order. A wrong-language turn with a pleasantry
    ends with the pleasantry of the language it is written in."""
    replies = [m for m in messages if m["role"] == "assistant"]
    turn_flaws = []
    for m, key in zip(replies, turn_keys):
        flaws = [kind for kind, rate in zip(FLAW_KINDS, (flaw_rates[f"wrong_language_{lang}"],
                                                         flaw_rates["pleasantry"])) if rng.random() < rate]
        written_in = lang
        if "wrong_language" in flaws:
            m["content"], written_in = wrong_language_reply(world, key, lang, rng), other_language(lang)
        if "pleasantry" in flaws:
            m["content"] = with_pleasantry(m["content"], written_in, rng)
        turn_flaws.append(flaws)
    return turn_flaws


# ---------------------------------------------------------------------------------------------------- keys and splits

def canon(key: tuple) -> tuple:
    """The language-independent identity of a question, used to keep train and val apart: compare ignores which
    of larger/smaller is asked, sort which direction and order, numword which direction."""
    task = key[0]
    if task == "compare":
        return ("compare", min(key[1], key[2]), max(key[1], key[2]))
    if task == "sort":
        return ("sort", tuple(sorted(key[2])))
    if task == "numword":
        return ("numword", key[1])
    return key


def _operand(rng, digits):
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def sample_key(task: str, rng: random.Random, world: dict) -> tuple:
    """A random key of `task` (facts: any person and attribute; numbers: two or three digits...)."""
    if task == "fact":
        return ("fact", rng.randrange(len(world["people"])), rng.choice(ATTRIBUTES))
    if task in ("add", "sub"):
        digits = 2 if rng.random() < 0.6 else 3
        a, b = _operand(rng, digits), _operand(rng, digits)
        if task == "sub" and a < b:
            a, b = b, a
        return (task, a, b)
    if task == "compare":
        while True:
            dx = rng.randint(1, 3)
            dy = dx if rng.random() < 0.6 else rng.randint(1, 3)  # same length mostly: then digits must be read
            x = _operand(rng, dx) if dx > 1 else rng.randint(0, 9)
            y = _operand(rng, dy) if dy > 1 else rng.randint(0, 9)
            if x != y:
                return ("compare", x, y, rng.choice(("larger", "smaller")))
    if task == "count":
        length = rng.randint(4, 8)
        target = rng.randrange(len(COUNT_WORDS))
        n = rng.randint(0, min(4, length))
        pool = [i for i in range(len(COUNT_WORDS)) if i != target]
        items = [target] * n + [rng.choice(pool) for _ in range(length - n)]
        rng.shuffle(items)
        return ("count", target, tuple(items))
    if task == "reverse":
        length = rng.randint(3, 6)
        if rng.random() < 0.5:
            return ("reverse", "digits", tuple(str(rng.randrange(10)) for _ in range(length)))
        return ("reverse", "symbols", tuple(rng.randrange(len(SYMBOLS)) for _ in range(length)))
    if task == "sort":
        numbers = tuple(rng.sample(range(100), rng.randint(3, 6)))
        return ("sort", rng.choice(("asc", "desc")), numbers)
    if task == "numword":
        n = rng.randint(0, 999) if rng.random() < 0.7 else rng.randint(0, 99)
        return ("numword", n, rng.choice(("to_words", "to_digits")))
    raise ValueError(f"unknown task {task!r}")


def make_val_pools(world: dict, seed: int, val_fact_fraction: float, pool_size: int) -> dict:
    """task -> list of val keys (fact keys per attribute under ('fact', attr)). Drawn before anything else."""
    rng = random.Random(f"{seed}:val_pool")
    n_people = len(world["people"])
    pools = {}
    n_held = max(1, round(val_fact_fraction * n_people)) if n_people > 1 else 0
    for attr in ATTRIBUTES:  # per attribute, so every attribute has held-out people
        held = sorted(rng.sample(range(n_people), n_held))
        pools["fact", attr] = [("fact", p, attr) for p in held]
    pools["fact"] = [k for attr in ATTRIBUTES for k in pools["fact", attr]]
    # numword holds out whole numbers (both directions); small ones (<20) stay in training: they are the words
    # that the larger numbers are built from
    numbers = sorted(rng.sample(range(20, 1000), min(pool_size // 2, 980)))
    pools["numword"] = [("numword", n, d) for n in numbers for d in ("to_words", "to_digits")]
    for task in ("add", "sub", "compare", "count", "reverse", "sort"):
        seen, keys = set(), []
        for _ in range(pool_size * 20):
            if len(keys) == pool_size:
                break
            k = sample_key(task, rng, world)
            if canon(k) not in seen:
                seen.add(canon(k))
                keys.append(k)
        pools[task] = keys
    return pools


class KeyDraw:
    """Draws keys for one split: from the val pools, or (train) fresh random keys whose canon is in no val pool."""

    def __init__(self, world, pools, split, rng):
        self.world, self.pools, self.split, self.rng = world, pools, split, rng
        self.val_canon = {canon(k) for name, keys in pools.items() if name != "fact" for k in keys}
        held = set(pools["fact"])
        self.train_facts = {attr: [("fact", p, attr) for p in range(len(world["people"]))
                                   if ("fact", p, attr) not in held] for attr in ATTRIBUTES}

    def draw(self, task, attr=None):
        rng = self.rng
        if task == "fact":
            attr = attr or rng.choice(ATTRIBUTES)
            keys = self.pools["fact", attr] if self.split == "val" else self.train_facts[attr]
            return rng.choice(keys)
        if self.split == "val":
            return rng.choice(self.pools[task])
        while True:
            k = sample_key(task, rng, self.world)
            if canon(k) not in self.val_canon:
                return k


def pick_task(rng):
    return rng.choices(TASKS, weights=[TASK_WEIGHTS[t] for t in TASKS])[0]


# ----------------------------------------------------------------------------------------------- chat data sets

def make_conversation(world, keys: KeyDraw, rng, lang=None, task=None, key=None, system_p=0.25, multi_p=0.3):
    """A chat: [system] (user, assistant) x 1..3, all in one language. Returns (messages, final item, the key of
    every turn). The last user turn asks about `key` (or a fresh key of `task`); earlier turns are drawn from the
    same split. Before a fact question, an earlier turn is often a fact of the same attribute about someone else,
    and the last question is then often the follow-up 'What about X?', which only the conversation gives a
    meaning."""
    lang = lang or rng.choice(LANGS)
    final = key if key is not None else keys.draw(task or pick_task(rng))
    n_turns = 1
    if rng.random() < multi_p:
        n_turns = 2 if rng.random() < 0.7 else 3
    turn_keys = []
    for _ in range(n_turns - 1):
        for _try in range(10):  # an earlier turn must not give away the final answer
            same_attr = final[0] == "fact" and rng.random() < 0.5
            k = keys.draw("fact", attr=final[2]) if same_attr else keys.draw(pick_task(rng))
            if canon(k) != canon(final):
                break
        else:
            k = keys.draw("add" if final[0] != "add" else "sub")
        turn_keys.append(k)
    turn_keys.append(final)
    messages = []
    if rng.random() < system_p:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
    prev = None
    for k in turn_keys:
        item = build_item(world, k, lang, rng)
        if (prev is not None and k[0] == "fact" and prev[0] == "fact" and k[2] == prev[2] and k[1] != prev[1]
                and rng.random() < 0.7):
            item["question"] = FOLLOW_UP[lang].format(n=world["people"][k[1]][lang])
        messages.append({"role": "user", "content": item["question"]})
        messages.append({"role": "assistant", "content": item["reply"]})
        prev = k
    return messages, item, turn_keys


def _record(messages, item, turn_keys, **extra):
    """`keys`: the canonical key of every user turn, the checked (last) one last; the tests check the splits
    with them (prepare.py writes only messages, answer, task and lang)."""
    return {"messages": messages, "answer": item["answer"], "task": item["task"], "lang": item["lang"],
            "keys": [list(canon(k)) for k in turn_keys], **extra}


def make_sft(world, pools, split, n, seed, flaw_rates=NO_FLAWS):
    """SFT conversations with their demonstration flaws; `flaws` lists the flaw kinds of each assistant turn."""
    rng = random.Random(f"{seed}:sft_{split}")
    flaw_rng = random.Random(f"{seed}:sft_{split}:flaws")
    keys = KeyDraw(world, pools, split, rng)
    out = []
    for _ in range(n):
        messages, item, turn_keys = make_conversation(world, keys, rng, task=pick_task(rng))
        flaws = add_flaws(world, messages, turn_keys, item["lang"], flaw_rates, flaw_rng)
        out.append(_record(messages, item, turn_keys, flaws=flaws))
    return out


def make_pref(world, pools, split, n, seed, flaw_rates=NO_FLAWS):
    """Preference pairs: the clean reply chosen, a rejected reply of a kind drawn uniformly from those that apply
    (every kind of REJECTED_KINDS that the item has, pleasantry only when the demonstrations have it)."""
    rng = random.Random(f"{seed}:pref_{split}")
    keys = KeyDraw(world, pools, split, rng)
    out = []
    for _ in range(n):
        messages, item, turn_keys = make_conversation(world, keys, rng, task=pick_task(rng), multi_p=0.15)
        kinds = [k for k in REJECTED_KINDS if k in ("wrong_language", "rambling") or k in item["wrong"]
                 or (k == "pleasantry" and flaw_rates["pleasantry"] > 0)]
        kind = rng.choice(kinds)
        rejected = rejected_reply(world, item, kind, rng, flaw_rates)
        out.append(_record(messages[:-1], item, turn_keys, chosen=item["reply"], rejected=rejected,
                           rejected_kind=kind))
    return out


def make_prompts(world, pools, split, n, seed):
    """RL / evaluation prompts: the conversation without its last reply, with the reference answer. The val set
    is balanced over (task, lang), interleaved (one of each in turn, so that a stage scoring only the first k
    prompts still gets a balanced sample) and every prompt in it is distinct."""
    rng = random.Random(f"{seed}:prompts_{split}")
    keys = KeyDraw(world, pools, split, rng)
    if split == "train":
        out = []
        for _ in range(n):
            messages, item, turn_keys = make_conversation(world, keys, rng, task=pick_task(rng), system_p=0.2,
                                                          multi_p=0.15)
            out.append(_record(messages[:-1], item, turn_keys))
        return out
    cells = [(task, lang) for task in TASKS for lang in LANGS]
    per_cell, seen = [], set()
    for c, (task, lang) in enumerate(cells):
        want = n // len(cells) + (1 if c < n % len(cells) else 0)
        pool = list(pools[task])
        rng.shuffle(pool)
        cell = []
        for tries in range(20 * want + 100):  # a small pool can run out of distinct prompts: then fewer
            if len(cell) == want:
                break
            messages, item, turn_keys = make_conversation(world, keys, rng, lang=lang, key=pool[tries % len(pool)],
                                                          system_p=0.2, multi_p=0.15)
            sig = repr(messages[:-1])
            if sig not in seen:
                seen.add(sig)
                cell.append(_record(messages[:-1], item, turn_keys))
        per_cell.append(cell)
    return [cell[i] for i in range(max(map(len, per_cell))) for cell in per_cell if i < len(cell)]


# ------------------------------------------------------------------------------------------------- pretraining text
BIO_TEMPLATES = {
    "en": {"city": ["{n} lives in {v}.", "{n} lives in the city of {v}.", "{n}'s home is in {v}.",
                    "{v} is the city where {n} lives.", "{n} has made a home in {v}."],
           "pet": ["{n} has {a} {v}.", "{n}'s pet is {a} {v}.", "{n} keeps {a} {v} as a pet.",
                   "The pet that {n} owns is {a} {v}.", "{n} takes good care of a pet {v}."],
           "job": ["{n} is {a} {v}.", "{n} works as {a} {v}.", "{n}'s job is being {a} {v}.",
                   "By profession, {n} is {a} {v}.", "{n} earns a living as {a} {v}."],
           "age": ["{n} is {v} years old.", "{n}'s age is {v}.", "{n} is {v}.", "At {v} years old, {n} is "
                   "still full of energy.", "{n} turned {v} this year."],
           "colour": ["{n}'s favourite colour is {v}.", "{n} likes {v} best.", "The favourite colour of {n} is {v}.",
                      "Of all colours, {n} loves {v} the most.", "{n} would always pick {v}."]},
    "zh": {"city": ["{n}住在{v}。", "{n}的家在{v}。", "{n}生活在{v}。", "{v}是{n}住的城市。", "{n}一直在{v}生活。"],
           "pet": ["{n}的宠物是{v}。", "{n}养了{m}{v}。", "{n}有{m}{v}。", "{n}很喜欢自己的{v}。", "{n}养的宠物是{v}。"],
           "job": ["{n}是一名{v}。", "{n}的职业是{v}。", "{n}的工作是当{v}。", "{n}做{v}这份工作。", "{n}是{v}。"],
           "age": ["{n}今年{v}岁。", "{n}的年龄是{v}岁。", "{n}已经{v}岁了。", "今年{n}{v}岁。", "{n}今年满{v}岁。"],
           "colour": ["{n}最喜欢的颜色是{v}。", "{n}最喜欢{v}。", "在所有颜色里，{n}最爱{v}。", "{n}总是选{v}。",
                      "{v}是{n}最喜欢的颜色。"]},
}
NAME_LINKS = {"en": ["{en}'s Chinese name is {zh}.", "In Chinese, {en} is called {zh}."],
              "zh": ["{zh}的英文名字是{en}。", "{zh}用英文写作{en}。"]}
STORIES = {
    "en": [
        "{n} lives in {city}. Every morning, {he} feeds {his} {pet} before going to work. {n} is {a_job} {job}, "
        "and {he} enjoys it.",
        "Last weekend, {n} bought a new {colour} bag. {Colour} is {his} favourite colour, so {he} was very happy.",
        "{n} and {m} are friends. {n} lives in {city}, and {m} lives in {m_city}. When they meet, they talk about "
        "{n}'s {pet} and {m}'s {m_pet}.",
        "On {his} birthday, {n} turned {age}. {His} friends gave {him} a {colour} cake, and {his} {pet} watched "
        "from the window.",
        "As {a_job} {job}, {n} works hard in {city}. After work, {he} goes home to {his} {pet}.",
        "{n} is {age} years old and works as {a_job} {job}. {He} says that {city} is a wonderful place to live.",
    ],
    "zh": [
        "{n}住在{city}。每天早上，{he}先喂{he}的{pet}，然后去上班。{n}是一名{job}，{he}很喜欢这份工作。",
        "上个周末，{n}买了一个{colour}的包。{colour}是{he}最喜欢的颜色，所以{he}非常开心。",
        "{n}和{m}是好朋友。{n}住在{city}，{m}住在{m_city}。他们见面的时候，总是聊起{n}的{pet}和{m}的{m_pet}。",
        "{n}过生日那天满{age}岁了。朋友们送给{he}一个{colour}的蛋糕，{he}的{pet}在窗边看着。",
        "作为一名{job}，{n}在{city}努力工作。下班以后，{he}回家陪{he}的{pet}。",
        "{n}今年{age}岁，是一名{job}。{he}说{city}是一个很适合生活的地方。",
    ],
}
WORKED_FORMS = {"en": ["Question: {q}\nAnswer: {r}", "Q: {q}\nA: {r}"], "zh": ["问题：{q}\n回答：{r}", "问：{q}\n答：{r}"]}


def bio_doc(world, p, lang, rng):
    """Every fact of one person, in a random order and random phrasings, the full name in each sentence."""
    person = world["people"][p]
    sents = []
    for attr in rng.sample(ATTRIBUTES, len(ATTRIBUTES)):
        v = fact_value(person, attr, lang)
        tpl = rng.choice(BIO_TEMPLATES[lang][attr])
        sents.append(tpl.format(n=person[lang], v=v, a=_article(v), m=PET_MEASURE.get(v, "一只")))
    if rng.random() < 0.3:
        sents.insert(0, rng.choice(NAME_LINKS[lang]).format(en=person["en"], zh=person["zh"]))
    return (" " if lang == "en" else "").join(sents)


def story_doc(world, p, lang, rng):
    people = world["people"]
    person = people[p]
    other = people[rng.choice([i for i in range(len(people)) if i != p])] if len(people) > 1 else person
    f = {a: fact_value(person, a, lang) for a in ATTRIBUTES}
    fields = dict(n=person[lang], m=other[lang], city=f["city"], pet=f["pet"], job=f["job"], age=f["age"],
                  colour=f["colour"], Colour=f["colour"].capitalize(), a_job=_article(f["job"]),
                  m_city=fact_value(other, "city", lang), m_pet=fact_value(other, "pet", lang),
                  **_pronouns(person, lang))
    return rng.choice(STORIES[lang]).format(**fields)


def worked_doc(world, keys: KeyDraw, lang, rng):
    """3-8 worked examples of one task family (never facts: their questions are SFT's to ask)."""
    task = rng.choice(TASKS[1:])
    form = rng.choice(WORKED_FORMS[lang])
    parts = []
    for _ in range(rng.randint(3, 8)):
        item = build_item(world, keys.draw(task), lang, rng)
        if task == "numword" and rng.random() < 0.5:  # also plain "47 is forty-seven." lines
            n = item["key"][1]
            parts.append(f"{n} is {en_number(n)}." if lang == "en" else f"{zh_number(n)}写作{n}。")
        elif task in ("add", "sub") and rng.random() < 0.5:
            parts.append(item["reply"])
        else:
            parts.append(form.format(q=item["question"], r=item["reply"]))
    return ("\n\n" if any("\n" in x for x in parts) else "\n").join(parts)


def make_corpus(world, pools, split, n_bytes, seed):
    """Documents (plain text, no special tokens) until their UTF-8 size reaches n_bytes. People take turns in a
    shuffled order so every person's facts are stated about equally often."""
    rng = random.Random(f"{seed}:corpus_{split}")
    keys = KeyDraw(world, pools, split, rng)
    n_people = len(world["people"])
    order, docs, size = [], [], 0
    while size < n_bytes:
        if not order:
            order = list(range(n_people))
            rng.shuffle(order)
        lang = rng.choice(LANGS)
        r = rng.random()
        if r < 0.40:
            doc = bio_doc(world, order.pop(), lang, rng)
        elif r < 0.55:
            doc = story_doc(world, order.pop(), lang, rng)
        elif r < 0.60:
            person = world["people"][order.pop()]
            doc = "\n".join(rng.choice(NAME_LINKS[lg]).format(en=person["en"], zh=person["zh"]) for lg in LANGS)
        else:
            doc = worked_doc(world, keys, lang, rng)
        docs.append(doc)
        size += len(doc.encode("utf-8")) + 1
    return docs


# ------------------------------------------------------------------------------------------- the tokenizer's sample
# Byte-level BPE keeps a run of Chinese characters together as one pre-token, so on this small, templated corpus
# it merges whole sentences: trained on the raw text, "胡利奥住在上海" and "胡利奥住在哪里" are single tokens. A
# held-out fact is then unlearnable (the question token of a held-out fact never occurs in training at all) and
# number words are cut arbitrarily (四百八十 | 九). So the tokenizer learns its merges from a copy of the text in
# which every value (a surname, a given name, a city, a pet, a job, a colour, a numeral character) stands alone:
# merges then stay inside a value or inside the template text between values ("住在哪里", "最喜欢的颜色是"), the
# way a word-level Chinese tokenizer would cut it. Encoding is unchanged (plain text, no markers).
_CJK = re.compile(r"[\u3400-\u9fff]+")
_LATIN_CJK = re.compile(r"(?<=[\u3400-\u9fff])(?=[A-Za-z])|(?<=[A-Za-z])(?=[\u3400-\u9fff])")  # 是Anna -> 是 | Anna


def tokenizer_texts(data: dict):
    """Texts to train the world's tokenizer on: every text of the corpus and of the chat sets (train and val), cut
    at the world's values (see above), each also as single characters so that every character becomes whole
    before any longer merge."""
    units = {last for _, last in SURNAMES} | {zh for _, zh in FEMALE_NAMES + MALE_NAMES}
    units |= {zh for table in (CITIES, PETS, JOBS, COLOURS) for _, zh in table} | set(ZH_DIGITS + "十百千")
    unit = re.compile("|".join(re.escape(u) for u in sorted(units, key=lambda u: (-len(u), u))))
    every_char = sorted({ch for u in units for ch in u} | {ch for table in SYSTEM_PROMPTS.values()
                                                           for s in table for ch in s if _CJK.match(ch)})
    yield "\n".join(every_char)
    chats = [r for name in ("sft_train", "sft_val", "pref_train", "pref_val", "prompts_train", "prompts_val")
             for r in data.get(name, ())]
    texts = (t for part in (data["corpus_train"], data["corpus_val"],
                            (m["content"] for r in chats for m in r["messages"]),
                            (r[k] for r in chats for k in ("chosen", "rejected") if k in r)) for t in part)
    for t in texts:
        yield _LATIN_CJK.sub("\n", unit.sub(lambda m: f"\n{m.group()}\n", t))  # a newline ends a BPE pre-token
        chars = "\n".join(ch for run in _CJK.findall(t) for ch in run)
        if chars:
            yield chars


# ---------------------------------------------------------------------------------------------------------- the world

def generate_world(seed: int = 1337, corpus_mb: float = 3.0, n_people: int = 60, n_sft: int = 20000,
                   n_sft_val: int = 800, n_pref: int = 6000, n_pref_val: int = 400, n_prompts: int = 4000,
                   n_prompts_val: int = 640, val_fact_fraction: float = 0.2, val_pool_size: int = 400,
                   flaw_rates: dict = None) -> dict:
    """The whole default data set as plain Python objects, a pure function of the arguments.

    Returns {"config", "people", "corpus_train", "corpus_val" (lists of documents), "sft_train", "sft_val"
    ({messages, answer, task, lang, keys, flaws}), "pref_train", "pref_val" ({messages (the prompt), chosen,
    rejected, rejected_kind, answer, task, lang, keys}), "prompts_train", "prompts_val" ({messages, answer, task,
    lang, keys}), "val_keys"}. `keys` are the canonical keys of a record's user turns, the checked one last;
    `flaws` the demonstration flaw kinds of each assistant turn; `val_keys` every held-out key: a
    `val_fact_fraction` of each attribute's people and `val_pool_size` keys of each other task (numword:
    val_pool_size // 2 numbers, both directions). The pretraining val text is about 5% of corpus_mb (at least
    20 kB). `flaw_rates`: the share of demonstrations with each flaw (the keys of FLAW_RATES, the default; NO_FLAWS
    gives clean demonstrations); ValueError for a missing or unknown key or a rate outside [0, 1]."""
    if n_people < 5:
        raise ValueError(f"n_people must be at least 5 (some people's facts are held out), got {n_people}")
    flaw_rates = check_flaw_rates(FLAW_RATES if flaw_rates is None else flaw_rates)
    world = {"people": make_people(seed, n_people)}
    pools = make_val_pools(world, seed, val_fact_fraction, val_pool_size)
    n_bytes = int(corpus_mb * 1e6)
    return {
        "config": {"seed": seed, "corpus_mb": corpus_mb, "n_people": n_people, "n_sft": n_sft,
                   "n_sft_val": n_sft_val, "n_pref": n_pref, "n_pref_val": n_pref_val, "n_prompts": n_prompts,
                   "n_prompts_val": n_prompts_val, "val_fact_fraction": val_fact_fraction,
                   "val_pool_size": val_pool_size, "flaw_rates": flaw_rates},
        "people": world["people"],
        "corpus_train": make_corpus(world, pools, "train", n_bytes, seed),
        "corpus_val": make_corpus(world, pools, "val", max(n_bytes // 20, 20000), seed),
        "sft_train": make_sft(world, pools, "train", n_sft, seed, flaw_rates),
        "sft_val": make_sft(world, pools, "val", n_sft_val, seed, flaw_rates),
        "pref_train": make_pref(world, pools, "train", n_pref, seed, flaw_rates),
        "pref_val": make_pref(world, pools, "val", n_pref_val, seed, flaw_rates),
        "prompts_train": make_prompts(world, pools, "train", n_prompts, seed),
        "prompts_val": make_prompts(world, pools, "val", n_prompts_val, seed),
        "val_keys": sorted({repr(canon(k)): list(canon(k)) for task in TASKS for k in pools[task]}.values(), key=repr),
    }


# ------------------------------------------------------------------------------------------------------- the checker
# Chinese punctuation that NFKC leaves alone, mapped to ASCII so one rule handles both languages
_PUNCT = str.maketrans({"。": ".", "、": ",", "“": '"', "”": '"', "‘": "'", "’": "'", "「": '"', "」": '"',
                        "『": '"', "』": '"', "《": '"', "》": '"', "…": ".", "—": "-", "–": "-", "−": "-",
                        "·": " "})
_EDGE = " .,!?;:\"'()[]{}<>`*_~"
_ZH_NUMERALS = "零一二三四五六七八九十百千万两"
_UNITS = ("years old", "year old", "years", "times", "岁", "个", "只", "次")  # may follow a number
_EN_DOUBT = {"maybe", "perhaps", "possibly", "probably", "not", "isn't", "guess", "unsure", "either"}
_EN_JOIN = {"or", "and", "than", "nor"}
_ZH_DOUBT = ("可能", "也许", "大概", "或许", "好像", "不是", "不确定", "不太确定", "不知道")
_ZH_JOIN = ("或", "或者", "还是", "和", "与", "不")
_LEAD_INS = (":", "=", " is", " are", "是", "为")
MAX_PREFIX_WIDTH = 60  # display width (a CJK character counts 2) of what may precede the answer


def normalize(text: str) -> str:
    """Case, width, Chinese punctuation, hyphenated number words ('forty-seven' == 'forty seven'), list commas and
    surrounding whitespace/punctuation do not matter."""
    s = unicodedata.normalize("NFKC", text).translate(_PUNCT).lower()
    s = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", s)
    s = re.sub(r"[,;]", " ", s)
    return " ".join(s.split()).strip(_EDGE)


def _width(s: str) -> int:
    return sum(2 if ord(ch) >= 0x2E80 else 1 for ch in s)


def _glued(c: str, a0: str) -> bool:
    """True when character c, right before an answer starting with a0, would make it part of a longer token:
    '1' before '12' (112), '-' before '12' (-12), 百 before 四十七 (一百四十七), a letter before 'cat' (bobcat)."""
    if not c:
        return False
    if a0.isascii() and a0.isalnum():
        if c.isascii() and c.isalnum():
            return True
        if a0.isdigit() and (c in "-." or c in _ZH_NUMERALS):
            return True
    if a0 in _ZH_NUMERALS and (c in _ZH_NUMERALS or c.isdigit()):
        return True
    return False


def _occurrences(r: str, a: str) -> int:
    """How many times a occurs in r as a whole unit (not glued to a neighbour on either side)."""
    count, i = 0, r.find(a)
    while i >= 0:
        j = i + len(a)
        after, after2 = r[j:j + 1], r[j + 1:j + 2]
        glued_after = ((after.isascii() and after.isalnum() and a[-1].isascii() and a[-1].isalnum())
                       or (a[-1].isdigit() and after == "." and after2.isdigit())
                       or (a[-1] in _ZH_NUMERALS and after != "" and (after in _ZH_NUMERALS or after.isdigit())))
        if not _glued(r[i - 1] if i > 0 else "", a[0]) and not glued_after:
            count += 1
        i = r.find(a, i + 1)
    return count


def check_answer(response: str, answer: str, task: str = None) -> bool:
    """True when `response` gives `answer`: alone, or at the end of a short sentence ('37 + 48 = 85',
    'Anna Wang lives in Shanghai.', '王安娜今年34岁。'). Rejected: another value ('112' or '-12' for '12'), an
    alternative or a doubt ('12 or 13', '13 or 12', 'maybe 12', 'not 12', '可能是12'), the answer buried in
    a long ramble or repeated three times or more, the right value in the other language or form ('八十五' for
    '85', 'Shanghai' for '上海'). For sequences (task reverse/sort, or an answer of single digits/characters
    separated by spaces) what precedes the answer must end with a lead-in ('...: 5 1 8 3'), so that
    '8 3 5 1 8 3' does not pass for '5 1 8 3'. The one checker every exact-match metric uses."""
    if not isinstance(response, str) or not answer:
        return False
    r, a = normalize(response), normalize(str(answer))
    if not a or not r:
        return False
    if r == a:
        return True
    for unit in _UNITS:  # '34 years old', '34岁', '出现了2次'
        if r.endswith(unit) and not a.endswith(unit) and len(r) > len(unit):
            r = r[: -len(unit)].rstrip(_EDGE)
            break
    if not r.endswith(a):
        return False
    prefix = r[: len(r) - len(a)]
    if _glued(prefix[-1:], a[0]):
        return False
    if _width(prefix) > MAX_PREFIX_WIDTH or _occurrences(r, a) >= 3:
        return False
    words = prefix.rstrip(_EDGE).split()
    tail = prefix.rstrip(_EDGE)
    if any(w.strip(_EDGE) in _EN_DOUBT for w in words) or (words and words[-1] in _EN_JOIN):
        return False
    if any(d in prefix for d in _ZH_DOUBT) or tail.endswith(_ZH_JOIN):
        return False
    items = a.split()
    is_seq = task in ("reverse", "sort") or (task is None and len(items) >= 2
                                            and all(x.isdigit() or len(x) == 1 for x in items))
    if is_seq and not prefix.rstrip().endswith(_LEAD_INS):
        return False
    return True


# --------------------------------------------------------------------------------------------- the clean-reply checker
# "In the question's language" is about letters, not about every character: digits, arithmetic signs and spaces read
# the same in both languages, so "37 + 48 = 85" and "5 1 8 3" are clean replies to questions in either. A Chinese
# reply has no letter other than a Chinese character (names are Chinese in a Chinese reply, the reverse task's
# symbols are 天 地 山 ...; a Latin letter, kana or any other script is another language). An English reply has no
# letter outside ASCII and no Chinese punctuation (。、「」), which NFKC does not fold into ASCII.
_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_CJK_PUNCT = re.compile(r"[\u3000-\u303f]")
# Words of the demonstrated pleasantries that no clean reply contains, so that a fragment ("Hope this", "很高兴")
# is caught too; tests/test_world.py checks both halves of that claim on every pleasantry and clean demonstration
_PLEASANTRY_CUES = re.compile(r"\b(?:hope|help|helps|glad|happy|questions|anything else|let me know)\b"
                              r"|希望|帮助|帮到|高兴|提问|随时|想知道|其他问题|还有什么|有问题", re.IGNORECASE)


def reply_flaws(response: str, lang: str) -> list[str]:
    """The demonstration flaw kinds (FLAW_KINDS, in that order) that `response` to a question in `lang` ('en' or
    'zh') shows: wrong_language when it has a letter of another language (see above; digits and signs belong to
    both), pleasantry when it has a pleasantry of either language or a fragment of one. It says nothing about
    whether the answer is right (check_answer does). ValueError for an unknown lang."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    text = unicodedata.normalize("NFKC", response)
    if lang == "en":
        foreign = any(ch.isalpha() and not ch.isascii() for ch in text) or bool(_CJK_PUNCT.search(text))
    else:
        foreign = any(ch.isalpha() and not _CJK_CHAR.match(ch) for ch in text)
    found = {"wrong_language": foreign, "pleasantry": bool(_PLEASANTRY_CUES.search(text))}
    return [kind for kind in FLAW_KINDS if found[kind]]


def is_clean_reply(response: str, lang: str) -> bool:
    """True when `response` is in the question's language `lang` and shows no demonstrated flaw (reply_flaws is
    empty); the clean-reply rate of every policy stage counts these. An empty reply is clean: it is scored wrong by
    check_answer, not here."""
    return not reply_flaws(response, lang)
