"""`make lint`'s check that ddl's modules import one another without a cycle.

Every import counts, the ones inside functions too: a cycle hidden in a function still means that
neither module can be read, tested or replaced without the other. A package's `__init__` counts
as the package, `from ddl.x import y` as an import of ddl.x.y when that is a module, else of
ddl.x, and an import of a module as one of the packages it lies in too (they run first), but for
the importer's own packages. Prints each cycle (its modules, strongly connected) and exits 1 if
there is one.

    python scripts/import_cycles.py [PACKAGE_DIR]     (default: ddl/ beside this script)
"""
import ast
import os
import sys


def modules(root):
    """{dotted name: path} of the package at `root` and everything below it."""
    base = os.path.dirname(os.path.abspath(root))
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(name, path, known):
    """The modules of `known` that module `name` (at `path`) imports, anywhere in its body."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{parent}.{source}" if source else parent
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:       # `import ddl.a.b` imports ddl.a.b
                target = target.rpartition(".")[0]
            # Importing ddl.nn.layers runs ddl/nn/__init__.py first: that counts too, unless
            # the importer lives in that package (which its __init__ may import in turn).
            while target and target != name and not name.startswith(target + "."):
                out.add(target)
                target = target.rpartition(".")[0]
    return out


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv):
    root = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "ddl")
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    loops = cycles(graph)
    for loop in loops:
        print(f"import cycle: {' <-> '.join(loop)}")
    print(f"{len(known)} modules, {len(loops)} import cycle(s)")
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
