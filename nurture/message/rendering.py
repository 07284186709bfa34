"""Email templates: sandboxed Jinja2 rendering to subject, HTML and text; lint; sample data.

A template is one file, ``<root>/<name>.html.j2``, that defines ``{% block subject %}``,
extends a layout for the HTML body (``{% block body %}``) and may define
``{% block text %}`` for the plain-text body. ``layouts/`` and ``partials/`` hold the
shared pieces and are not sendable on their own.

Everything a lead typed is escaped in the HTML, because the environment autoescapes and
runs in Jinja2's immutable sandbox with ``StrictUndefined``. The subject and the text
body are plain text, so their autoescaped output is unescaped back (a literal ``&amp;``
in a subject block therefore becomes ``&``).

Lint rules (:meth:`TemplateStore.lint`), each naming the file and line it can:

- error: syntax errors, unknown templates, undefined variables and sandbox violations
  when rendered against :func:`sample_context`, any other render failure;
- error: no ``{% block subject %}`` in the email's own file, an empty subject, or one
  longer than 78 characters (RFC 5322's recommended line length);
- warning: a subject longer than 60 characters (cut off on most phones);
- error: an HTML body or an explicit text block without the ``unsubscribe_url`` value
  (CAN-SPAM and RFC 8058 need a working opt-out in every message);
- warning: a layout that drops ``open_pixel_url``, and placeholder links (``href="#"``).
- warning: a link that will not be tracked, because its URL (with the sample lead) is not
  one the templates wrote (see :class:`TemplateUrls`).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from markupsafe import escape

SUFFIX = ".html.j2"
#: Top-level folders that hold shared pieces rather than sendable emails.
SHARED_DIRS = frozenset({"layouts", "partials"})
SUBJECT_MAX = 78
SUBJECT_WARN = 60

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class RenderedEmail:
    """One rendered email: a single-line subject, the HTML body and the plain-text body."""

    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class LintProblem:
    """One problem found by :meth:`TemplateStore.lint`."""

    file: str
    line: int | None
    message: str
    severity: Severity

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.severity}: {self.message}"


class RenderError(Exception):
    """A template failed to render (undefined variable, sandbox violation, bad syntax...).

    Attributes:
        template: The template name, e.g. ``b2b/welcome``.
        file: The file where it failed (may be a layout or partial), when known.
        line: The line in ``file``, when known.
        reason: What went wrong.
    """

    def __init__(self, template: str, reason: str, file: str | None, line: int | None) -> None:
        where = f" ({file}:{line})" if file and line else (f" ({file})" if file else "")
        super().__init__(f"template {template!r}{where}: {reason}")
        self.template = template
        self.reason = reason
        self.file = file
        self.line = line


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, Undefined)
        or (isinstance(value, str) and not value.strip())
    )


def _default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """Jinja's ``default``, but ``None`` and blank strings count as missing too.

    A lead row with ``first_name = NULL`` must give "Hi there," and never "Hi None,"
    or "Hi ,", so the usual ``{{ lead.first_name | default("there") }}`` just works.
    """
    if _is_missing(value) or (boolean and not value):
        return default_value
    return value


def _finalize(value: Any) -> Any:
    # An optional field printed without a default shows nothing rather than "None".
    return "" if value is None else value


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Environment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with a fast path for ``mapping.key`` on plain dicts.

    Jinja tries ``getattr(obj, key)`` first and falls back to ``obj[key]`` after an
    ``AttributeError``; for ``lead.first_name`` and friends that exception was the
    largest cost of a render. The result is the same: dict methods still win.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


class TemplateStore:
    """The email templates under one folder, compiled once and rendered many times.

    Args:
        root: The templates folder (``settings.templates``).
        link_rewriter: When set, every ``href`` of ``<a>``/``<area>`` in the HTML body
            (and every http(s) URL in an explicit text block) that the templates
            themselves wrote (see :class:`TemplateUrls`) is replaced by
            ``link_rewriter(url)``. The unsubscribe link, ``mailto:``, ``tel:``, ``#``
            anchors and every URL that came from lead data are left alone. The tracking
            service passes a URL signer here.
    """

    def __init__(self, root: Path, *, link_rewriter: Callable[[str], str] | None = None) -> None:
        self.root = Path(root)
        self.link_rewriter = link_rewriter
        self.env = _Environment(
            loader=FileSystemLoader(str(self.root)),
            autoescape=True,
            undefined=StrictUndefined,
            finalize=_finalize,
            # Templates are deployed with the code; skipping the mtime check on every
            # lookup matters when one tick renders thousands of emails.
            auto_reload=False,
            cache_size=1000,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )
        self.env.filters["default"] = _default
        self.env.filters["d"] = _default
        self._compiled: dict[str, Template] = {}
        self._urls: TemplateUrls | None = None

    @property
    def urls(self) -> TemplateUrls:
        """The URL literals written in the store's template files (read once, then cached).

        Raises:
            RenderError: a template file does not tokenize (a syntax error).
        """
        if self._urls is None:
            literals: list[str] = []
            for filename in self._all_files():
                source = (self.root / filename).read_text(encoding="utf-8")
                try:
                    literals.extend(template_url_literals(self.env, source, filename))
                except TemplateSyntaxError as exc:
                    reason = exc.message or str(exc)
                    raise RenderError(filename, reason, filename, exc.lineno) from exc
            self._urls = TemplateUrls(literals)
        return self._urls

    # -- discovery ---------------------------------------------------------------------

    def _filename(self, name: str) -> str:
        if name.endswith(SUFFIX):
            name = name[: -len(SUFFIX)]
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise ValueError(f"invalid template name {name!r}")
        return name + SUFFIX

    def exists(self, name: str) -> bool:
        """Whether ``name`` (e.g. ``b2b/welcome``) is a sendable template."""
        try:
            filename = self._filename(name)
        except ValueError:
            return False
        return filename.split("/")[0] not in SHARED_DIRS and (self.root / filename).is_file()

    def names(self) -> list[str]:
        """Every sendable template name, sorted (layouts and partials excluded)."""
        found = []
        for path in self.root.rglob("*" + SUFFIX):
            rel = path.relative_to(self.root).as_posix()
            if rel.split("/")[0] in SHARED_DIRS or not path.is_file():
                continue
            found.append(rel[: -len(SUFFIX)])
        return sorted(found)

    def _all_files(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*" + SUFFIX)
            if p.is_file()
        )

    def template(self, name: str) -> Template:
        """The compiled template for ``name`` (cached for the life of the store).

        Raises:
            RenderError: the template does not exist or does not compile.
        """
        compiled = self._compiled.get(name)
        if compiled is not None:
            return compiled
        filename = self._filename(name)
        if filename.split("/")[0] in SHARED_DIRS:
            raise RenderError(name, "layouts and partials cannot be sent", None, None)
        try:
            compiled = self.env.get_template(filename)
        except TemplateSyntaxError as exc:
            raise RenderError(name, exc.message or str(exc), exc.filename, exc.lineno) from exc
        except TemplateNotFound as exc:
            raise RenderError(name, f"no template {exc.name!r}", None, None) from exc
        self._compiled[name] = compiled
        return compiled

    # -- rendering ---------------------------------------------------------------------

    def render(
        self,
        name: str,
        context: Mapping[str, Any],
        *,
        link_rewriter: Callable[[str], str] | None = None,
    ) -> RenderedEmail:
        """Render ``name`` with ``context`` into a subject, an HTML body and a text body.

        Args:
            name: The template name, e.g. ``b2b/welcome``.
            context: The variables, usually from :func:`lead_context`.
            link_rewriter: Overrides the store's rewriter for this render; tracking
                tokens are bound to one delivery, so the send path passes one per lead.

        Raises:
            RenderError: unknown template, syntax error, undefined variable, sandbox
                violation or any other failure, with the file and line when known.
        """
        template = self.template(name)
        try:
            return self._render(template, context, link_rewriter or self.link_rewriter)
        except Exception as exc:  # one lead's bad data must fail that delivery, not the batch
            file, line = _template_frame(exc.__traceback__, self.root)
            if isinstance(exc, TemplateSyntaxError) and exc.lineno:
                file, line = exc.filename, exc.lineno
            raise RenderError(name, _describe(exc), file, line) from exc

    def _render(
        self,
        template: Template,
        context: Mapping[str, Any],
        rewriter: Callable[[str], str] | None = None,
    ) -> RenderedEmail:
        ctx = template.new_context(dict(context))
        body = "".join(template.root_render_func(ctx))
        # After the render, ctx.blocks holds every block of the inheritance chain with
        # the most derived one first, so a subject defined in a layout works too.
        subject_blocks = ctx.blocks.get("subject")
        subject = ""
        if subject_blocks:
            subject = clean_subject(unescape_markup("".join(subject_blocks[0](ctx))))
        unsubscribe = _unsubscribe_value(context)
        text_blocks = ctx.blocks.get("text")
        urls = self.urls if rewriter is not None else None
        if rewriter is not None:
            body = rewrite_links(body, rewriter, keep=unsubscribe, tracked=urls)
        if text_blocks:
            text = unescape_markup("".join(text_blocks[0](ctx)))
            if rewriter is not None:
                text = _rewrite_text_urls(text, rewriter, keep=unsubscribe, tracked=urls)
            text = _tidy_text(text, keep_indent=True)
        else:
            text = html_to_text(body)
        return RenderedEmail(subject=subject, html=body, text=text)

    # -- lint --------------------------------------------------------------------------

    def lint(self, name: str | None = None) -> list[LintProblem]:
        """Check one template, or every template (and every layout and partial) when None.

        Returns:
            The problems found, errors and warnings, without duplicates.
        """
        problems: list[LintProblem] = []
        if name is None:
            names = self.names()
            # Syntax errors in a layout or partial that no email uses yet still count.
            for filename in self._all_files():
                try:
                    self.env.get_template(filename)
                except TemplateSyntaxError as exc:
                    problems.append(self._syntax_problem(exc, filename))
        else:
            names = [name]
        for one in names:
            problems.extend(self._lint_one(one))
        unique: dict[tuple[str, int | None, str], LintProblem] = {}
        for problem in problems:
            unique.setdefault((problem.file, problem.line, problem.message), problem)
        return list(unique.values())

    def _display(self, filename: str | None) -> str:
        if not filename:
            return str(self.root)
        path = Path(filename)
        if not path.is_absolute():
            path = self.root / filename if not path.exists() else path
        try:
            return os.path.relpath(path)
        except ValueError:  # another drive on Windows
            return str(path)

    def _syntax_problem(self, exc: TemplateSyntaxError, fallback: str) -> LintProblem:
        file = self._display(exc.filename or str(self.root / fallback))
        return LintProblem(file, exc.lineno, f"syntax error: {exc.message}", "error")

    def _lint_one(self, name: str) -> Iterator[LintProblem]:
        try:
            filename = self._filename(name)
        except ValueError as exc:
            yield LintProblem(name, None, str(exc), "error")
            return
        path = self.root / filename
        shown = self._display(str(path))
        if not self.exists(name):
            yield LintProblem(shown, None, f"no template {name!r} under {self.root}", "error")
            return
        try:
            template = self.env.get_template(filename)
        except TemplateSyntaxError as exc:
            yield self._syntax_problem(exc, filename)
            return
        source = path.read_text(encoding="utf-8")
        if "subject" not in template.blocks:
            # Checked before rendering: a layout's {{ self.subject() }} would otherwise
            # fail first and blame the layout.
            yield LintProblem(shown, 1, "no {% block subject %}", "error")
            return
        context = sample_context()
        pixel = "https://track.example.com/o/lint-pixel.gif"
        context["open_pixel_url"] = pixel
        try:
            email = self._render(template, context)
        except (TemplateError, SecurityError) as exc:
            file, line = _template_frame(exc.__traceback__, self.root)
            if isinstance(exc, TemplateSyntaxError):
                file, line = exc.filename, exc.lineno
            yield LintProblem(self._display(file or str(path)), line, _describe(exc), "error")
            return
        except Exception as exc:  # a filter or method blew up: still the template's fault
            file, line = _template_frame(exc.__traceback__, self.root)
            message = f"render failed: {type(exc).__name__}: {exc}"
            yield LintProblem(self._display(file or str(path)), line, message, "error")
            return

        subject_line = _block_line(source, "subject")
        if not email.subject:
            yield LintProblem(shown, subject_line, "the subject is empty", "error")
        elif len(email.subject) > SUBJECT_MAX:
            yield LintProblem(
                shown,
                subject_line,
                f"the subject is {len(email.subject)} characters with the sample lead; "
                f"keep it under {SUBJECT_MAX}",
                "error",
            )
        elif len(email.subject) > SUBJECT_WARN:
            yield LintProblem(
                shown,
                subject_line,
                f"the subject is {len(email.subject)} characters with the sample lead; "
                f"phones cut it after about {SUBJECT_WARN}",
                "warning",
            )

        unsubscribe = context["unsubscribe_url"]
        if unsubscribe not in email.html and str(escape(unsubscribe)) not in email.html:
            yield LintProblem(
                shown,
                _block_line(source, "body") or 1,
                "no unsubscribe link: the HTML body must contain {{ unsubscribe_url }} "
                '(include "partials/footer.html.j2")',
                "error",
            )
        if "text" in template.blocks and unsubscribe not in email.text:
            yield LintProblem(
                shown,
                _block_line(source, "text"),
                "no unsubscribe link in the text block: add {{ unsubscribe_url }}",
                "error",
            )
        if pixel not in email.html:
            yield LintProblem(
                shown,
                1,
                "the layout never shows open_pixel_url, so opens cannot be tracked",
                "warning",
            )
        for match in _PLACEHOLDER_HREF.finditer(source):
            line = source.count("\n", 0, match.start()) + 1
            yield LintProblem(shown, line, "placeholder link (href is empty or '#')", "warning")
        untracked: list[str] = []

        def note(url: str) -> str:
            if url not in self.urls and url not in untracked:
                untracked.append(url)
            return url

        rewrite_links(email.html, note, keep=unsubscribe)
        for url in untracked:
            yield LintProblem(
                shown,
                None,
                f"link {url!r} will not be tracked: only URLs written in the templates are "
                "(one built from a variable could come from lead data)",
                "warning",
            )


# -- lint helpers --------------------------------------------------------------------------

_PLACEHOLDER_HREF = re.compile(r"""\shref\s*=\s*(?:"#?"|'#?')""", re.IGNORECASE)


def _block_line(source: str, block: str) -> int | None:
    match = re.search(r"{%-?\s*block\s+" + re.escape(block) + r"\b", source)
    return source.count("\n", 0, match.start()) + 1 if match else None


def _template_frame(tb: TracebackType | None, root: Path) -> tuple[str | None, int | None]:
    """The innermost traceback frame that runs a template file under ``root``.

    Jinja2 compiles a template to a Python module whose code objects carry the template's
    filename; the module's globals hold the :class:`~jinja2.Template`, which maps the
    Python line back to the template line.
    """
    root_str = os.path.abspath(root)
    found: tuple[str | None, int | None] = (None, None)
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(SUFFIX) and os.path.abspath(filename).startswith(root_str):
            template = tb.tb_frame.f_globals.get("__jinja_template__")
            line = tb.tb_lineno
            if isinstance(template, Template):
                line = template.get_corresponding_lineno(line)
            found = (filename, line)
        tb = tb.tb_next
    return found


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SecurityError):
        return f"sandbox violation: {exc}"
    if isinstance(exc, UndefinedError):
        return f"undefined variable: {exc.message}"
    if isinstance(exc, TemplateSyntaxError):
        return f"syntax error: {exc.message}"
    if isinstance(exc, TemplateNotFound):
        return f"no template {exc.name!r}"
    return f"{type(exc).__name__}: {exc}"


# -- subjects, links and text ---------------------------------------------------------------


def unescape_markup(value: str) -> str:
    """Undo exactly what autoescape did: the five entities ``markupsafe.escape`` writes.

    ``html.unescape`` would also decode legacy entities without a semicolon, turning a
    literal ``?a=1&param=2`` into ``?a=1¶m=2``.
    """
    if "&" not in value:
        return value
    return (
        value.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&#34;", '"')
        .replace("&amp;", "&")
    )


_CHARREF = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def _unescape_attr(value: str) -> str:
    # Browsers leave "&param=" alone inside attributes; only decode terminated references.
    if "&" not in value:
        return value
    return _CHARREF.sub(lambda m: html.unescape(m.group(0)), value)


# Control characters other than TAB, CR and LF (those are refused or folded), DEL, C1
# controls, and the bidi embeddings/overrides (U+202A-202E) and isolates (U+2066-2069).
_INVISIBLE = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def strip_controls(value: str) -> str:
    """``value`` without control characters other than TAB, CR, LF and NUL (which the
    MIME layer refuses rather than hides), and without the bidi embeddings, overrides and
    isolates (U+202A-202E, U+2066-2069) that make text read differently from what it is."""
    return _INVISIBLE.sub("", value) if _INVISIBLE.search(value) else value


def clean_subject(subject: str) -> str:
    """Strip a subject and collapse all whitespace, CR and LF included, to single spaces.

    A subject is a header: a line break in it would end the header, so it never
    survives rendering. ESC, DEL, C1 controls, NUL and bidi overrides or isolates (from
    lead values) are dropped: they have no place in a header line.
    """
    return " ".join(strip_controls(subject).replace("\x00", "").split())


def _unsubscribe_value(context: Mapping[str, Any]) -> str | None:
    value = context.get("unsubscribe_url")
    return value if isinstance(value, str) and value else None


# A start tag that can carry a followed link, its attributes in group 1; quoted values
# may contain '>'. Unrolled ([^>"']* between quoted values) so long inline styles are
# scanned in one step instead of one alternation per character.
_LINK_TAG = re.compile(
    r"""<(?:a|area|v:roundrect)\b([^>"']*(?:(?:"[^"]*"|'[^']*')[^>"']*)*)>""", re.IGNORECASE
)
_TEXT_URL = re.compile(r"""https?://[^\s<>"'\]\[]+""")
_URL_TRAILING = ".,;:!?)"
_SKIP_SCHEMES = ("mailto:", "tel:", "sms:", "#", "javascript:", "data:")


