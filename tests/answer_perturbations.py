"""Perturbations of real gold answers for the grading suite (tests/test_grading_suite.py).

`equivalent_forms(gold)` rewrites a MATH-500 gold answer in the equivalent ways people (and models) write it;
`changed_answers(gold)` changes its meaning (another number, a swapped or re-bracketed interval end, a dropped root
or element, a flipped sign). The GSM8K versions work on the integer answer and its question (units named by the
question's "how many <noun>", percent questions). Each returns {family: [variants]}; a family that does not apply
to a gold (no fraction to restyle, no list to shorten) is absent. Variants are built by rules from the text of the
gold alone, never looked up, so every gold of the data set gets the same treatment.
"""

from __future__ import annotations

import re

EQUIVALENT_FAMILIES = ("as is", "comma spaces", "left/right", "frac style", "a/b", "$...$", "trailing period",
                       "x = ...", "text units", "degrees", "percent")
CHANGED_FAMILIES = ("first digit", "last digit", "sign", "swapped ends", "interval end", "dropped element",
                    "other word")
GSM8K_EQUIVALENT_FAMILIES = ("as is", "thousands", "currency", "$...$", "trailing period", "x = ...", "text units",
                             "word units", "percent", "decimal", "#### line", "answer is")
GSM8K_CHANGED_FAMILIES = ("plus one", "times ten", "dropped digit", "sign")

_NUMBER = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
_NUMERIC_RE = re.compile(rf"{_NUMBER}|-?\\[dt]?frac\s*\{{?\d+\}}?\s*\{{?\d+\}}?")  # 5, .35, \frac{3}{4}, \frac 59
_SEPARATED_RE = re.compile(r"(?:\\\$)?[1-9]\d{0,2}(?:,(?:\\!)?\s?\d{3})+")  # 10,\!080  \$32,\!348
_UNIT_RE = re.compile(r"\s*\\(?:text|mbox)\{[^{}]*\}(?:\^\d)?$")  # 5.4 \text{ cents}, 864 \mbox{ inches}^2
_DEGREES_RE = re.compile(r"\^\\circ$")
_BASE_RE = re.compile(r"_\{?\d+\}?$")  # 52_8, 4210_{5}: the base is not one of the answer's digits
_UNITS = (" \\text{ cm}", "\\text{ inches}", " \\text{units}", " \\text{ meters}", "\\text{ dollars}",
          " \\text{ square feet}", " \\text{ hours}", " \\text{ cm}^2", "\\mbox{ inches}^2")
_OPEN, _CLOSE = "([{", ")]}"
_OUTER_RE = re.compile(r"(\\left\s*[(\[]|\\left\\\{|\\\{|[(\[])"  # opening: ( [ \left( \left[ \{ \left\{
                       r"(.*?)(\\right\s*[)\]]|\\right\\\}|\\\}|[)\]])", re.DOTALL)


def _pick(g: str, k: int) -> int:
    """A deterministic choice among k forms for gold g (spreads the forms over the data set)."""
    return sum(map(ord, g)) % k


def _is_text(g: str) -> bool:
    return bool(re.fullmatch(r"\\text\{[^{}]*\}", g))


def _value(g: str) -> str:
    """The gold without a trailing unit, degree sign or base (digits there are not the answer's)."""
    return _BASE_RE.sub("", _DEGREES_RE.sub("", _UNIT_RE.sub("", g)))


