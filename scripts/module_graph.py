#!/usr/bin/env python3
"""Prints each crate's internal module edges (who `use`s whom) and any cycle among them.

    python3 scripts/module_graph.py            # every crate of the workspace
    python3 scripts/module_graph.py crates/proxy

A module is a file or directory under `src/`; a submodule's edges are counted at its own
level (`proxy/h1.rs` → `proxy/body.rs` is an edge inside `proxy`). References to the crate
root (`crate::Type`, `super::Type` from a top-level module) are not edges: the root only
declares modules and re-exports them. Exits 1 if any cycle is found.
"""

import os
import re
import sys

ROOTS = ["host/src", "crates", "plugins/sdk/src"]
USE = re.compile(r"\b(crate|super)::(\{[^;]*?\}|[A-Za-z_][A-Za-z0-9_]*)", re.S)


def modules(src):
    """Every module file under `src`: its path as a tuple of names, and its text."""
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                parts = []
            out[tuple(parts)] = open(os.path.join(dirpath, f)).read()
    return out


def strip_tests(text):
    """The code without comment lines (doc links are not dependencies) and without
    `#[cfg(test)] mod … { … }` blocks (tests may use anything)."""
    text = "\n".join(l for l in text.split("\n") if not l.lstrip().startswith("//"))
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([a-z]+\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def names(group):
    """First path segment of each item in `group` (`{a::X, b}` → a, b)."""
    if group.startswith("{"):
        return [g.strip().split("::")[0] for g in group[1:-1].split(",") if g.strip()]
    return [group]


def edges(mods):
    """(from, to) pairs between sibling modules, both as tuples of names."""
    found = set()
    for path, text in mods.items():
        for kind, group in USE.findall(strip_tests(text)):
            for name in names(group):
                if kind == "crate":
                    target = (name,)
                    source = path[:1]
                else:
                    parent = path[:-1]
                    target = parent + (name,)
                    source = path
                if target in mods and target != source and target[:-1] == source[:-1]:
                    found.add((source, target))
    return found


def cycles(found):
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {}
    for a, b in found:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def crates(args):
    if args:
        return args
    found = []
    for root in ROOTS:
        if root == "crates":
            found += [os.path.join("crates", c, "src") for c in sorted(os.listdir("crates"))]
        else:
            found.append(root)
    return [c for c in found if os.path.isdir(c)]


def main():
    os.chdir(os.path.join(os.path.dirname(__file__), ".."))
    bad = False
    for src in crates(sys.argv[1:]):
        src = src if src.endswith("src") else os.path.join(src, "src")
        found = edges(modules(src))
        print(f"== {src}")
        for a, b in sorted(found):
            print(f"  {'/'.join(a)} -> {'/'.join(b)}")
        for comp in cycles(found):
            bad = True
            print("  CYCLE: " + " <-> ".join("/".join(m) for m in comp))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
