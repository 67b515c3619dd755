#!/usr/bin/env python3
"""Fails when a file of src/ imports, directly or through others, a file that imports it back.

`make lint` runs it. An import is a path that starts at `crate::` or `super::` and names an
item of another file's module (in a `use` or anywhere in the code); it points at the file that
defines the longest module prefix of the path. A parent module's own paths into the children it
declares (`mod a; use a::X;`) are how it is composed, not imports, and are not counted; test
modules (`#[cfg(test)]`) are left out. Each loop found is printed file by file with the names
that tie each step, and the exit status is 1.

usage: .ci/import_cycles.py [SRC_DIR=src]
"""
import os
import re
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"


def module_of(path):
    """The module path of a source file: src/a/b.rs -> (a, b); src/a/mod.rs -> (a,)."""
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


def without_tests(text):
    """The text before its first `#[cfg(test)]` item (test modules close a file by convention),
    with comments and string literals blanked out."""
    cut = re.search(r"#\[cfg\(test\)\]\s*(pub(\([a-z]+\))?\s+)?mod\s", text)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return text


def expand(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (as segment lists)."""
    tree = tree.replace(" ", "").replace("\n", "")
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree.split(" as ")[0].split("::")]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for p in filter(None, parts):
        for seg in expand(prefix + p):
            out.append([s for s in seg if s])
    return out


def paths_in(text):
    """Every `crate::`/`super::` path in `text`, as segment lists."""
    found = []
    for m in re.finditer(r"\buse\s+((?:crate|super)::[^;]*);", text):
        found.extend(expand(m.group(1)))
    code = re.sub(r"\buse\s+[^;]*;", "", text)
    for m in re.finditer(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", code):
        found.append(m.group(1).split("::"))
    return found


def main():
    files = {}
    test_only = set()
    for root, _, names in os.walk(SRC):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(root, name)
                files[module_of(path)] = path
    # Files declared `#[cfg(test)] mod x;` are tests.
    for module, path in files.items():
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+(\w+)\s*;", text):
            test_only.add(module + (m.group(1),))

    edges = {}
    for module, path in files.items():
        if any(module[: len(t)] == t for t in test_only):
            continue
        text = without_tests(open(path, encoding="utf-8").read())
        here = module
        for segs in paths_in(text):
            base = list(module)
            i = 0
            if segs[0] == "crate":
                base, i = [], 1
            while i < len(segs) and segs[i] == "super":
                # A file's module is its path (a mod.rs: its directory's); `super` is its parent.
                base = base[:-1]
                i += 1
            full = tuple(base + segs[i:])
            target = None
            for k in range(len(full), -1, -1):
                if full[:k] in files:
                    target = full[:k]
                    break
            if target is None or target == here:
                continue
            name = segs[-1]
            edges.setdefault(here, {}).setdefault(target, set()).add(name)

    cycles = strongly_connected(edges)
    if not cycles:
        print(f"import_cycles: no circle among the {len(files)} files of {SRC}/")
        return 0
    for comp in cycles:
        loop = a_loop(edges, comp)
        print(f"import_cycles: a circle of {len(comp)} files:")
        for a, b in zip(loop, loop[1:]):
            names = ", ".join(sorted(edges[a][b])[:6])
            print(f"  {files[a]} -> {files[b]}: {names}")
    return 1


def strongly_connected(edges):
    """Tarjan's components with more than one file."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def a_loop(edges, comp):
    """One closed walk through a component, from its first file back to it."""
    members = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in edges.get(v, {}):
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
    return comp + [comp[0]]


if __name__ == "__main__":
    sys.exit(main())
