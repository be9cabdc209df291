"""Cleaning: decoding, typography, per-format structure, language, and the offsets invariant."""

from __future__ import annotations

import pytest

from embedding_assets.core.cleaning import (
    CLEANER_VERSION,
    SUPPORTED_SUFFIXES,
    CleanedDocument,
    CleaningError,
    clean_document,
    cleaning_fingerprint,
    decode_bytes,
    detect_language,
    normalize_typography,
)

ENGLISH = (
    "The pipeline reads raw documents, removes markup and navigation, and keeps the text "
    "that a reader would actually want to search through later on."
)
GERMAN = (
    "Die Pipeline liest die Dokumente, entfernt die Auszeichnungen und die Navigation und "
    "behält nur den Text, den ein Leser später wirklich durchsuchen möchte."
)
FRENCH = (
    "Le programme lit les documents, supprime le balisage et la navigation, et garde "
    "seulement le texte que le lecteur voudra vraiment chercher plus tard."
)


def block_texts(doc: CleanedDocument) -> list[str]:
    return [doc.text[b.start : b.end] for b in doc.blocks]


def assert_offsets_invariant(doc: CleanedDocument) -> None:
    texts = block_texts(doc)
    assert doc.text == "\n\n".join(texts)
    previous_end = -1
    for block, text in zip(doc.blocks, texts):
        assert block.start > previous_end
        previous_end = block.end
        assert text and text == text.strip()
        assert "\n\n" not in text
        assert (block.kind == "heading") == (block.level > 0)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def test_decode_plain_utf8_has_no_warnings() -> None:
    assert decode_bytes("café ünïcode".encode()) == ("café ünïcode", [])


def test_decode_utf8_bom_is_stripped() -> None:
    text, warnings = decode_bytes(b"\xef\xbb\xbfhello")
    assert text == "hello"
    assert warnings == []


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_decode_utf16_with_bom(encoding: str) -> None:
    bom = b"\xff\xfe" if encoding.endswith("le") else b"\xfe\xff"
    text, warnings = decode_bytes(bom + "Grüße aus Köln".encode(encoding))
    assert text == "Grüße aus Köln"
    assert warnings == ["decoded as UTF-16 (BOM)"]


def test_decode_utf32_le_bom_is_not_mistaken_for_utf16() -> None:
    text, warnings = decode_bytes(b"\xff\xfe\x00\x00" + "hi ✓".encode("utf-32-le"))
    assert text == "hi ✓"
    assert warnings == ["decoded as UTF-32 (BOM)"]


def test_decode_invalid_utf8_is_replaced_with_warning() -> None:
    text, warnings = decode_bytes(b"caf\xe9 au lait")
    assert text == "caf\ufffd au lait"
    assert warnings == ["invalid UTF-8 replaced"]


def test_decode_removes_nul_bytes_with_warning() -> None:
    text, warnings = decode_bytes(b"some\x00 text that is mostly fine")
    assert text == "some text that is mostly fine"
    assert warnings == ["NUL bytes removed"]


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20,
        b"\x00\x01\x02\x03abc" * 100,
    ],
)
def test_decode_binary_raises(data: bytes) -> None:
    with pytest.raises(CleaningError, match="binary content"):
        decode_bytes(data)


def test_clean_document_rejects_binary_and_unsupported_suffix() -> None:
    with pytest.raises(CleaningError, match="binary content"):
        clean_document(b"\x00\x01\x02\x03\x04" * 200, ".txt")
    with pytest.raises(CleaningError, match="unsupported suffix '.xyz'"):
        clean_document(b"hello", ".xyz")


# ---------------------------------------------------------------------------------------------
# Typography and language
# ---------------------------------------------------------------------------------------------


def test_normalize_typography() -> None:
    raw = "\u201cQuoted\u201d \u2018it\u2019s\u2019 a\u2013b\u2014c \u22123 x\u00a0y\u2009z zero\u200bwidth soft\u00adhyphen \ufb01ne"
    assert normalize_typography(raw) == "\"Quoted\" 'it's' a-b-c -3 x y z zerowidth softhyphen fine"


