"""
Byte-level BPE tokenizer and the chat template.

The BPE itself is trained and run by the `tokenizers` library (Rust, fast); this file decides how:
- byte-level, so every UTF-8 string round-trips exactly and no character is ever <unk>;
- no normalizer, for the same reason (NFKC would rewrite full-width Chinese punctuation, for one);
- digits are split into single tokens before BPE, so "1234" is always 1 2 3 4 and a small model can learn
  arithmetic digit by digit instead of memorising arbitrary multi-digit chunks;
- the GPT-2 pre-tokenizer regex keeps a run of Chinese characters together as one "word", so BPE can learn
  merges for common characters and words: Chinese and English both end up compact.

Special tokens have the first ids (0..3, in SPECIAL_TOKENS order). encode() never produces them: text that
happens to contain "<|im_end|>" is tokenized as the plain characters '<', '|', 'im', ..., so a user cannot end
a turn or fake a role header by typing one. Only the chat template below inserts special ids.

Chat template: ChatML, the convention of Qwen, SmolLM2 and minimind that transformers, llama.cpp and Ollama
know, so that our own models and imported ones (convert.py) share one rendering, one loss mask, one stop token:
    <|im_start|>{role}\n{content}<|im_end|>\n      per message;   a prompt ends with <|im_start|>assistant\n
The text between two special tokens is encoded as one string, as transformers' apply_chat_template does, so an
imported model sees exactly the ids its own template gives. A tokenizer imported with a model may carry a
default system message (its template adds one when a conversation has none): our JSON then holds a "chat"
entry next to the library's own keys (see CHAT_KEY).
"""
import json
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from common import write_atomic

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
ROLES = ("system", "user", "assistant")
# our entry in the tokenizer JSON (the `tokenizers` library rejects unknown keys, so it is taken out before the
# library reads the rest): the end-of-text and padding tokens of an imported vocabulary and its default system
# message. Our own trained tokenizers need none of it and have no such entry.
CHAT_KEY = "chat"
_OLD_TEMPLATE_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer:

    def __init__(self, tk: HFTokenizer, chat: dict | None = None):
        self.tk = tk
        # the library matches added special tokens inside input text unless told not to; this flag is not
        # part of the saved JSON, so it is set here, on every construction path (train, load and import).
        self.tk.encode_special_tokens = True
        self.chat = dict(chat or {})
        unknown = sorted(set(self.chat) - {"eot_token", "pad_token", "default_system"})
        if unknown:
            raise ValueError(f"tokenizer JSON: unknown key(s) {unknown} in its {CHAT_KEY!r} entry")
        names = {"eot": self.chat.get("eot_token", "<|endoftext|>"), "start": "<|im_start|>", "end": "<|im_end|>",
                 "pad": self.chat.get("pad_token", "<|pad|>")}
        ids = {}
        for key, s in names.items():
            i = tk.token_to_id(s)
            if i is None:
                if key in ("start", "end") and all(tk.token_to_id(t) is not None for t in _OLD_TEMPLATE_TOKENS):
                    raise ValueError("the tokenizer predates the ChatML chat template (it has <|user|>/<|end|>, "
                                     "not <|im_start|>/<|im_end|>): rebuild the data with `python prepare.py` "
                                     "and rerun the stages")
                raise ValueError(f"tokenizer JSON lacks the special token {s!r}; not one of our tokenizers "
                                 f"(a ChatML vocabulary is needed)")
            ids[key] = i
        self.eot_id, self.start_id, self.end_id, self.pad_id = ids["eot"], ids["start"], ids["end"], ids["pad"]
        # every special token of the vocabulary ends a reply when generated (an imported vocabulary has more
        # than ours, e.g. SmolLM2's <repo_name>): a model never says one as text
        self.special_ids = frozenset([i for i, t in tk.get_added_tokens_decoder().items() if t.special] +
                                     list(ids.values()))
        self.default_system = self.chat.get("default_system")
        self.vocab_size = tk.get_vocab_size()
        self._newline = self.encode("\n")
        self._headers = {role: self.encode(role + "\n") for role in ROLES}
        self.generation_prompt = [self.start_id] + self.encode("assistant\n")

    # ---------------------------------------------------------------- training and (de)serialisation

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 6400) -> "Tokenizer":
        n_base = 256 + len(SPECIAL_TOKENS)
        if vocab_size < n_base:
            raise ValueError(f"vocab_size must be at least {n_base} (256 bytes + special tokens), got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,  # ids 0..3 in this order
            # all 256 bytes in the vocabulary even if the corpus never shows them: exact round trip of any text
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer)
        return cls(tk)

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        try:
            d = json.loads(s)
            chat = d.pop(CHAT_KEY, None) if isinstance(d, dict) else None
            tk = HFTokenizer.from_str(json.dumps(d) if chat is not None else s)
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"not a valid tokenizer JSON: {str(e).splitlines()[0] if str(e) else e!r}") from None
        if chat is not None and not isinstance(chat, dict):
            raise ValueError(f"tokenizer JSON: its {CHAT_KEY!r} entry must be an object")
        return cls(tk, chat)

    def to_json(self) -> str:
        s = self.tk.to_str()
        if not self.chat:
            return s
        d = json.loads(s)
        d[CHAT_KEY] = self.chat
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def save(self, path):
        write_atomic(path, lambda f: f.write(self.to_json()), mode="w")  # a crash never leaves half a file

    # ---------------------------------------------------------------- plain text

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same as [encode(t) for t in texts], in parallel in Rust (for prepare.py's large corpora)."""
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]  # accepts lists, tensors and numpy arrays alike
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        # ids outside the vocabulary (a model whose embedding is padded past vocab_size) are dropped by the
        # library; an incomplete UTF-8 sequence at the end decodes to U+FFFD (see StreamDecoder)
        return self.tk.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------- chat template

    def with_default_system(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template renders it: an imported model's default system message first when
        the conversation starts with another role (SmolLM2's and Qwen2.5's templates do this)."""
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.default_system}] + list(messages)
        return list(messages)

    def render_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Messages -> (ids, loss_mask), ChatML. loss_mask[i] == 1 exactly where ids[i] is assistant content or
        the <|im_end|> that closes an assistant turn: the model learns to answer and to stop, never to predict
        the user's words or the role headers (those the template supplies)."""
        check_messages(messages)
        ids, loss_mask = [], []
        for m in self.with_default_system(messages):
            header = self._headers[m["role"]]
            turn = self.encode(m["role"] + "\n" + m["content"])  # one string, as the template's text is encoded
            # the header's tokens are those the turn shares with the header alone; a reply starting with
            # whitespace may merge with the header's newline, and that token is then the reply's
            n_header = next((i for i, (a, b) in enumerate(zip(header, turn)) if a != b), min(len(header), len(turn)))
            train = 1 if m["role"] == "assistant" else 0
            ids += [self.start_id] + turn + [self.end_id] + self._newline
            loss_mask += [0] * (1 + n_header) + [train] * (len(turn) - n_header + 1) + [0] * len(self._newline)
        return ids, loss_mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """History + the assistant header (<|im_start|>assistant\\n): generation continues with the answer."""
        ids, _ = self.render_chat(messages)
        return ids + self.generation_prompt

    def render_text(self, text: str) -> list[int]:
        """Plain-text prompt for a pretraining checkpoint: documents were encode(text) + [eot], concatenated, so a
        leading eot says "a new document starts here"."""
        return [self.eot_id] + self.encode(text)


def check_messages(messages):
    """ValueError naming the message index and field, so a bad line in a data file is easy to find."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}]: missing field 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: field 'role' must be one of {'/'.join(ROLES)}, got {m['role']!r}")
        if "content" not in m or m["content"] is None:
            raise ValueError(f"messages[{i}]: missing field 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]: field 'content' must be a string, got {type(m['content']).__name__}")


class StreamDecoder:
    """Turns token ids into printable text as they arrive, so that the printed pieces, joined, are always exactly
    tokenizer.decode(all ids). A byte-level token can hold part of a UTF-8 character (a Chinese character is 3
    bytes, an emoji 4, and BPE may split them), and decoding such a prefix gives U+FFFD in its place. Decoding
    the ids one by one or in separate groups would print that U+FFFD, or split a stray byte and the character
    after it differently from decode; so each push decodes all the ids so far and prints what is new, except a
    trailing U+FFFD: it may be a character whose last bytes are still to come (a decoder replaces an incomplete
    sequence at the end by one U+FFFD; everything before it is final). flush() prints that rest. The cost is one
    decode of the reply so far per token, like the attention over the whole context that made the token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.printed = ""

    def push(self, token_id) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        stable = text[:-1] if text.endswith("\ufffd") else text
        if len(stable) <= len(self.printed) or not stable.startswith(self.printed):
            return ""
        new, self.printed = stable[len(self.printed):], stable
        return new

    def flush(self) -> str:
        """The text not printed yet; the decoder then starts a new reply."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.printed):] if text.startswith(self.printed) else ""
        self.ids, self.printed = [], ""
        return new


if __name__ == "__main__":
    # quick look at a tokenizer: python tokenizer.py data/NAME/tokenizer.json "some text"
    import sys
    tok = Tokenizer.load(sys.argv[1])
    text = sys.argv[2] if len(sys.argv) > 2 else "Hello, world! 你好，世界！ 12345"
    ids = tok.encode(text)
    print(f"vocab_size={tok.vocab_size}  {len(text)} chars -> {len(ids)} tokens ({len(text) / max(len(ids), 1):.2f} chars/token)")
    print(json.dumps([tok.decode([i], skip_special=False) for i in ids], ensure_ascii=False))