def _should_rewrite(url: str, keep: str | None) -> bool:
    stripped = url.strip()
    if not stripped or stripped.lower().startswith(_SKIP_SCHEMES):
        return False
    if keep is not None and stripped == keep:
        return False
    return stripped.lower().startswith(("http://", "https://"))


def rewrite_links(
    body: str,
    rewriter: Callable[[str], str],
    *,
    keep: str | None = None,
    tracked: Container[str] | None = None,
) -> str:
    """Pass the ``href`` of every ``<a>``/``<area>`` in ``body`` through ``rewriter``.

    Only a tag's first ``href`` counts, as in browsers; ``data-href=`` or ``href=`` inside
    another attribute's quoted value never does.

    Args:
        body: Rendered HTML.
        rewriter: Maps a URL to its replacement (for example a signed tracking URL).
        keep: A URL to leave alone: the unsubscribe link.
        tracked: When given, only the URLs it contains are rewritten (the store passes
            its :class:`TemplateUrls`, so a URL from lead data is never signed). None
            rewrites every http(s) link.

    Returns:
        The HTML with the links replaced and the new values attribute-escaped.
    """
    href_lookup = _ATTR_LOOKUP["href"]

    def one_tag(tag: re.Match[str]) -> str:
        href = href_lookup.match(tag.group(1))
        if href is None:
            return tag.group(0)
        raw = href.group(1)
        url = _unescape_attr(raw[1:-1] if raw[:1] in ('"', "'") else raw)
        if not _should_rewrite(url, keep) or (tracked is not None and url.strip() not in tracked):
            return tag.group(0)
        whole = tag.group(0)
        offset = tag.start(1) - tag.start(0)
        start, end = offset + href.start(1), offset + href.end(1)
        value = html.escape(rewriter(url.strip()), quote=True)
        return f'{whole[:start]}"{value}"{whole[end:]}'

    return _LINK_TAG.sub(one_tag, body)