def test_normalize_typography_collapses_spaces_but_keeps_lines() -> None:
    assert normalize_typography("a \t  b\r\nc\rd\u2028e   \n") == "a b\nc\nd\ne \n"


def test_normalize_typography_removes_control_characters() -> None:
    assert normalize_typography("bell\x07 and\x1b escape") == "bell and escape"


@pytest.mark.parametrize(("text", "language"), [(ENGLISH, "en"), (GERMAN, "de"), (FRENCH, "fr")])
def test_detect_language(text: str, language: str) -> None:
    assert detect_language(text) == language
    assert clean_document(text.encode(), ".txt").language == language


def test_detect_language_unknown_for_short_or_letterless_text() -> None:
    assert detect_language("ok") == "unknown"
    assert detect_language("12345 67890 !!! ??? 3.14159 2.71828 1.41421") == "unknown"


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

PAGE = b"""<!DOCTYPE html>
<html><head><title>  Widget   Guide </title>
<style>body { color: red }</style><script>var tracking = "SCRIPT_TEXT";</script></head>
<body>
<header>HEADER_TEXT</header>
<nav><a href="/">NAV_TEXT</a></nav>
<div role="navigation">ROLE_NAV_TEXT</div>
<span aria-hidden="true">HIDDEN_TEXT</span>
<h1>Widgets</h1>
<p>Widgets are <em>small</em> parts that <a href="/x">fit together</a>.</p>
<div>Loose <b>div</b> text<p>Nested paragraph.</p>tail text</div>
<h2>Install</h2>
<ul><li>Download the widget.</li><li>Run <code>widget --install</code>.</li></ul>
<pre>def widget():
    return 42


print(widget())</pre>
<h3>Options</h3>
<table><tr><th>Name</th><th>Default</th></tr><tr><td>size</td><td><p>3</p></td></tr></table>
<h2>Usage</h2>
<p>Use it<br>well.</p>
<noscript>NOSCRIPT_TEXT</noscript><form>FORM_TEXT</form><aside>ASIDE_TEXT</aside>
<footer>FOOTER_TEXT</footer>
<!-- COMMENT_TEXT -->
</body></html>"""


def test_html_drops_boilerplate_and_keeps_structure() -> None:
    doc = clean_document(PAGE, ".HTML")
    assert_offsets_invariant(doc)
    for marker in ("SCRIPT", "HEADER", "NAV_TEXT", "HIDDEN", "NOSCRIPT", "FORM", "ASIDE", "FOOTER", "COMMENT", "color"):
        assert marker not in doc.text
    assert doc.title == "Widget Guide"
    assert doc.language == "en"
    assert block_texts(doc) == [
        "Widgets",
        "Widgets are small parts that fit together.",
        "Loose div text",
        "Nested paragraph.",
        "tail text",
        "Install",
        "Download the widget.",
        "Run widget --install.",
        "def widget():\nreturn 42\nprint(widget())",
        "Options",
        "Name | Default",
        "size | 3",
        "Usage",
        "Use it well.",
    ]
    kinds = {doc.text[b.start : b.end]: (b.kind, b.level, b.heading_path) for b in doc.blocks}
    assert kinds["Widgets"] == ("heading", 1, ())
    assert kinds["Install"] == ("heading", 2, ("Widgets",))
    assert kinds["Options"] == ("heading", 3, ("Widgets", "Install"))
    assert kinds["size | 3"] == ("text", 0, ("Widgets", "Install", "Options"))
    # A new h2 closes the h3 and the previous h2.
    assert kinds["Use it well."] == ("text", 0, ("Widgets", "Usage"))


SPHINX_PAGE = """<html><head><title>json — JSON encoder and decoder — Python 3.13 documentation</title></head>
<body>
<div class="related" role="navigation"><ul><li><a href="index.html">RELATED_NAV</a></li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper">
<div class="body" role="main">
<section id="module-json">
<h1><code>json</code> — JSON encoder and decoder<a class="headerlink" href="#module-json" title="Link">¶</a></h1>
<p><strong>Source code:</strong> <a href="x">Lib/json/__init__.py</a></p>
<section id="basic-usage"><h2>Basic Usage<a class="headerlink" href="#basic-usage">¶</a></h2>
<dl class="py function"><dt class="sig"><span class="sig-name">json.dump</span>(obj, fp)</dt>
<dd><p>Serialize obj as a JSON formatted stream to fp.</p></dd></dl>
</section></section>
</div></div></div>
<div class="sphinxsidebar" role="navigation"><h3>SIDEBAR_TOC</h3></div></div>
<div class="footer">© Copyright FOOTER_DIV.</div>
</body></html>"""