def _split_top(s: str) -> list[str]:
    """Split at commas outside any bracket (\\left/\\right and \\{ \\} count as brackets)."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        two = s[i : i + 2]
        if two in ("\\{", "\\}"):
            depth += 1 if two == "\\{" else -1
            cur += two
            i += 2
            continue
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    return parts + [cur]


def _outer(g: str) -> tuple[str, str, str] | None:
    """(opening, inside, closing) when the whole gold is one bracketed group: (a,b], \\left( ..\\right), \\{..\\}."""
    m = _OUTER_RE.fullmatch(g)
    if not m:
        return None
    inside = m.group(2)
    depth = 0
    for c in inside:  # the first bracket must close at the end, not earlier: (a+5)(b+2) is not a group
        depth += (c in _OPEN) - (c in _CLOSE)
        if depth < 0:
            return None
    return (m.group(1), inside, m.group(3)) if depth == 0 else None


def _with_left_right(g: str) -> str:
    out, i = "", 0
    while i < len(g):
        two = g[i : i + 2]
        if two in ("\\{", "\\}"):
            out += ("\\left" if two == "\\{" else "\\right") + two
            i += 2
            continue
        c = g[i]
        out += ("\\left" + c) if c in "([" else ("\\right" + c) if c in ")]" else c
        i += 1
    return out


def equivalent_forms(gold: str) -> dict[str, list[str]]:
    """Equivalent rewrites of a MATH-500 gold answer, by family."""
    g = gold.strip()
    value = _value(g)
    numeric = value == g and bool(_NUMERIC_RE.fullmatch(g))
    out: dict[str, list[str]] = {"as is": [g]}
    if "," in g and not _SEPARATED_RE.fullmatch(g):  # list commas (never inside a number written 10,\!080)
        out["comma spaces"] = [re.sub(r",\s+", ",", g) if ", " in g else g.replace(",", ", ")]
    if "\\left" in g:
        out["left/right"] = [re.sub(r"\\(?:left|right)\s*", "", g)]
    elif re.search(r"[()\[\]]|\\\{", g) and "\\sqrt[" not in g and "\\text" not in g:
        out["left/right"] = [_with_left_right(g)]
    if "\\dfrac" in g:
        out["frac style"] = [g.replace("\\dfrac", "\\frac"), g.replace("\\dfrac", "\\tfrac")]
    elif "\\frac" in g:
        out["frac style"] = [g.replace("\\frac", "\\dfrac"), g.replace("\\frac", "\\tfrac")]
    m = re.fullmatch(r"(-?)\\[dt]?frac\s*\{?(\d+)\}?\s*\{?(\d+)\}?", g)
    if m:
        out["a/b"] = [f"{m.group(1)}{m.group(2)}/{m.group(3)}"]
    out["$...$"] = [f"${g}$"]
    out["trailing period"] = [f"{g}."]
    if not re.search(r"=|\\in\b|\\text\{\(", g) and not _is_text(g):
        out["x = ..."] = [("y = " if "x" in g else "x = ") + g]
    if value.strip() and _UNIT_RE.search(g):  # a gold with units: without them, or with \text for \mbox
        out["text units"] = [value, g.replace("\\mbox", "\\text")] if "\\mbox" in g else [value]
    elif numeric:
        out["text units"] = [g + _UNITS[_pick(g, len(_UNITS))]]  # one form per gold, all forms over the set
    if _DEGREES_RE.search(g):
        out["degrees"] = [value, f"{value}^{{\\circ}}", f"{value} \\text{{ degrees}}"]
    elif numeric:
        out["degrees"] = [(f"{g}^\\circ", f"{g}^{{\\circ}}")[_pick(g, 2)]]
    if "\\%" in g:
        out["percent"] = [g.replace("\\%", "%"), g.replace("\\%", " \\%")]
    return out


def _bump(d: str) -> str:
    return str(int(d) % 9 + 1)  # 1..8 -> 2..9, 9 -> 1: always another digit


def changed_answers(gold: str) -> dict[str, list[str]]:
    """Rewrites of a MATH-500 gold answer that change its meaning, by family."""
    g = gold.strip()
    value = _value(g)
    tail = g[len(value) :]  # the unit or degree sign, kept as it is
    out: dict[str, list[str]] = {}
    digits = [m.start() for m in re.finditer(r"\d", value)]
    if digits:
        first = next((i for i in digits if value[i] != "0"), digits[0])
        out["first digit"] = [value[:first] + _bump(value[first]) + value[first + 1 :] + tail]
        last = digits[-1]
        out["last digit"] = [value[:last] + str((int(value[last]) + 1) % 10) + value[last + 1 :] + tail]
    plain = not re.search(r"[,=()\[\]]|\\in\b|\\cup|\\\{|\\begin|\\text|\\mbox|\\circ|\\\$", g)
    if plain and not re.fullmatch(r"-?0*\.?0*", value):
        out["sign"] = [value[1:].lstrip() + tail if value.startswith("-") else "-" + value + tail]
    outer = _outer(g)
    if outer and not outer[0].endswith("\\{"):  # ordered: tuples, points, intervals
        parts = _split_top(outer[1])
        if len(parts) >= 2 and parts[0].strip() != parts[1].strip():
            swapped = [parts[1], parts[0]] + parts[2:]
            out["swapped ends"] = [outer[0] + ",".join(swapped) + outer[2]]
    ends = list(re.finditer(r"([(\[])([^,()\[\]]+),([^,()\[\]]+?)((?:\\right\s*)?)([)\]])", g))
    if ends:  # flip the bracket of a finite end of the first interval (an infinite end is always open)
        m = ends[0]
        if "infty" not in m.group(3):
            flipped = g[: m.start(5)] + {")": "]", "]": ")"}[m.group(5)] + g[m.end(5) :]
        else:
            flipped = g[: m.start(1)] + {"(": "[", "[": "("}[m.group(1)] + g[m.end(1) :]
        out["interval end"] = [flipped]
    dropped = []
    if outer:
        parts = _split_top(outer[1])
        if len(parts) >= 2:
            dropped.append(outer[0] + ",".join(parts[:-1]) + outer[2])
    elif "," in g and not _SEPARATED_RE.fullmatch(g) and len(_split_top(g)) >= 2:
        dropped.append(",".join(_split_top(g)[:-1]))
    if "\\pm" in g:
        dropped.append(g.replace("\\pm", "+", 1))
    if "\\cup" in g:
        dropped.append(g.rsplit("\\cup", 1)[0].strip())
    if "\\begin{pmatrix}" in g and "\\\\" in g:
        dropped.append(re.sub(r"\\\\[^\\]*\\end\{pmatrix\}$", r"\\end{pmatrix}", g))
    if dropped:
        out["dropped element"] = dropped
    m = re.match(r"\\text\{\W*([A-Za-z])", g)
    if m:  # \text{(C)} -> \text{(D)}, \text{east} -> \text{fast}
        c = m.group(1)
        other = chr((ord(c.lower()) - 97 + 1) % 26 + 97)
        out["other word"] = [g[: m.start(1)] + (other.upper() if c.isupper() else other) + g[m.end(1) :]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# GSM8K: integer answers

_STOP_NOUNS = {"times", "does", "less", "was", "has", "is", "this", "its", "his", "hers", "yours", "ours", "theirs"}


def question_noun(question: str) -> str | None:
    """The plural noun of "How many <noun>s ..." (the unit a person would write after the number)."""
    m = re.search(r"[Hh]ow many ([a-z]{3,}s)\b", question)
    return m.group(1) if m and m.group(1) not in _STOP_NOUNS else None


def gsm8k_equivalent_forms(answer: str, question: str) -> dict[str, list[str]]:
    """Equivalent ways to state a GSM8K answer (an integer string), as whole completions' final answers; entries
    starting with '####' or 'The answer is' are completions in those formats, the rest are boxed."""
    n = int(answer)
    s = str(n)
    out: dict[str, list[str]] = {"as is": [s]}
    if abs(n) >= 1000:
        sep = f"{n:,}"
        out["thousands"] = [sep, sep.replace(",", "{,}"), sep.replace(",", ",\\!")]
    out["currency"] = [(f"\\${s}", f"\\${s}.00")[_pick(s, 2)]]
    out["$...$"] = [f"${s}$"]
    out["trailing period"] = [f"{s}."]
    out["x = ..."] = [f"x = {s}"]
    noun = question_noun(question)
    out["text units"] = [f"{s} \\text{{ {noun or 'dollars'}}}"]
    if noun:
        out["word units"] = [f"{s} {noun}"]
    if re.search(r"[Ww]hat (?:is the )?percent", question):
        out["percent"] = [f"{s}\\%", f"{s}%"]
    out["decimal"] = [f"{s}.0"]
    out["#### line"] = [f"#### {n:,}"]
    out["answer is"] = [f"The answer is {s}."]
    return out


def gsm8k_changed_answers(answer: str) -> dict[str, list[str]]:
    n = int(answer)
    out = {"plus one": [str(n + 1)]}
    if n:
        out["times ten"] = [str(10 * n)]
        out["sign"] = [str(-n)]
    if abs(n) >= 10:
        out["dropped digit"] = [str(n)[:-1]]
    return out
