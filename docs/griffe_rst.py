"""A Griffe extension that lets dsa-ref's docstrings keep their few reStructuredText habits.

The docstrings are Google style, but use a handful of Sphinx constructs that Markdown would show
verbatim. Before mkdocstrings renders them, this extension rewrites, in every docstring:

* ``:func:`name```, ``:class:``, ``:mod:``, ``:data:``, ``:meth:``, ``:attr:``, ``:exc:`` roles
  into optional cross-references (a link where the API pages document the object, plain code
  where they do not, so a reference can never break the strict build); ``~`` keeps the last name;
* ``:math:`...``` into inline math, and ``.. math::`` blocks into display math;
* definition lists (a bare name, then its indented description) into bullet lists;
* a paragraph ending in ``::`` before an indented literal block: the ``::`` becomes ``:``;
* in ``Args:`` sections, an entry naming several parameters (``key_start, key_end: ...``) into
  one entry per parameter, so each is matched to its signature (the Google parser would take
  ``"key_start, key_end"`` for one unknown name, shown without its default, as *required*);
* the leading shape and dtype of an entry (``q: ``[s_q, h, d]`` float ...``) into the entry's
  type, for a parameter without an annotation, so the parameter tables have a type column.
"""

from __future__ import annotations

import re
import textwrap

from griffe import Extension, Module, Object

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)(?:\(\))?`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)\n(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)*)",
                         re.MULTILINE)


_DEFINITION = re.compile(r"^(?P<indent>[ \t]*)(?P<term>[A-Za-z_][\w.]*)[ \t]*\n"
                         r"(?P<body>(?:(?P=indent)[ \t]+\S.*\n)+)", re.MULTILINE)
_LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*\n(?=[ \t]*\n[ \t]+\S)")


def _definition(match: re.Match) -> str:
    indent = match.group("indent")
    description = " ".join(line.strip() for line in match.group("body").splitlines())
    return f"{indent}- `{match.group('term')}`: {description}\n"


def _resolve(target: str, obj: Object) -> str:
    """A full dotted path for ``target`` as seen from ``obj``: relative names are looked up in the
    object's module and package; unresolvable ones are returned as written."""
    if target.startswith("."):
        target = target.lstrip(".")
    candidates = [target]
    module = obj if isinstance(obj, Module) else obj.module
    while module is not None:
        candidates.append(f"{module.path}.{target}")
        module = module.parent if isinstance(module.parent, Module) else None
    root = obj.package
    for candidate in candidates:
        try:
            root.modules_collection[candidate]
            return candidate
        except (KeyError, ValueError, AttributeError, Exception):  # noqa: BLE001 - griffe raises several kinds
            continue
    return target


def _math_block(match: re.Match) -> str:
    indent = match.group("indent")
    body = textwrap.dedent(match.group("body")).strip("\n")
    first = match.group("first").strip()
    tex = "\n".join(part for part in (first, body) if part)
    lines = [f"{indent}$$"] + [f"{indent}{line}" if line else "" for line in tex.splitlines()] + [f"{indent}$$", ""]
    return "\n".join(lines) + "\n"


_ARGS_HEADER = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Keyword Args|Keyword Arguments"
                          r"|Other Parameters):[ \t]*$")
_ARG_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>[\w*][^:()]*?)(?P<type>[ \t]*\([^)]*\))?:(?:[ \t]+(?P<text>.*))?$")
_ONE_NAME = r"(?P<name>\*{0,2}\w+)(?:[ \t]+``(?P<shape>\[[^`]*\])``)?"
_NAMES = re.compile(rf"^[ \t]*{_ONE_NAME}(?:[ \t]*,[ \t]*{_ONE_NAME.replace('?P<name>', '').replace('?P<shape>', '')})*[ \t]*$")
_DTYPE = r"(?:u?int(?:8|16|32|64)?|float(?:8_e4m3fn|16|32|64)?|bfloat16|bool)(?:/(?:\d+|\w+))*(?![\w/])"
_TYPE_WORD = rf"(?:``\[[^`]*\]``|{_DTYPE})"
_LEADING_TYPE = re.compile(rf"^(?P<type>{_TYPE_WORD}(?:(?:,[ \t]*|[ \t]+or[ \t]+|[ \t]+){_TYPE_WORD})*)(?P<rest>.*)$")