def _rewrite_text_urls(
    text: str,
    rewriter: Callable[[str], str],
    *,
    keep: str | None,
    tracked: Container[str] | None = None,
) -> str:
    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        # Sentence punctuation right after a URL is not part of it.
        trimmed = url.rstrip(_URL_TRAILING)
        tail = url[len(trimmed) :]
        if not _should_rewrite(trimmed, keep) or (tracked is not None and trimmed not in tracked):
            return url
        return rewriter(trimmed) + tail

    return _TEXT_URL.sub(one, text)


# -- which URLs the templates wrote ---------------------------------------------------------

# A URL literal in template text: the scheme is matched case-insensitively, and a literal
# ends where the text token ends (at a Jinja delimiter) or at whitespace, a quote or "<>[]".
_LITERAL_URL = re.compile(r"""https?://[^\s<>"'\]\[]+""", re.IGNORECASE)
# "scheme://authority": everything up to the first "/", "?" or "#" after "://".
_ORIGIN = re.compile(r"[^/?#]*://[^/?#]*")
_AUTHORITY_END = frozenset("/?#")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def template_url_literals(env: Any, source: str, filename: str | None = None) -> list[str]:
    """Every http(s) URL written in one template source, in static text or a string constant.

    The source is tokenized with the environment's own lexer, so ``{{ ... }}``, ``{% ... %}``
    and comments are cut out exactly as Jinja does: a URL in static text ends at the next
    delimiter (``href="https://shop.example.com/c/{{ slug }}"`` gives
    ``https://shop.example.com/c/``), and a URL inside a comment is not a literal.

    Raises:
        TemplateSyntaxError: the source does not tokenize.
    """
    found: list[str] = []
    for token in env.lexer.tokenize(source, None, filename):
        if token.type in ("data", "string") and "://" in token.value:
            found.extend(_LITERAL_URL.findall(token.value))
    return found


