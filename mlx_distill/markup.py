"""Model text to HTML for ``report.html``: a small Markdown subset and a regex syntax highlighter.

Everything from the model goes through :func:`html.escape` before any markup
is added. Markdown: fenced code blocks (highlighted; a fence cut off by
``max_tokens`` is marked), headings, paragraphs, inline code and bold.
Highlighting: a small regex lexer for Python, SQL, JS/TS and shell.
"""

from __future__ import annotations

import html
import re

from mlx_distill.evaluate.extract import _FENCE


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


_STR = r"""(?P<s>[rbufRBUF]{0,2}(?:\"\"\"[\s\S]*?(?:\"\"\"|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))"""
_NUM = r"(?P<n>\b\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?\b)"
_LEX = {
    "python": (
        re.compile(
            r"(?P<c>#[^\n]*)|" + _STR + r"|(?P<d>@[\w.]+)|" + _NUM + r"|(?P<w>\b[A-Za-z_]\w*\b)"
        ),
        _words(
            "False None True and as assert async await break class continue def del elif else except "
            "finally for from global if import in is lambda nonlocal not or pass raise return try while "
            "with yield match case"
        ),
        _words(
            "print len range int str float list dict set tuple bool isinstance super object type "
            "Exception ValueError TypeError KeyError RuntimeError TimeoutError open enumerate zip "
            "min max sum sorted any all self cls"
        ),
    ),
    "sql": (
        re.compile(
            r"(?P<c>--[^\n]*|/\*[\s\S]*?(?:\*/|$))|(?P<s>'(?:''|[^'])*'?)|"
            + _NUM
            + r"|(?P<w>\b[A-Za-z_]\w*\b)"
        ),
        _words(
            "select from where group by order having join left right inner outer full cross on as with "
            "partition over and or not in is null distinct limit offset union all case when then else end "
            "desc asc insert into values update set delete create table primary key references integer "
            "text real exists between like"
        ),
        _words(
            "avg sum count min max round row_number rank dense_rank lag lead coalesce nullif "
            "first_value last_value ntile cast"
        ),
    ),
    "js": (
        re.compile(
            r"(?P<c>//[^\n]*|/\*[\s\S]*?(?:\*/|$))|(?P<s>`[\s\S]*?(?:`|$)|\"(?:\\.|[^\"\\\n])*\"?|'(?:\\.|[^'\\\n])*'?)|"
            + _NUM
            + r"|(?P<w>\b[A-Za-z_$][\w$]*\b)"
        ),
        _words(
            "const let var function return if else for while do break continue class extends new this "
            "async await try catch finally throw import export from default typeof instanceof in of "
            "interface type enum implements null undefined true false switch case"
        ),
        _words("console Promise Map Set Array Object JSON Error Math string number boolean"),
    ),
    "bash": (
        re.compile(
            r"(?P<c>(?<![\w$])#[^\n]*)|(?P<s>\"(?:\\.|[^\"\\])*\"?|'[^']*'?)|(?P<b>\$\{[^}]*\}|\$\w+)|"
            + _NUM
            + r"|(?P<w>\b[A-Za-z_][\w-]*\b)"
        ),
        _words(
            "if then else elif fi for in do done while until case esac function return local export "
            "set echo exit"
        ),
        frozenset(),
    ),
}
_ALIAS = {
    "py": "python",
    "python3": "python",
    "py3": "python",
    "pycon": "python",
    "sqlite": "sql",
    "postgresql": "sql",
    "postgres": "sql",
    "mysql": "sql",
    "javascript": "js",
    "typescript": "js",
    "ts": "js",
    "jsx": "js",
    "tsx": "js",
    "node": "js",
    "sh": "bash",
    "shell": "bash",
    "zsh": "bash",
    "console": "bash",
}


def highlight(code: str, lang: str) -> str:
    """Escaped HTML with ``<span class=k|s|c|n|f|b|d>`` around tokens. Unknown languages: escaped only."""
    lang = _ALIAS.get((lang or "").lower(), (lang or "").lower())
    if lang not in _LEX:
        return html.escape(code)
    rx, keywords, builtins_ = _LEX[lang]
    fold = lang == "sql"
    out, pos, prev = [], 0, ""
    for m in rx.finditer(code):
        out.append(html.escape(code[pos : m.start()]))
        kind, text = m.lastgroup, m.group()
        cls = kind if kind in ("c", "s", "n", "d", "b") else None
        if kind == "w":
            key = text.lower() if fold else text
            cls = (
                "k"
                if key in keywords
                else "f"
                if prev in ("def", "class", "function")
                else ("b" if key in builtins_ else None)
            )
            prev = text
        out.append(f'<span class="{cls}">{html.escape(text)}</span>' if cls else html.escape(text))
        pos = m.end()
    out.append(html.escape(code[pos:]))
    return "".join(out)


def _inline(text: str) -> str:
    """Escape a prose line, then add `code` and **bold** (safe: applied to escaped text)."""
    esc = html.escape(text)
    esc = re.sub(r"`([^`]+)`", r'<code class="inline">\1</code>', esc)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", esc)


def render_markdown(text: str) -> str:
    """Headers, paragraphs, inline code and fenced code blocks (highlighted). Nothing else."""
    out: list[str] = []
    para: list[str] = []
    lines = text.splitlines()

    def flush() -> None:
        if para:
            out.append("<p>" + "\n".join(_inline(x) for x in para) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            flush()
            fence = m.group("fence")
            lang = (m.group("info").strip().split() or [""])[0]
            j, body = i + 1, []
            while j < len(lines) and not (
                lines[j].strip().startswith(fence) and set(lines[j].strip()) == {fence[0]}
            ):
                body.append(lines[j])
                j += 1
            cut = j >= len(lines)
            title = ' title="the answer ended inside this block (cut off)"' if cut else ""
            out.append(
                f'<pre class="code{" cut" if cut else ""}"{title}><code>{highlight(chr(10).join(body), lang)}</code></pre>'
            )
            i = j + 1
            continue
        h = re.match(r"^\s{0,3}(#{1,6})\s+(.*)$", lines[i])
        if h:
            flush()
            out.append(f'<div class="md-h">{_inline(h.group(2))}</div>')
        elif not lines[i].strip():
            flush()
        else:
            para.append(lines[i])
        i += 1
    flush()
    return "\n".join(out)
