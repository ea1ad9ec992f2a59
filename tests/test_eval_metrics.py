"""Normalizers, WER/CER and answer extraction on hand-made cases (expected values worked out by hand)."""

import pytest

from kimia.eval import metrics as M
from kimia.eval.normalizers import detect_language, normalize, remove_special, tokenize, wer_tokens


# ------------------------------------------------------------------------------------------ English
@pytest.mark.parametrize("ref, hyp", [
    ("I can't go.", "I can not go"),                          # contraction expanded like Whisper's
    ("It's twenty five dollars.", "it is $25"),                # numbers and money to digits
    ("He came in second", "he came in 2nd"),                   # ordinals
    ("HELLO, World!!", "hello world"),                         # casing and punctuation
    ("Mr. Brown's colour", "mister brown's color"),            # titles, British spelling
    ("one hundred and five", "105"),
    ("well, <|laughter|> okay", "well okay"),                  # special tags stripped
    ("the (quiet) dog [noise]", "the dog"),                    # bracketed spans dropped by the basic normalizer
])
def test_english_equivalences_have_zero_wer(ref, hyp):
    assert wer_tokens(ref, "en") == wer_tokens(hyp, "en"), (wer_tokens(ref, "en"), wer_tokens(hyp, "en"))
    assert M.corpus_wer([(ref, hyp)], "en").wer == 0.0


def test_english_wer_counts_substitutions_insertions_deletions():
    # ref: the cat sat on the mat (6) ; hyp: the cat sit on mat today -> sub(sat->sit) + del(the) + ins(today)
    st = M.corpus_wer([("The cat sat on the mat.", "the cat sit on mat today")], "en")
    assert (st.errors, st.ref_words) == (3, 6)
    assert st.wer == pytest.approx(50.0)


def test_corpus_wer_is_pooled_not_averaged():
    # 1 error in 1 word + 0 errors in 9 words = 1/10 = 10 %, not the mean of 100 % and 0 %
    nine = "alpha bravo charlie delta echo foxtrot golf hotel india"
    st = M.corpus_wer([("yes", "no"), (nine, nine)], "en")
    assert (st.errors, st.ref_words, st.utterances) == (1, 10, 2)
    assert st.wer == pytest.approx(10.0)


def test_empty_hypothesis_is_all_deletions_and_empty_reference():
    assert M.corpus_wer([("good morning everyone", "")], "en").wer == 100.0
    assert M.WerStats().wer == 0.0


def test_remove_special_matches_kit_rules():
    assert remove_special("  hello  ,  world <|endoftext|> !", "en") == "hello, world!"
    assert remove_special("你 好 ，世界", "zh") == "你好，世界"


# ------------------------------------------------------------------------------------------ Chinese
@pytest.mark.parametrize("ref, hyp", [
    ("我有3个苹果。", "我有三个苹果"),                       # cardinal
    ("今天是2021年5月3日！", "今天是二零二一年五月三日"),        # date: year digit by digit
    ("占比50%", "占比百分之五十"),                            # percent
    ("圆周率是3.14", "圆周率是三点一四"),                      # decimal
    ("花了¥12", "花了十二元"),                               # money
    ("请拨打13800138000", "请拨打一三八零零一三八零零零"),        # phone numbers read digit by digit
    ("你好，世界！“引号”", "你好 世界 引号"),                    # Chinese punctuation removed
])
def test_chinese_equivalences_have_zero_cer(ref, hyp):
    assert wer_tokens(ref, "zh") == wer_tokens(hyp, "zh")
    assert M.corpus_wer([(ref, hyp)], "zh").wer == 0.0


def test_chinese_is_tokenized_per_character():
    assert wer_tokens("你好世界", "zh") == ["你", "好", "世", "界"]
    # one wrong character out of four = 25 % (a CER)
    assert M.corpus_wer([("你好世界", "你好视界")], "zh").wer == pytest.approx(25.0)
    # Latin words inside Chinese stay whole words, lowercased
    assert tokenize(normalize("我用Python写代码", "zh")) == ["我", "用", "python", "写", "代", "码"]


def test_language_detection():
    assert detect_language("今天天气很好") == "zh"
    assert detect_language("the weather is nice") == "en"


# -------------------------------------------------------------------------------- multiple choice
OPTS = {"A": "a cat", "B": "a dog", "C": "a hot dog"}


@pytest.mark.parametrize("pred, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B: a dog", "B"), ("The answer is (C).", "C"),
    ("Answer: A", "A"), ("I hear a hot dog being grilled", "C"), ("It sounds like a dog barking", "B"),
    ("I have no idea", None), ("A cat? no, E", "A"),
])
def test_extract_choice(pred, letter):
    assert M.extract_choice(pred, OPTS) == letter


def test_parse_options_from_question():
    q = "What do you hear?\nA. a cat\nB. a dog\nC. a hot dog\nAnswer with the option's letter."
    assert M.parse_options(q) == {"A": "a cat", "B": "a dog", "C": "a hot dog"}
    assert M.parse_options("Which one? (A) rain (B) wind") == {"A": "rain", "B": "wind"}


# --------------------------------------------------------------------------------- classification
def test_match_label():
    labels = ["happy", "sad", "neutral", "very sad"]
    assert M.match_label("Sad.", labels) == "sad"
    assert M.match_label("The speaker sounds very sad to me", labels) == "very sad"
    assert M.match_label("happy, not sad", labels) == "happy"       # earliest mention
    assert M.match_label("unhappy", labels) is None                 # whole words only
    assert M.match_label("", labels) is None


def test_confusion_and_accuracy():
    conf = M.confusion_counts([("a", "a"), ("a", "b"), ("b", "b"), ("b", None)], labels=["a", "b"])
    rows, cols, counts = conf.matrix()
    assert rows == ["a", "b"] and cols == ["a", "b", "<unparsed>"]
    assert counts == [[1, 1, 0], [0, 1, 1]]
    acc = M.AccuracyStats()
    for ok, parsed in [(True, True), (False, True), (False, False), (True, True)]:
        acc.add(ok, parsed)
    assert acc.to_dict() == {"correct": 2, "total": 4, "unparsed": 1, "accuracy": 50.0}


def test_token_f1():
    assert M.token_f1("a dog barks loudly", "a dog barks loudly") == 1.0
    # overlap {a, dog} : precision 2/3, recall 2/4 -> F1 = 2*(2/3)(1/2)/(2/3+1/2) = 4/7
    assert M.token_f1("a dog barks loudly", "a dog sleeps") == pytest.approx(4 / 7)
    assert M.token_f1("rain", "") == 0.0


def test_edit_distance():
    ref, hyp = "a b c d e".split(), "a x c e f g".split()
    assert M.edit_distance(ref, hyp) == 4  # sub b->x, del d, ins f, ins g
    assert M.edit_distance([], ["a", "b"]) == 2
    assert M.edit_distance(["a"], []) == 1