def _origin(url: str) -> str:
    match = _ORIGIN.match(url)
    return match.group(0) if match else url


class TemplateUrls:
    """The URLs the templates of one store wrote: the only ones that become tracked links.

    A rendered URL ``R`` is tracked when it equals a literal ``L`` found by
    :func:`template_url_literals` (in its raw, HTML-unescaped or punctuation-trimmed
    form), or when it starts with ``L`` and the authority (host and port) is already
    closed: ``L`` has a ``/``, ``?`` or ``#`` after ``scheme://``, or the character of
    ``R`` right after ``L`` is one of them. So a template may append a campaign name or a
    category slug from lead data to a link it wrote, but no value can change the host a
    tracked link leads to; a URL that arrives whole in lead data is never signed.

    Args:
        literals: The URL literals of every template file of the store.
    """

    __slots__ = ("_decided", "_exact", "_prefixes")

    #: Prefix decisions remembered: a campaign-suffixed link is the same for every lead of
    #: a step, so a tick decides it once. Bounded, because lead data can vary the rest.
    CACHE_SIZE = 4096

    def __init__(self, literals: Iterable[str]) -> None:
        exact: set[str] = set()
        for literal in literals:
            unescaped = _unescape_attr(literal)
            for form in (literal, unescaped, unescape_markup(literal)):
                exact.add(form)
                exact.add(form.rstrip(_URL_TRAILING))
        exact.discard("")
        prefixes: dict[str, list[tuple[str, bool]]] = {}
        for form in exact:
            origin = _origin(form)
            closed = len(origin) < len(form)
            prefixes.setdefault(origin, []).append((form, closed))
        self._exact = frozenset(exact)
        self._decided: dict[str, bool] = {}
        # Longest first, so the most specific literal is tried first.
        self._prefixes = {
            origin: tuple(sorted(forms, key=lambda f: -len(f[0])))
            for origin, forms in prefixes.items()
        }

    def __contains__(self, url: object) -> bool:
        if not isinstance(url, str):
            return False
        if url in self._exact:  # the common case: one set lookup per link
            return True
        decided = self._decided.get(url)
        if decided is None:
            decided = self._prefix_match(url)
            if len(self._decided) < self.CACHE_SIZE:
                self._decided[url] = decided
        return decided

    def _prefix_match(self, url: str) -> bool:
        candidates = self._prefixes.get(_origin(url))
        if not candidates or _CONTROL_CHAR.search(url):
            return False
        for literal, closed in candidates:
            if url.startswith(literal) and (closed or url[len(literal)] in _AUTHORITY_END):
                return True
        return False

    def __len__(self) -> int:
        return len(self._exact)

    def hosts(self) -> frozenset[str]:
        """The lowercased hosts of the literals: every host a tracked link can lead to."""
        found = set()
        for form in self._exact:
            host = _host(form)
            if host:
                found.add(host)
        return frozenset(found)