def _type_text(phrase: str) -> str:
    """``"int32/int64 ``[s_q]``"`` -> ``"[s_q] int32/int64"``: the shape first, so that griffe keeps
    the type as written instead of reading it as a Python expression (``int32 / int64[s_q]``)."""
    shapes = re.findall(r"``(\[[^`]*\])``", phrase)
    dtypes = re.sub(r"``\[[^`]*\]``", " ", phrase).strip(" ,")
    return " ".join(shapes + ([re.sub(r"\s*,\s*(?=\S)", ", ", re.sub(r"\s+", " ", dtypes))] if dtypes else []))


def _annotated(obj: Object, name: str) -> bool:
    try:
        parameter = obj.parameters[name.lstrip("*")]
    except (AttributeError, KeyError, TypeError):
        return False
    return parameter.annotation is not None


def _split_entry(match: re.Match, continuation: list[str], obj: Object) -> list[str] | None:
    """One ``Args:`` entry as one entry per named parameter, with a type taken from the text."""
    if not _NAMES.match(match.group("names")):
        return None
    pieces = list(re.finditer(_ONE_NAME, match.group("names")))
    indent, text, typed = match.group("indent"), match.group("text") or "", match.group("type")
    lines = []
    for piece in pieces:
        name, own_shape = piece.group("name"), piece.group("shape")
        kind, description = typed, text
        if kind is None and not _annotated(obj, name):
            leading = _LEADING_TYPE.match(text) if own_shape is None else None
            if own_shape is not None:
                kind = f" ({own_shape})"
            elif leading:
                kind = f" ({_type_text(leading.group('type'))})"
                description = leading.group("rest").lstrip(" ,;:")
                description = "" if description in (".", "") else description
        lines.append(f"{indent}{name}{kind or ''}:{' ' + description if description else ''}")
        lines.extend(continuation)
    return lines


def _parameter_entries(text: str, obj: Object) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        header = _ARGS_HEADER.match(lines[i])
        out.append(lines[i])
        i += 1
        if not header:
            continue
        section_indent = len(header.group("indent").expandtabs())
        while i < len(lines):
            line = lines[i]
            if line.strip() and len(line) - len(line.lstrip()) <= section_indent:
                break  # the section ended
            entry = _ARG_ENTRY.match(line)
            if not entry:
                out.append(line)
                i += 1
                continue
            depth = len(entry.group("indent").expandtabs())
            j = i + 1
            while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > depth:
                j += 1
            split = _split_entry(entry, lines[i + 1:j], obj)
            out.extend(lines[i:j] if split is None else split)
            i = j
    return "\n".join(out)


def convert(text: str, obj: Object) -> str:
    text = _MATH_BLOCK.sub(_math_block, text + "\n")
    text = _LITERAL_MARKER.sub(":\n", text)
    text = _parameter_entries(text, obj)
    text = _DEFINITION.sub(_definition, text).rstrip("\n")
    text = _MATH_ROLE.sub(lambda m: f"${m.group('tex').strip()}$", text)

    def role(match: re.Match) -> str:
        target = match.group("target")
        title = target.rsplit(".", 1)[-1] if match.group("tilde") else target
        return f'<autoref identifier="{_resolve(target, obj)}" optional><code>{title}</code></autoref>'

    return _ROLE.sub(role, text)


class RstRoles(Extension):
    """Rewrite Sphinx roles and math directives of every docstring of the package into Markdown."""

    def on_package(self, *, pkg: Module, **kwargs) -> None:
        seen: set[int] = set()

        def visit(obj: Object) -> None:
            if id(obj) in seen or obj.is_alias:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
