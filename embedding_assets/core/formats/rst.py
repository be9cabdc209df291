"""reStructuredText: parsed by docutils (the reference implementation) into a doctree, which is walked
for sections (heading levels by nesting, as docutils assigns them from the adornment styles),
paragraphs, list items, fields (``name: body``), table rows (cells joined by `` | ``) and literal blocks.

Sphinx is not docutils: its roles (``:class:``, ``:ref:``...) and directives (``toctree``,
``versionadded``, ``function``...) are registered here with plain-text meanings, so they become their
display text or their prose instead of error messages. Nothing is read from disk or the network:
``include`` and ``raw`` are disabled, configuration files are ignored, and diagnostics are silenced
(``system_message`` nodes are skipped).
"""

from __future__ import annotations

import collections
import re

from docutils import frontend, nodes, utils
from docutils.parsers.rst import Directive, Parser, directives, roles
from docutils.parsers.rst.states import Inliner

from embedding_assets.core.formats.base import CleaningError, Parsed, RawBlock
from embedding_assets.core.formats.decode import decode_bytes

NAME = "rst"
SUFFIXES = (".rst",)
VERSION = "2"  # 2: docutils instead of regular expressions
LIMITS = "docutils reST with common Sphinx roles and directives read as text; include and raw are not followed"

_EXPLICIT_TITLE = re.compile(r"^(.*?)\s*<[^<>]*>$", re.DOTALL)

# Sphinx and common extension roles: shown as their display text.
_TEXT_ROLES = """ref doc term class func meth mod attr data exc obj const envvar option program keyword
token file samp command dfn abbr kbd menuselection guilabel mailheader mimetype newsfeed regexp makevar
manpage pep rfc download numref any eq math sub sup source issue gh bpo""".split()
_DOMAINS = ("py", "c", "cpp", "js", "std", "rst")
# Directives whose content is not prose: dropped with their body.
_SILENT_DIRECTIVES = """toctree index highlight sectionauthor moduleauthor codeauthor literalinclude
automodule autoclass autofunction automethod autoattribute autoexception autodata currentmodule module
tabularcolumns only ifconfig graphviz digraph inheritance-diagram productionlist testsetup
testcleanup include raw meta contents sectnum""".split()
# Directives whose content is prose (and whose arguments are a line of text).
_PROSE_DIRECTIVES = """versionadded versionchanged deprecated deprecated-removed seealso glossary centered
hlist note warning tip hint important caution danger attention error admonition describe object
function class method attribute data exception decorator decoratormethod staticmethod classmethod
abstractmethod property opcode cmdoption option envvar program cfunction cmember cmacro ctype cvar
macro member type var struct union enum enumerator event audit-event impl-detail availability
rst:directive rst:role""".split()


def _display_text(text: str) -> str:
    """Display text of a role's content: ``Title <target>`` -> Title, ``~a.b.c`` -> c, ``!x`` -> x."""
    text = utils.unescape(text).strip()
    explicit = _EXPLICIT_TITLE.match(text)
    if explicit and explicit.group(1):
        return explicit.group(1)
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def _text_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    return [nodes.literal(rawtext, _display_text(text))], []


class _AnyOptions(collections.defaultdict):
    """An option spec that accepts every option as an unchanged string (we read no options)."""

    def __init__(self) -> None:
        super().__init__(lambda: directives.unchanged)


class _SilentDirective(Directive):
    optional_arguments = 99
    final_argument_whitespace = True
    has_content = True
    option_spec = _AnyOptions()

    def run(self):
        return []


class _ProseDirective(Directive):
    optional_arguments = 99
    final_argument_whitespace = True
    has_content = True
    option_spec = _AnyOptions()

    def run(self):
        container = nodes.container()
        if self.arguments:
            container += nodes.paragraph(text=" ".join(self.arguments))
        if self.content:
            self.state.nested_parse(self.content, self.content_offset, container)
        return [container]


def _register() -> None:
    for name in _TEXT_ROLES:
        roles.register_local_role(name, _text_role)
        for domain in _DOMAINS:
            roles.register_local_role(f"{domain}:{name}", _text_role)
    for name in _SILENT_DIRECTIVES:
        directives.register_directive(name, _SilentDirective)
    for name in _PROSE_DIRECTIVES:
        directives.register_directive(name, _ProseDirective)
        for domain in _DOMAINS:
            directives.register_directive(f"{domain}:{name}", _ProseDirective)


# docutils' inline parser searches to the end of a paragraph for the end of every start-string, so a
# paragraph full of unclosed markup (``*a *a *a``) costs time quadratic in its length (measured:
# 160 KB, 135 s). Paragraph text is handed to it in windows of at most this many characters, cut at
# whitespace: the cost per window is bounded, so the whole is linear. Markup spanning a cut (an
# emphasized phrase across a window boundary, in paragraphs over 1,000 characters) shows its markers.
INLINE_WINDOW = 1000