def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


_BLOCK_TAGS = frozenset(
    {"div", "table", "tr", "td", "th", "section", "header", "footer", "center", "article"}
)
_PARAGRAPH_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "blockquote", "pre"}
)
_HIDDEN_TAGS = frozenset({"style", "script", "head", "title", "template", "noscript"})
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|mso-hide\s*:\s*all", re.IGNORECASE)
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
# Comments, doctypes and processing instructions, or a start/end tag with its attributes.
# The leading literal "<" lets the regex engine jump from tag to tag instead of trying
# every alternative at every character.
_TOKEN = re.compile(
    r"""<(?:!--.*?(?:-->|\Z)|![^>]*>|\?[^>]*>"""
    r"""|(/?)([A-Za-z][A-Za-z0-9:-]*)([^>"']*(?:(?:"[^"]*"|'[^']*')[^>"']*)*)>)""",
    re.DOTALL,
)
_END_ACTIONS = _BLOCK_TAGS | _PARAGRAPH_TAGS | {"a"}
_SPACES = re.compile(r"[ \t\r\n\f\v]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


_VALUE = r"""("[^"]*"|'[^']*'|[^\s"'=<>`]+)"""
# Skip whole attributes (whitespace-separated, values consumed) until the wanted one, so
# "data-href=" or a quoted value that contains "href=" never matches.
_ATTR_LOOKUP = {
    name: re.compile(
        r"""(?:\s+[^\s"'>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*?\s+"""
        + name
        + r"\s*=\s*"
        + _VALUE,
        re.IGNORECASE,
    )
    for name in ("href", "alt", "style")
}


def _attr(attrs: str, wanted: str) -> str | None:
    """The decoded value of attribute ``wanted`` (href, alt or style) in a tag's attributes."""
    match = _ATTR_LOOKUP[wanted].match(attrs)
    if match is None:
        return None
    raw = match.group(1)
    value = raw[1:-1] if raw[:1] in ('"', "'") else raw
    return _unescape_attr(value)


def _tidy_text(text: str, *, keep_indent: bool = False) -> str:
    """Lines stripped (or only right-stripped), at most one blank line in a row, one final
    newline."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # map() with the str method: no Python-level loop, this runs once per email sent.
    joined = "\n".join(map(str.rstrip if keep_indent else str.strip, lines))
    return _MANY_NEWLINES.sub("\n\n", joined).strip("\n") + "\n"


# What a start tag does to the text, decided once per distinct tag text (see _start_tag).
_OPEN_HIDDEN, _SKIP, _APPEND, _OPEN_LINK, _IMAGE, _NOTHING = range(6)


@lru_cache(maxsize=8192)
def _start_tag(name: str, attrs: str) -> tuple[int, str, str | None, bool]:
    """(action, lowercase tag, value, self-closing) for one start tag.

    The value is the text to append (``_APPEND``), the href (``_OPEN_LINK``) or the alt
    text (``_IMAGE``). Cached: an email's tags are the same for every lead, so a tick
    decides each distinct tag once instead of once per email.
    """
    tag = name.lower()
    self_closing = attrs.endswith("/")
    if tag in _HIDDEN_TAGS or (
        ("none" in attrs or "mso-hide" in attrs)
        and _HIDDEN_STYLE.search(attrs)
        and _HIDDEN_STYLE.search(_attr(attrs, "style") or "")
    ):
        if tag not in _VOID and not self_closing:
            return _OPEN_HIDDEN, tag, None, self_closing
        return _SKIP, tag, None, self_closing
    if tag in _BLOCK_TAGS:
        return _APPEND, tag, "\n", self_closing
    if tag in _PARAGRAPH_TAGS:
        return _APPEND, tag, "\n\n", self_closing
    if tag == "a":
        return _OPEN_LINK, tag, _attr(attrs, "href"), self_closing
    if tag == "br":
        return _APPEND, tag, "\n", self_closing
    if tag == "li":
        return _APPEND, tag, "\n- ", self_closing
    if tag == "hr":
        return _APPEND, tag, "\n\n" + "-" * 40 + "\n\n", self_closing
    if tag == "img":
        return _IMAGE, tag, _attr(attrs, "alt"), self_closing
    return _NOTHING, tag, None, self_closing


@lru_cache(maxsize=8192)
def _text_run(text: str) -> str:
    """Text between tags as it reads: entities decoded, whitespace runs collapsed."""
    return " " if text.isspace() else _SPACES.sub(" ", html.unescape(text))


def html_to_text(body: str) -> str:
    """Plain text for an HTML email: paragraphs, line breaks, lists and "label (url)".

    ``<style>``, ``<script>``, ``<head>`` and hidden elements (``display:none``, such as
    a preheader) are dropped. This is a small stdlib tokenizer rather than
    :class:`html.parser.HTMLParser`: it runs once per lead on the send path, and the
    parser took 2.5 ms for a 7 kB email, several times the Jinja render itself.

    The work is cached line by line: most lines of an email are the same for every lead,
    so a tick converts each of those once. The result is exactly that of converting the
    whole body in one pass (:func:`_html_to_text_whole`, used when a tag spans lines).
    """
    lines = body.split("\n")
    compiled = list(map(_compile_line, lines))
    if None in compiled:
        return _html_to_text_whole(body)
    converter = _Converter()
    out = converter.out
    pending: str | None = None  # text at the end of the previous line, which runs on
    for line, info in zip(lines, compiled, strict=True):
        assert info is not None
        parts, middle = info
        if len(parts) == 1:  # no tag on this line: all of it is text that runs on
            pending = line if pending is None else pending + "\n" + line
            continue
        lead = parts[0] if pending is None else pending + "\n" + parts[0]
        if middle is not None and converter.hidden_tag is None and not converter.links:
            if lead:
                out.append(_text_run(lead))
            out.append(middle)
        else:
            converter.feed(parts, lead)
        pending = parts[-1]
    converter.feed_text(pending)
    return _tidy_text("".join(out))


def _html_to_text_whole(body: str) -> str:
    """:func:`html_to_text` in one pass over the whole body, without the line cache."""
    converter = _Converter()
    # split() gives [text, "/"|"", name, attrs, text, ...]: no match objects on the hot path.
    parts = _TOKEN.split(body)
    converter.feed(parts, parts[0])
    converter.feed_text(parts[-1])
    return _tidy_text("".join(converter.out))


# A "<" that could start a tag, a comment or a doctype.
_TAG_START = re.compile(r"<[A-Za-z/!?]")


@lru_cache(maxsize=16384)
def _compile_line(line: str) -> tuple[list[str], str | None] | None:
    """One line's tokens, and its text when converted from a clean state, or None.

    None when a tag, comment or doctype may span lines: then the body is converted in one
    pass. The text (the second item) leaves out the line's first and last text runs, which
    join the neighbouring lines' text; it is None when the line leaves a link or a hidden
    element open, since its conversion then depends on the lines around it.
    """
    parts = _TOKEN.split(line)
    for i in range(0, len(parts), 4):
        if "<" in parts[i] and _TAG_START.search(parts[i]):
            return None
    opened = line.rfind("<!--")
    if opened >= 0 and line.find("-->", opened + 4) < 0:
        return None  # the comment pattern runs to the end of the text: of the line here
    if len(parts) == 1:
        return parts, None
    converter = _Converter()
    converter.feed(parts, "")
    if converter.hidden_tag is not None or converter.links:
        return parts, None
    return parts, "".join(converter.out)


class _Converter:
    """The state of one conversion: the text so far, open links and the hidden element."""

    __slots__ = ("hidden_depth", "hidden_tag", "links", "out")

    def __init__(self) -> None:
        self.out: list[str] = []
        self.hidden_tag: str | None = None
        self.hidden_depth = 0
        # Open links: (href, index in out where the label starts, alt of an image in it).
        self.links: list[tuple[str | None, int, str | None]] = []

    def feed_text(self, text: str | None) -> None:
        """Text after the last tag."""
        if text and self.hidden_tag is None:
            self.out.append(_text_run(text))

    def feed(self, parts: list[str], first_text: str) -> None:
        """Every tag of ``parts`` (a ``_TOKEN.split`` result) and the text before each.

        ``first_text`` replaces ``parts[0]``; the text after the last tag is left to the
        caller, because it may run on into the next line.
        """
        out, links = self.out, self.links
        append = out.append
        hidden_tag, hidden_depth = self.hidden_tag, self.hidden_depth
        for i in range(0, len(parts) - 1, 4):
            text = first_text if i == 0 else parts[i]
            if text and hidden_tag is None:
                append(_text_run(text))
            name = parts[i + 2]
            if name is None:  # comment, doctype
                continue
            if parts[i + 1]:  # end tag
                tag = name.lower()
                if hidden_tag is not None:
                    if tag == hidden_tag:
                        hidden_depth -= 1
                        if hidden_depth == 0:
                            hidden_tag = None
                elif tag in _END_ACTIONS:
                    _end_tag(tag, out, links)
                continue
            action, tag, value, self_closing = _start_tag(name, parts[i + 3])
            if hidden_tag is not None:
                if tag == hidden_tag and not self_closing and tag not in _VOID:
                    hidden_depth += 1
                continue
            if action == _APPEND:
                append(value)  # type: ignore[arg-type]
            elif action == _OPEN_HIDDEN:
                hidden_tag, hidden_depth = tag, 1
                continue
            elif action == _SKIP:
                continue
            elif action == _OPEN_LINK:
                links.append((value, len(out), None))
            elif action == _IMAGE and links and value:
                href, start, _ = links[-1]
                links[-1] = (href, start, value)
            if self_closing and tag in _END_ACTIONS:
                _end_tag(tag, out, links)
        self.hidden_tag, self.hidden_depth = hidden_tag, hidden_depth


def _end_tag(tag: str, out: list[str], links: list[tuple[str | None, int, str | None]]) -> None:
    if tag in _PARAGRAPH_TAGS:
        out.append("\n\n")
    elif tag in _BLOCK_TAGS:
        out.append("\n")
    elif tag == "a" and links:
        href, start, alt = links.pop()
        label = " ".join("".join(out[start:]).split())
        if not label and alt:
            out.append(alt)
            label = alt
        url = (href or "").strip()
        if not url or url.startswith("#") or url.lower().startswith("javascript:"):
            return
        shown = url[7:] if url.lower().startswith("mailto:") else url
        if label != shown and label != url:
            out.append(f" ({shown})" if label else shown)


# -- contexts ------------------------------------------------------------------------------

#: Lead fields every context carries (None when unknown), so a template can use them
#: with ``default(...)`` and lint against the sample lead matches what a send sees.
LEAD_FIELDS = (
    "id",
    "email",
    "first_name",
    "last_name",
    "company",
    "job_title",
    "country",
    "timezone",
    "lifecycle_stage",
    "owner",
    "grade",
    "behaviour_score",
    "fit_score",
)


def lead_context(
    lead: Mapping[str, Any],
    *,
    unsubscribe_url: str,
    campaign: str,
    step: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The render context for one lead.

    Args:
        lead: The lead's columns (a row mapping or dict). ``attributes`` is the JSON
            attributes dict; ``company`` falls back to ``account_name`` and then
            ``attributes["company"]``, ``job_title`` to ``attributes["job_title"]``.
        unsubscribe_url: The signed unsubscribe link for this delivery.
        campaign: The campaign name.
        step: The step id.
        extra: More variables, e.g. ``open_pixel_url`` or ``variant``. They cannot
            replace ``lead``, ``unsubscribe_url``, ``campaign`` or ``step``.

    Returns:
        ``{"lead": {...}, "unsubscribe_url": ..., "campaign": ..., "step": ..., **extra}``
    """
    data: dict[str, Any] = dict.fromkeys(LEAD_FIELDS)
    data.update(lead)
    attributes = data.get("attributes") or {}
    data["attributes"] = dict(attributes)
    if _is_missing(data.get("company")):
        data["company"] = data.get("account_name") or attributes.get("company")
    if _is_missing(data.get("job_title")):
        data["job_title"] = attributes.get("job_title")
    names = [str(data[k]).strip() for k in ("first_name", "last_name") if data.get(k)]
    data["full_name"] = " ".join(n for n in names if n) or None
    context: dict[str, Any] = dict(extra or {})
    context.update(lead=data, unsubscribe_url=unsubscribe_url, campaign=campaign, step=step)
    return context


SAMPLE_LEAD: dict[str, Any] = {
    "id": 1,
    "email": "dana.whitfield@brightwater-logistics.example.com",
    "first_name": "Dana",
    "last_name": "Whitfield",
    "account_name": "Brightwater Logistics",
    "country": "US",
    "timezone": "America/Chicago",
    "lifecycle_stage": "lead",
    "owner": "sam.ortiz@example.com",
    "grade": "B",
    "behaviour_score": 35.0,
    "fit_score": 42.0,
    "attributes": {
        "type": "b2b",
        "job_title": "VP of Operations",
        "industry": "Logistics",
        "company_size": 240,
        "favourite_category": "Outdoor",
        "city": "Chicago",
    },
}


def sample_context() -> dict[str, Any]:
    """A realistic context for lint and preview: the sample lead, a campaign and a step."""
    return lead_context(
        SAMPLE_LEAD,
        unsubscribe_url="https://track.example.com/u/sample-unsubscribe-token",
        campaign="sample-campaign",
        step="sample-step",
    )
