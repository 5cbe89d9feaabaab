"""Find the code in a model answer: fenced blocks, the one defining the asked-for name.

Answers mix prose and several fenced blocks (the solution, an "example usage"
block, sample data). For Python we pick the block that defines the entrypoint
at module level and add, from the other blocks, only the definitions it uses
but does not define itself (a ``TreeNode`` class shown first, an import). For
SQL we pick the SELECT/WITH statement that mentions the most of the prompt's
tables (the solution, not ``SELECT * FROM employees``). Cut-off answers end in
an unclosed fence: that block runs to the end of the text and is flagged.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import asdict, dataclass, field
from typing import Any

PY_LANGS = {"python", "py", "python3", "py3", "pycon", ""}
SQL_LANGS = {
    "sql",
    "sqlite",
    "sqlite3",
    "postgresql",
    "postgres",
    "psql",
    "mysql",
    "plsql",
    "tsql",
    "",
}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


@dataclass
class Block:
    """One fenced block. ``closed`` is False when the answer ended inside it."""

    lang: str
    code: str
    start_line: int
    closed: bool


@dataclass
class Extraction:
    """What was picked for execution, and why (shown in the report)."""

    found: bool
    code: str = ""
    language: str = ""
    block: int | None = None  # index into the answer's blocks
    blocks: int = 0
    closed: bool = True
    support_blocks: list[int] = field(default_factory=list)
    reason: str = ""
    original: str = ""  # ``code`` before a cut-off block was trimmed (for style metrics)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("code")
        d.pop("original")
        return d


def fenced_blocks(text: str) -> list[Block]:
    """All fenced code blocks in order (CommonMark-ish; lenient about indentation)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), m.group("indent")
        lang = (m.group("info").strip().split() or [""])[0].lower().lstrip("{.").rstrip("}")
        body: list[str] = []
        j = i + 1
        closed = False
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                closed = True
                break
            line = lines[j]
            body.append(line[len(indent) :] if indent and line.startswith(indent) else line)
            j += 1
        blocks.append(
            Block(
                lang=lang,
                code="\n".join(body) + ("\n" if body else ""),
                start_line=i + 1,
                closed=closed,
            )
        )
        i = j + 1
    return blocks


def parse_prefix(code: str) -> tuple[ast.Module | None, int]:
    """Parse ``code``; if it fails (a cut-off answer), the longest parsable line prefix.

    Returns (tree or None, number of lines parsed). Dedents nothing: a block cut
    inside a function body parses once the dangling lines are dropped.
    """
    lines = code.splitlines()
    for n in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:n])), n
        except (SyntaxError, ValueError):
            if n == len(lines) and n > 400:  # huge broken block: do not try 400 parses
                break
            continue
    return None, 0


