import sys

import pytest

from slim_edge.errors import SlimEdgeError
from slim_edge.evals import corpora


def _get(name, split):
    try:
        return corpora.get_text(name, split)
    except SlimEdgeError as e:  # first use needs the gensim wheel from PyPI
        if "download" in str(e):
            pytest.skip(f"gensim wheel not cached and not downloadable: {e}")
        raise


# (documents, characters) of each split; the texts are pinned by the wheel members' sha256
@pytest.mark.parametrize("name,split,docs,chars", [
    ("lee", "train", 196, 236719),
    ("lee", "eval", 97, 115702),
    ("wiki", "train", 90, 2229966),
    ("wiki", "eval", 16, 587374),
])
def test_builtin_split_sizes(name, split, docs, chars):
    c = _get(name, split)
    assert (c.n_docs, len(c.text)) == (docs, chars)
    assert c.provenance.startswith(f"{name}:{split} ")


@pytest.mark.parametrize("name", corpora.BUILTIN)
def test_splits_are_disjoint(name):
    train, held = _get(name, "train"), _get(name, "eval")
    corpora.check_disjoint(train, held)  # raises on any shared sentence of >= 80 chars
    train_docs = set(train.text.split("\n"))
    assert not any(d in train_docs for d in held.text.split("\n") if len(d) >= 80)


def test_lee_split_by_line_index():
    from slim_edge.evals.corpora import _LEE_MEMBER, _gensim_member

    _get("lee", "eval")
    lines = _gensim_member(_LEE_MEMBER).decode().split("\n")
    held = _get("lee", "eval").text.split("\n")
    assert held[0] == lines[200] and held[-1] == lines[299]
    assert _get("lee", "train").text.split("\n")[0] == lines[0]


def test_pydoc_split_rule():
    from pydoc_data import topics

    keys = sorted(topics.topics)
    held = corpora.get_text("pydoc", "eval")
    assert held.n_docs == len(keys[3::4])
    assert held.text.startswith(topics.topics[keys[3]].strip())
    assert f"Python {sys.version.split()[0]}" in held.provenance


def test_unpacks_as_text_and_provenance():
    text, source = corpora.get_text("pydoc", "train")
    assert len(text) > 100_000 and source.startswith("pydoc:train")


def test_wiki_markup_is_stripped():
    raw = ("{{Infobox|a={{nested|b}}}}'''Bold''' is a [[Link target|word]] and [[plain]].<ref>cite</ref> "
           "[http://x.org Site] &amp; [[File:X.jpg|thumb|a [[caption]]]]\n== History ==\n* item\n"
           "== References ==\n* gone")
    assert corpora.strip_wiki_markup(raw) == "Bold is a word and plain. Site &\nHistory\nitem"


def test_user_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("\ufeffhello world\n", encoding="utf-8")
    c = corpora.get_text(str(p), "eval")
    assert c.text == "hello world\n" and c.provenance.startswith(f"file {p} (whole file, 12 chars")


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"  \n\t\n", "is empty"),
    (b"caf\xe9 au lait", r"not UTF-8 \(byte 0xe9 at offset 3\)"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(SlimEdgeError, match=match):
        corpora.get_text(str(p))


def test_missing_file_directory_unknown_name_bad_split(tmp_path):
    with pytest.raises(SlimEdgeError, match="does not exist"):
        corpora.get_text(str(tmp_path / "nope.txt"))
    with pytest.raises(SlimEdgeError, match="not a file"):
        corpora.get_text(str(tmp_path))
    with pytest.raises(SlimEdgeError, match="unknown corpus 'leee'"):
        corpora.get_text("leee")
    with pytest.raises(SlimEdgeError, match="unknown split 'test'"):
        corpora.get_text("lee", "test")


def test_same_file_for_train_and_eval_is_refused(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("A sentence that is long enough to count as a real sentence of the corpus text. " * 3)
    with pytest.raises(SlimEdgeError, match="are identical"):
        corpora.check_disjoint(corpora.get_text(str(p), "train"), corpora.get_text(str(p), "eval"))
    with pytest.raises(SlimEdgeError, match=r"the same \(pydoc:eval\)"):
        corpora.check_disjoint(corpora.get_text("pydoc", "eval"), corpora.get_text("pydoc", "eval"))


def test_shared_sentence_is_refused():
    s = "This sentence is copied from the training text into the evaluation text by mistake."
    with pytest.raises(SlimEdgeError, match="share 1 sentences"):
        corpora.check_disjoint(f"Train start. {s} More.", f"Eval start. {s}")
    corpora.check_disjoint(f"Train start. {s[:70]}.", f"Eval start. {s[:70]}.")  # short ones are fine


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIM_EDGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.corpora_cache() == tmp_path / "xdg" / "slim-edge" / "corpora"
    monkeypatch.setenv("SLIM_EDGE_CACHE", str(tmp_path / "se"))
    assert corpora.corpora_cache() == tmp_path / "se" / "corpora"


@pytest.mark.slow
def test_lee_eval_token_count_with_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from slim_edge.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    ids = tok.backend_tokenizer.encode(_get("lee", "eval").text, add_special_tokens=False).ids
    assert len(ids) == 24232  # 47 chunks of 512; llama.cpp's own tokenizer gives 24230 (two double spaces)
