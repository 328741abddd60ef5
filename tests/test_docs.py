"""README.md covers what the C sources define.

Fails when a directive or variable name (any ngx_string("loyalty...") in
ngx_module/*.c) or an X-Loyalty-* header name of
ngx_module/ngx_http_loyalty_variables.c is missing from README.md, and when
the README documents a directive (a **Syntax:** line, a ### heading under
"Directives") that the command table does not define.

    /usr/bin/python3 -m pytest tests/test_docs.py
"""

import glob
import os
import re


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "ngx_module")
README = os.path.join(ROOT, "README.md")
VARIABLES_C = os.path.join(SRC, "ngx_http_loyalty_variables.c")

NGX_STRING = re.compile(r'ngx_string\(\s*"(loyalty[A-Za-z0-9_]*)"\s*\)')
HEADER = re.compile(r"X-Loyalty-[A-Za-z0-9-]*[A-Za-z0-9]")

# an array initialiser of the given type: "ngx_command_t  name[] = { ... };"
TABLE = r"%s\s+\w+\[\]\s*=\s*\{(.*?)\n\};"


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def sources():
    paths = sorted(glob.glob(os.path.join(SRC, "*.c")))
    assert paths, "no C sources in %s" % SRC
    return {os.path.relpath(p, ROOT): read(p) for p in paths}


def table_names(ctype):
    """ngx_string("loyalty...") names inside the ctype[] initialisers."""
    names = set()
    for text in sources().values():
        for body in re.findall(TABLE % re.escape(ctype), text, re.S):
            names.update(NGX_STRING.findall(body))
    return names


def mentioned(text, name):
    """name occurs in text as a whole word ("loyalty" inside "loyalty_tier"
    or "X-Loyalty-Offer" inside "X-Loyalty-Offer-Code" does not count)."""
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(name), text)


def directive_section(readme):
    start = readme.index("\n## Directives")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def test_every_loyalty_ngx_string_is_in_readme():
    readme = read(README)
    missing = {}
    for path, text in sources().items():
        for name in NGX_STRING.findall(text):
            if not mentioned(readme, name):
                missing.setdefault(name, path)
    assert not missing, "README.md does not mention: %s" % ", ".join(
        "%s (%s)" % (n, p) for n, p in sorted(missing.items()))


def test_every_directive_has_a_section():
    directives = table_names("ngx_command_t")
    assert "loyalty" in directives, "command table not found"
    section = directive_section(read(README))
    headings = set(re.findall(r"^###\s+(\S+)\s*$", section, re.M))
    syntax = set(re.findall(r"\*\*Syntax:\*\*\s*(?:<code>|`)(\w+)", section))
    missing = sorted(d for d in directives
                     if d not in headings or d not in syntax)
    assert not missing, \
        "no ### heading and **Syntax:** line in README.md for: %s" % (
            ", ".join(missing))


def test_no_syntax_block_for_an_unknown_directive():
    directives = table_names("ngx_command_t")
    readme = read(README)
    documented = set(re.findall(r"\*\*Syntax:\*\*\s*(?:<code>|`)(\w+)",
                                readme))
    unknown = sorted(documented - directives)
    assert not unknown, \
        "README.md has **Syntax:** for directives the code lacks: %s" % (
            ", ".join(unknown))


def test_every_variable_is_documented_with_dollar():
    variables = table_names("ngx_http_variable_t")
    assert "loyalty_status" in variables, "variable table not found"
    readme = read(README)
    missing = sorted(v for v in variables
                     if not re.search(r"\$%s(?!\w)" % re.escape(v), readme))
    assert not missing, "README.md does not mention: %s" % ", ".join(
        "$" + v for v in missing)


def test_every_header_is_in_readme():
    headers = set(HEADER.findall(read(VARIABLES_C)))
    assert "X-Loyalty-Status" in headers, \
        "no X-Loyalty-* header found in %s" % VARIABLES_C
    readme = read(README)
    missing = sorted(h for h in headers if not mentioned(readme, h))
    assert not missing, "README.md does not mention: %s" % ", ".join(missing)