def defined_names(tree: ast.Module) -> set[str]:
    """Names bound at module level: defs, classes, assignments, imports."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
    return out


def _free_names(tree: ast.Module) -> set[str]:
    """Names read somewhere but bound nowhere in this block (nor builtins)."""
    loaded, bound = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (loaded if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return loaded - bound - set(dir(builtins))


def _definitions_only(tree: ast.Module) -> str:
    """The imports, defs, classes and simple assignments of a supporting block."""
    keep = (
        ast.Import,
        ast.ImportFrom,
        ast.FunctionDef,
        ast.AsyncFunctionDef,
        ast.ClassDef,
        ast.Assign,
        ast.AnnAssign,
    )
    return "\n\n".join(ast.unparse(n) for n in tree.body if isinstance(n, keep)) + "\n"


def _defines_by_regex(code: str, name: str) -> bool:
    """Module-level (unindented) definition; for blocks that do not parse whole."""
    return (
        re.search(
            rf"^(async\s+def|def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*=", code, re.M
        )
        is not None
    )


def extract_python(text: str, entrypoint: str | None) -> Extraction:
    """The Python to run for a prompt whose tests call ``entrypoint``."""
    blocks = fenced_blocks(text)
    if not blocks:
        tree, _ = parse_prefix(text)
        if tree is not None and (not entrypoint or entrypoint in defined_names(tree)):
            return Extraction(
                True, text, "python", None, 0, True, [], "the whole answer is code (no fences)"
            )
        return Extraction(False, blocks=0, reason="no fenced code block in the answer")
    cands = [i for i, b in enumerate(blocks) if b.lang in PY_LANGS]
    if not cands:
        langs = ", ".join(sorted({b.lang or "unlabelled" for b in blocks}))
        return Extraction(False, blocks=len(blocks), reason=f"no Python block (found: {langs})")
    trees = {i: parse_prefix(blocks[i].code) for i in cands}
    if entrypoint:
        defining = [
            i
            for i in cands
            if (trees[i][0] is not None and entrypoint in defined_names(trees[i][0]))
            or (
                trees[i][1] < len(blocks[i].code.splitlines())
                and _defines_by_regex(blocks[i].code, entrypoint)
            )
        ]
    else:
        defining = cands
    if not defining:
        return Extraction(
            False,
            blocks=len(blocks),
            reason=f"no Python block defines {entrypoint!r} at module level ({len(cands)} Python blocks)",
        )

    # Prefer a block that parses whole, then the longest: the full version after a sketch.
    def rank(i: int) -> tuple[bool, int]:
        tree, n = trees[i]
        return (tree is not None and n == len(blocks[i].code.splitlines()), len(blocks[i].code))

    best = max(defining, key=rank)
    code = blocks[best].code
    support: list[int] = []
    tree, parsed = trees[best]
    total = len(code.splitlines())
    # A cut-off block runs up to its last complete statement: the code the model did
    # write gets tested (completeness is where the cut costs), e.g. a finished
    # function followed by a half-written usage example still passes its tests.
    cut = not blocks[best].closed and tree is not None and parsed < total
    full = code
    if cut:
        code = "\n".join(code.splitlines()[:parsed]) + "\n"
    if tree is not None:
        missing = _free_names(tree)
        for i in cands:
            other = trees[i][0]
            if i == best or other is None or not missing:
                continue
            provides = defined_names(other) & missing
            if provides:
                support.append(i)
                missing -= provides
        if support:
            prefix = "".join(_definitions_only(trees[i][0]) + "\n" for i in support)  # type: ignore[arg-type]
            code, full = prefix + code, prefix + full
    where = f"block {best + 1} of {len(blocks)}"
    reason = (
        f"defines {entrypoint!r} ({where})" if entrypoint else f"longest Python block ({where})"
    )
    if support:
        reason += f", with definitions from block(s) {', '.join(str(i + 1) for i in support)}"
    if cut:
        reason += f"; cut off, so only its first {parsed} of {total} lines (those that parse) run"
    return Extraction(
        True, code, "python", best, len(blocks), blocks[best].closed, support, reason, full
    )


def split_sql(script: str) -> list[str]:
    """Split on ``;`` outside strings, quoted names and comments. Keeps an unterminated tail."""
    out, cur, i, n = [], [], 0, len(script)
    while i < n:
        c = script[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            j = script.find(close, i + 1)
            j = n - 1 if j < 0 else j
            cur.append(script[i : j + 1])
            i = j + 1
            continue
        if script.startswith("--", i):
            j = script.find("\n", i)
            j = n if j < 0 else j
            cur.append(script[i:j])
            i = j
            continue
        if script.startswith("/*", i):
            j = script.find("*/", i + 2)
            j = n if j < 0 else j + 2
            cur.append(script[i:j])
            i = j
            continue
        if c == ";":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return [s.strip() for s in out if _strip_sql_comments(s).strip()]


def _strip_sql_comments(s: str) -> str:
    s = re.sub(r"/\*.*?(\*/|$)", " ", s, flags=re.S)
    return re.sub(r"--[^\n]*", " ", s)


def extract_sql(text: str, tables: list[str] | None = None) -> Extraction:
    """The one query to run: a SELECT/WITH statement, the one naming most of ``tables``."""
    blocks = fenced_blocks(text)
    sources: list[tuple[int | None, str, bool]] = [
        (i, b.code, b.closed) for i, b in enumerate(blocks) if b.lang in SQL_LANGS
    ]
    if not blocks and re.match(r"\s*(select|with)\b", text, re.I):
        sources = [(None, text, True)]
    best: tuple[int, int, str, int | None, bool] | None = None
    order = 0
    for bi, code, closed in sources:
        for stmt in split_sql(code):
            head = _strip_sql_comments(stmt).strip().lower()
            if not re.match(r"(select|with)\b", head):
                continue
            score = sum(1 for t in tables or [] if re.search(rf"\b{re.escape(t.lower())}\b", head))
            score = score * 2 + (1 if re.search(r"\bover\s*\(", head) else 0)
            order += 1
            if best is None or score > best[0]:
                best = (score, order, stmt, bi, closed)
    if best is None:
        return Extraction(
            False, blocks=len(blocks), reason="no SELECT or WITH statement in an SQL block"
        )
    _, _, stmt, bi, closed = best
    where = f"block {bi + 1} of {len(blocks)}" if bi is not None else "unfenced answer"
    return Extraction(
        True, stmt, "sql", bi, len(blocks), closed, [], f"query naming the most tables ({where})"
    )