class _BoundedInliner(Inliner):
    def parse(self, text, lineno, memo, parent):
        if len(text) <= INLINE_WINDOW:
            return super().parse(text, lineno, memo, parent)
        result_nodes: list = []
        messages: list = []
        start = 0
        while start < len(text):
            end = min(start + INLINE_WINDOW, len(text))
            if end < len(text):
                cut = max(text.rfind(" ", start + INLINE_WINDOW // 2, end), text.rfind("\n", start + INLINE_WINDOW // 2, end))
                end = cut + 1 if cut > start else end
            piece_nodes, piece_messages = super().parse(text[start:end], lineno, memo, parent)
            result_nodes.extend(piece_nodes)
            messages.extend(piece_messages)
            start = end
        return result_nodes, messages


# Inliner.init_customizations formats its patterns from vars(type(self)), the class's own attributes
# only: give the subclass the pattern pieces (strings) it would otherwise inherit.
for _name, _value in vars(Inliner).items():
    if isinstance(_value, str) and not _name.startswith("__"):
        setattr(_BoundedInliner, _name, _value)

_register()
_PARSER = Parser(inliner=_BoundedInliner())
def _settings():
    """Settings of one parse: quiet, never halting, never reading files (include/raw), no config files."""
    settings = frontend.get_default_settings(Parser)
    settings.report_level = 5
    settings.halt_level = 5
    settings.warning_stream = False
    settings.file_insertion_enabled = False
    settings.raw_enabled = False
    settings.doctitle_xform = False
    settings.docinfo_xform = False
    settings.sectsubtitle_xform = False
    settings.pep_references = False
    settings.rfc_references = False
    # docutils drops lines over 10,000 characters to protect its inline parser; ours is bounded
    # (INLINE_WINDOW), so long lines are kept (the per-document time budget still applies).
    settings.line_length_limit = 1 << 30
    return settings


_SKIPPED = (
    nodes.system_message, nodes.comment, nodes.target, nodes.substitution_definition, nodes.raw,
    nodes.image, nodes.pending, nodes.footnote_reference, nodes.citation_reference,
)  # fmt: skip
_INLINE_SKIPPED = (nodes.footnote_reference, nodes.citation_reference, nodes.system_message, nodes.image)


def _inline_text(node: nodes.Node) -> str:
    """Text of an element without footnote and citation markers, iteratively."""
    parts: list[str] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, nodes.Text):
            parts.append(current.astext())
        elif isinstance(current, (nodes.footnote_reference, nodes.citation_reference)):
            if parts:  # "emphasis [1]_." reads "emphasis."
                parts[-1] = parts[-1].rstrip()
        elif not isinstance(current, _INLINE_SKIPPED):
            stack.extend(reversed(current.children))
    return "".join(parts)


def _walk(document: nodes.document) -> list[RawBlock]:
    blocks: list[RawBlock] = []
    stack: list[tuple[nodes.Node, int]] = [(child, 0) for child in reversed(document.children)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, _SKIPPED):
            continue
        if isinstance(node, nodes.section):
            stack.extend((child, depth + 1) for child in reversed(node.children))
        elif isinstance(node, nodes.title) and isinstance(node.parent, nodes.section):
            blocks.append(RawBlock(_inline_text(node), level=depth))
        elif isinstance(node, (nodes.literal_block, nodes.doctest_block)):
            blocks.append(RawBlock(node.astext(), preformatted=True))
        elif isinstance(node, nodes.field):
            name = _inline_text(node[0]) if len(node) else ""
            body = " ".join(_inline_text(part) for part in node[1:])
            blocks.append(RawBlock(f"{name}: {body}".strip()))
        elif isinstance(node, nodes.row):
            blocks.append(RawBlock(" | ".join(_inline_text(entry).strip() for entry in node.children)))
        elif isinstance(node, nodes.TextElement):
            blocks.append(RawBlock(_inline_text(node)))
        elif isinstance(node, nodes.Element):
            stack.extend((child, depth) for child in reversed(node.children))
    return blocks


def parse(data: bytes) -> Parsed:
    text, warnings = decode_bytes(data)
    document = utils.new_document("<rst>", _settings())
    try:
        _PARSER.parse(text, document)
        document.transformer.populate_from_components((_PARSER,))
        document.transformer.apply_transforms()
    except RecursionError:
        raise CleaningError("reST nesting too deep to parse (more than a few hundred levels of indentation)") from None
    return Parsed(_walk(document), None, warnings)