def test_sphinx_page_yields_only_main_content() -> None:
    doc = clean_document(SPHINX_PAGE.encode(), ".html")
    assert_offsets_invariant(doc)
    for marker in ("RELATED_NAV", "SIDEBAR_TOC", "FOOTER_DIV", "¶"):
        assert marker not in doc.text
    assert block_texts(doc) == [
        "json - JSON encoder and decoder",
        "Source code: Lib/json/__init__.py",
        "Basic Usage",
        "json.dump(obj, fp)",
        "Serialize obj as a JSON formatted stream to fp.",
    ]
    assert doc.blocks[-1].heading_path == ("json - JSON encoder and decoder", "Basic Usage")
    assert doc.title == "json - JSON encoder and decoder - Python 3.13 documentation"


def test_main_element_is_preferred_over_page_chrome() -> None:
    page = b"<body><div>CHROME</div><main><h1>Real</h1><p>Content here.</p></main><div>MORE_CHROME</div></body>"
    doc = clean_document(page, ".htm")
    assert block_texts(doc) == ["Real", "Content here."]
    assert doc.title == "Real"


def test_article_header_is_kept_but_site_header_dropped() -> None:
    page = b"<body><header>SITE_HEADER</header><article><header><h1>Post</h1></header><p>Body text.</p></article></body>"
    doc = clean_document(page, ".html")
    assert block_texts(doc) == ["Post", "Body text."]


def test_deeply_nested_html_does_not_recurse() -> None:
    page = "<html><body>" + "<div>" * 5000 + "deep text" + "</div>" * 5000 + "<p>after</p></body></html>"
    doc = clean_document(page.encode(), ".html")
    assert block_texts(doc) == ["deep text", "after"]


@pytest.mark.parametrize(
    "page",
    [b"", b"<html><body><script>only()</script><nav>menu</nav></body></html>", b"<p>   \n </p>"],
)
def test_html_without_text_raises(page: bytes) -> None:
    with pytest.raises(CleaningError, match="no text after cleaning"):
        clean_document(page, ".html")


def test_html_declared_charset_is_honoured_for_non_utf8_bytes() -> None:
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>Café crème</p></body></html>'.encode("latin-1")
    doc = clean_document(page, ".html")
    assert block_texts(doc) == ["Café crème"]
    assert doc.warnings == ("decoded as declared iso-8859-1",)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

MARKDOWN = """---
title: Front Matter Title
tags: [a, b]
---
# Getting Started

Some *emphasis*, **strong**, `inline_code()` and a [link](https://example.com "t") ![badge](b.svg).
A second line of the same paragraph with snake_case_name and <b>html</b> &amp; an escaped \\*star\\*.

Setext Section
--------------

- first item
* [x] second item
1. numbered item

| Name | Value |
|------|:-----:|
| `a`  | 1     |

```python
def f():

    return "# not a heading"
```

<!-- a comment
spanning lines -->
> Quoted text.

[ref]: https://example.com
***
Final words.
"""


def test_markdown_structure_and_inline_markup() -> None:
    doc = clean_document(MARKDOWN.encode(), ".md")
    assert_offsets_invariant(doc)
    assert doc.title == "Front Matter Title"
    assert block_texts(doc) == [
        "Getting Started",
        "Some emphasis, strong, inline_code() and a link . A second line of the same paragraph "
        "with snake_case_name and html & an escaped *star*.",
        "Setext Section",
        "first item",
        "second item",
        "numbered item",
        "Name | Value",
        "a | 1",
        'def f():\nreturn "# not a heading"',
        "Quoted text.",
        "Final words.",
    ]
    headings = [(b.level, doc.text[b.start : b.end]) for b in doc.blocks if b.kind == "heading"]
    assert headings == [(1, "Getting Started"), (2, "Setext Section")]
    assert doc.blocks[-1].heading_path == ("Getting Started", "Setext Section")


