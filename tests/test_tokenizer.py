"""CLIPTokenizer against open_clip's tokenizer and transformers' CLIPTokenizer.

Reference differences, found on the corpus below and asserted exactly:
- transformers does no ftfy or HTML cleanup (only NFC, whitespace folding, lower case), so
  it differs from us and open_clip on mojibake, curly quotes, ligatures, full-width letters and
  HTML entities. We follow open_clip (OpenAI CLIP's own tokenizer, also KerasCV's): that is the
  text CLIP was trained on. Fed open_clip's cleaned text, transformers agrees with us there too.
- open_clip names its special tokens `<start_of_text>`/`<end_of_text>`, so it BPE-splits the
  text "<|endoftext|>"; we match it whole, as OpenAI CLIP, KerasCV and transformers do.
"""

import copy
import gzip
import importlib.util
import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from keras_sd.tokenizer import CLIPTokenizer, bytes_to_unicode

MAX_LEN = 77
SUBJECTS = ["a cat", "two dogs", "an old man", "the Eiffel Tower", "a red circle", "robots",
            "a bowl of ramen", "Mount Fuji", "an astronaut", "a lighthouse", "sunflowers",
            "a steampunk airship"]  # fmt: skip
SETTINGS = ["on a beach", "in the rain", "at night", "under water", "on Mars",
            "in a forest", "next to a river", "inside a cathedral", "in space"]  # fmt: skip
STYLES = ["oil painting", "photo, 35mm, f/1.8", "digital art", "watercolor",
          "trending on artstation", "8k, highly detailed", "by Greg Rutkowski",
          "pixel-art", "isometric 3D render", "ukiyo-e woodblock print"]  # fmt: skip

# Categories where transformers' missing ftfy/HTML cleanup changes the ids.
CLEANUP = ["mojibake", "ftfy", "html"]
EXTRA = {
    "punctuation": ["!!!???...", "…and more", "wow!!! really??? ok...",
                    "a cat -- (masterpiece:1.2) [[sky]]",
                    "it's they're we've I'm you'll he'd don't", "IT'S LOUD", "c'est l'été",
                    "#hashtag @user $100 50% a+b=c x_y {json: [1, 2]}"],
    "numbers": ["1234567 3.14", "year 1999, 2024-05-01", "0.5x zoom ×4", "v1.5 vs v2.1",
                "٣ ٤ Ⅻ ½ ²"],
    "whitespace": ["  a   cat \t on\na\r\nmat  ", "\t\n", "", "a\u3000b\u00a0c\u2003d",
                   "tab\tseparated\tvalues", "  leading", "trailing  "],
    "unicode": ["café crème brûlée", "naïve Zoë Ångström Øresund", "Ωμέγα αλφα", "Москва ночью",
                "東京タワー 夜景", "서울 야경", "القاهرة", "ñandú pingüino", "e\u0301cole",
                "ß straße STRASSE", "İstanbul ıi", "🐱🚀🌕 cat emoji", "👩‍🚀 astronaut 👍🏽",
                "a cat 🐈‍⬛ and ❤️", "x\u200by zero-width"],
    "mojibake": ["cafÃ© au lait", "Ã¼ber cool", "donâ€™t stop", "â€œquotedâ€\x9d text",
                 "naÃ¯ve piÃ±ata", "SchrÃ¶dinger's cat"],
    "ftfy": ["“curly quotes” and ‘single’", "ﬁsh and ﬂowers", "ＡＢＣ ｆｕｌｌ ｗｉｄｔｈ",
             "a cat’s toy"],
    "html": ["salt &amp; pepper", "&lt;3 love", "&quot;quoted&quot;", "rock &amp;amp; roll",
             "it&#39;s &#x263a;", "fish&nbsp;chips", "&copy; 2024",
             "&amp;amp;amp; triple", "<b>salt &amp;amp; pepper</b>"],
    "special": ["a cat <|endoftext|> a dog", "<|startoftext|>hello", "x<|endoftext|>y",
                "<|endoftext|><|endoftext|>"],
}  # fmt: skip


def _corpus() -> list[tuple[str, str]]:
    """(category, prompt) pairs: 1,080 plain prompts, edge cases, 60 far-too-long prompts."""
    corpus = [
        ("plain", f"{s} {p}, {st}") for s, p, st in itertools.product(SUBJECTS, SETTINGS, STYLES)
    ]
    corpus += [(cat, text) for cat, texts in EXTRA.items() for text in texts]
    for i in range(60):
        words = [SUBJECTS[(i + k) % 12] + " " + SETTINGS[(i * k) % 9] for k in range(36 + i)]
        corpus.append(("long", ", ".join(words) + f" !!! {i * 7919}"))
    return corpus


def _load_open_clip_tokenizer():
    # Importing the open_clip package pulls in torchvision, which is not installed: load the
    # tokenizer module by path.
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", f"{package_dir}/tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_clip_tok():
    return _load_open_clip_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, open_clip_tok):
    """transformers' CLIPTokenizer built offline from the bundled merges file."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    bundled = Path(__file__).parents[1] / "src/keras_sd/assets/bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bundled).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(open_clip_tok.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return HFCLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def _hf_ids(hf_tokenizer, prompts):
    out = hf_tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True)
    return np.asarray(out["input_ids"])


def test_vocabulary_counts(tokenizer, open_clip_tok):
    assert bytes_to_unicode() == open_clip_tok.bytes_to_unicode()
    assert list(bytes_to_unicode()) == list(open_clip_tok.bytes_to_unicode())  # id order
    assert tokenizer.vocab_size == 49_408 == 256 + 256 + 48_894 + 2
    assert (tokenizer.start_token_id, tokenizer.end_token_id) == (49_406, 49_407)
    assert tokenizer.pad_token_id == tokenizer.end_token_id
    assert CLIPTokenizer(pad_token="!").pad_token_id == 0


def test_matches_open_clip_on_corpus(tokenizer, open_clip_tok):
    corpus = _corpus()
    assert len(corpus) >= 1_000 and sum(c == "long" for c, _ in corpus) >= 50
    prompts = [p for c, p in corpus if c != "special"]
    ours = CLIPTokenizer(pad_token="!")(prompts)
    expected = open_clip_tok.tokenize(prompts, context_length=MAX_LEN).numpy()
    mismatched = [p for p, a, b in zip(prompts, ours, expected, strict=True) if (a != b).any()]
    assert not mismatched
    # The long prompts really are truncated, ending with the end token.
    assert (ours[-60:, -1] == tokenizer.end_token_id).all()
    assert min(len(tokenizer.encode(p)) for c, p in corpus if c == "long") > 2 * MAX_LEN
    # Unpadded, unclipped ids are open_clip's too (KerasCV's encode() contract).
    for p in prompts[::97]:
        assert tokenizer.encode(p) == [49406, *open_clip_tok._tokenizer.encode(p), 49407]


def test_matches_transformers_on_corpus(tokenizer, hf_tokenizer, open_clip_tok):
    corpus = _corpus()
    prompts = [p for _, p in corpus]
    ours = tokenizer(prompts)
    raw = _hf_ids(hf_tokenizer, prompts)
    differs = {c for (c, _), a, b in zip(corpus, ours, raw, strict=True) if (a != b).any()}
    per_prompt = [(a != b).any() for a, b in zip(ours, raw, strict=True)]
    # Exactly the cleanup categories differ, and every prompt in them does.
    assert differs == set(CLEANUP)
    assert all(d == (c in CLEANUP) for (c, _), d in zip(corpus, per_prompt, strict=True))
    # Given open_clip's cleaned text, transformers agrees with us everywhere.
    cleaned = [open_clip_tok.basic_clean(p) for p in prompts]
    np.testing.assert_array_equal(ours, _hf_ids(hf_tokenizer, cleaned))


def test_special_tokens_in_text_match_whole(tokenizer):
    assert tokenizer.encode("x<|endoftext|>y") == [49406, 343, 49407, 344, 49407]


def test_add_tokens(hf_tokenizer):
    tok = CLIPTokenizer()
    plain = tok.encode("a photo of <cat-toy>")
    assert tok.add_tokens(["<cat-toy>", "<dog-toy>"]) == [49_408, 49_409]
    assert tok.vocab_size == 49_410
    assert tok.encode("a photo of <cat-toy>") == [49406, 320, 1125, 539, 49408, 49407]
    assert tok.encode("<Dog-Toy>and <cat-toy>s") == [49406, 49409, 537, 49408, 338, 49407]
    assert tok.add_tokens("<x>") == [49_410]
    # Same as transformers' added tokens (matched after its lower-casing normaliser).
    hf = hf_tokenizer.__class__.from_pretrained(hf_tokenizer.name_or_path)
    hf.add_tokens(["<cat-toy>", "<dog-toy>", "<x>"])
    text = "A <x> photo of <cat-toy>, <dog-toy>s and <CAT-TOY>"
    assert tok.encode(text) == hf(text)["input_ids"]
    # Tokens without added ones are untouched.
    assert CLIPTokenizer().encode("a photo of <cat-toy>") == plain
    with pytest.raises(ValueError, match="'<cat-toy>'.*already"):
        tok.add_tokens(["<new>", "<cat-toy>"])
    assert tok.vocab_size == 49_411  # nothing added by the failed call
    with pytest.raises(ValueError, match="'cat'.*already.*2368"):
        tok.add_tokens("cat")
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        tok.add_tokens("<|endoftext|>")
    with pytest.raises(ValueError, match="twice"):
        tok.add_tokens(["<a>", "<A>"])
    with pytest.raises(ValueError, match="empty"):
        tok.add_tokens("  ")


def test_decode(tokenizer, open_clip_tok):
    for subject, setting in itertools.product(SUBJECTS, SETTINGS):
        text = f"{subject} {setting}"
        assert tokenizer.decode(tokenizer(text)[0]) == text.lower()
    for category, prompt in _corpus()[1000:]:
        if category == "special":  # open_clip decodes the end token as "<end_of_text>"
            continue
        ids = tokenizer.encode(prompt)
        assert tokenizer.decode(ids) == open_clip_tok._tokenizer.decode(ids[1:-1]).rstrip()
    tok = CLIPTokenizer(pad_token="!", added_tokens=["<cat-toy>"])
    assert tok.decode(tok("a photo of <cat-toy> on a beach!")[0]) == (
        "a photo of <cat-toy> on a beach !"
    )
    # Prompt text that looks like the end-of-word marker is not mistaken for one.
    assert tok.decode(tok.encode("a </w> tag")) == "a </ w > tag"


def test_config_round_trip():
    tok = CLIPTokenizer(max_length=12, pad_token="!")
    tok.add_tokens(["<cat-toy>", "<dog-toy>"])
    config = tok.get_config()
    assert json.loads(json.dumps(config)) == config
    restored = CLIPTokenizer.from_config(config)
    assert restored.get_config() == config
    text = "a <dog-toy> and a <cat-toy> " * 5
    np.testing.assert_array_equal(restored(text), tok(text))
    assert restored(text).shape == (1, 12) and restored(text)[0, -1] == 49407
    assert (restored("a")[0, 3:] == 0).all()
    for copied in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert copied.get_config() == config
        np.testing.assert_array_equal(copied(text), tok(text))


def test_errors(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="`text`.*int"):
        tokenizer.encode(5)
    with pytest.raises(TypeError, match="`texts\\[1\\]`.*bytes"):
        tokenizer(["ok", b"bytes"])
    with pytest.raises(TypeError, match="`texts`.*NoneType"):
        tokenizer(None)
    with pytest.raises(TypeError, match="`tokens\\[0\\]`.*int"):
        CLIPTokenizer().add_tokens([3])
    with pytest.raises(ValueError, match="pad_token.*'<pad>'"):
        CLIPTokenizer(pad_token="<pad>")
    with pytest.raises(ValueError, match="max_length.*1"):
        CLIPTokenizer(max_length=1)
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([320, 49408])
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="vocab_path=.*short.txt.gz.*48894"):
        CLIPTokenizer(vocab_path=str(short))


def test_save_vocabulary_matches_reference_files(tokenizer, hf_tokenizer, tmp_path):
    """Our diffusers-folder files equal the ones built independently from open_clip."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    vocab_path, merges_path = tokenizer.save_vocabulary(tmp_path)
    ours = HFCLIPTokenizer.from_pretrained(str(tmp_path))
    assert ours.get_vocab() == hf_tokenizer.get_vocab()
    prompts = [text for text, _ in _corpus()[:200]]
    np.testing.assert_array_equal(_hf_ids(ours, prompts), _hf_ids(hf_tokenizer, prompts))
    assert json.loads(open(vocab_path, encoding="utf-8").read())["<|endoftext|>"] == 49407
    assert open(merges_path, encoding="utf-8").read().count("\n") == 48_894 + 1


def _quadratic_bpe(tokenizer, word: str) -> tuple:
    """CLIP's reference loop: merge every occurrence of the lowest-ranked pair present,
    left to right, until no pair is ranked."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(tokenizer._ranks.get(p, float("inf")), p) for p in itertools.pairwise(symbols)]
        rank, best = min(pairs)
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return tuple(tokenizer._token_to_id[s] for s in symbols)


def test_fast_bpe_makes_the_reference_merges():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizer = CLIPTokenizer()
    alphabets = ["ab", "aeiou", "abcdefghijklmnopqrstuvwxyz", "".join(bytes_to_unicode().values())]
    words = st.sampled_from(alphabets).flatmap(lambda a: st.text(a, min_size=1, max_size=60))

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(words)
    def same(word):
        assert tokenizer._bpe_uncached(word) == _quadratic_bpe(tokenizer, word), word

    same()