def test_markdown_title_falls_back_to_first_h1() -> None:
    doc = clean_document(b"## Intro\n\ntext\n\n# Main Title\n\nmore text", ".markdown")
    assert doc.title == "Main Title"


# ---------------------------------------------------------------------------------------------
# reStructuredText
# ---------------------------------------------------------------------------------------------

RST = """=========
 Widgets
=========

Widgets are described by :class:`~widgets.core.Widget` and :ref:`the guide <guide>`,
with ``literal text`` and a `website <https://example.com>`_ plus *emphasis* [1]_.

Installation
============

.. note::
   Install it with pip.

.. toctree::
   :maxdepth: 2

   TOCTREE_ENTRY

Run this::

    pip install widgets
    widgets --check

Details
-------

* First bullet.
* Second bullet.

.. _hidden-target:

.. This is a COMMENT_TEXT.

Usage
=====

:param size: the widget size.
"""


def test_rst_sections_directives_and_roles() -> None:
    doc = clean_document(RST.encode(), ".rst")
    assert_offsets_invariant(doc)
    assert "TOCTREE_ENTRY" not in doc.text and "COMMENT_TEXT" not in doc.text and "maxdepth" not in doc.text
    assert doc.title == "Widgets"
    assert block_texts(doc) == [
        "Widgets",
        "Widgets are described by Widget and the guide, with literal text and a website plus emphasis.",
        "Installation",
        "Install it with pip.",
        "Run this:",
        "pip install widgets\nwidgets --check",
        "Details",
        "First bullet.",
        "Second bullet.",
        "Usage",
        "param size: the widget size.",
    ]
    levels = {doc.text[b.start : b.end]: b.level for b in doc.blocks if b.kind == "heading"}
    # Levels follow the order in which adornment styles first appear.
    assert levels == {"Widgets": 1, "Installation": 2, "Details": 3, "Usage": 2}
    assert doc.blocks[-1].heading_path == ("Widgets", "Usage")


# ---------------------------------------------------------------------------------------------
# Plain text and invariants
# ---------------------------------------------------------------------------------------------


def test_text_paragraphs_split_by_blank_lines() -> None:
    doc = clean_document(b"First  paragraph\nstill first.\n\n \t\nSecond\tparagraph.\r\n\r\nThird.", ".txt")
    assert_offsets_invariant(doc)
    assert block_texts(doc) == ["First paragraph still first.", "Second paragraph.", "Third."]
    assert all(b.kind == "text" and b.heading_path == () for b in doc.blocks)
    assert doc.title is None


def test_text_with_only_whitespace_raises() -> None:
    with pytest.raises(CleaningError, match="no text after cleaning"):
        clean_document(" \n\n\t \u200b\u00ad".encode(), ".txt")


def test_warnings_are_carried_into_the_document() -> None:
    doc = clean_document(b"\xff\xfe" + "Hello\x00 there".encode("utf-16-le"), ".txt")
    assert doc.text == "Hello there"
    assert doc.warnings == ("decoded as UTF-16 (BOM)", "NUL bytes removed")


@pytest.mark.parametrize("suffix", sorted(SUPPORTED_SUFFIXES))
def test_offsets_invariant_for_every_format(suffix: str) -> None:
    from tests.test_formats import lab_handbook_docx, shore_guide_pdf

    samples = {".md": MARKDOWN, ".markdown": MARKDOWN, ".rst": RST, ".txt": ENGLISH + "\n\n" + GERMAN}
    binary = {".pdf": shore_guide_pdf, ".docx": lab_handbook_docx}
    data = binary[suffix]() if suffix in binary else samples.get(suffix, PAGE.decode()).encode()
    doc = clean_document(data, suffix)
    assert_offsets_invariant(doc)
    assert clean_document(data, suffix) == doc  # deterministic


def test_cleaning_fingerprint_is_stable_and_versioned() -> None:
    assert cleaning_fingerprint(".md") == cleaning_fingerprint(".MD") == cleaning_fingerprint(".markdown")
    assert cleaning_fingerprint(".md").startswith("cleaner-")
    assert CLEANER_VERSION == "2"
