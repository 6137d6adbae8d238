"""The modules of the training layer import each other without cycles (function-level imports included): each
can be read, and tested, on top of the ones below it."""
import ast
import os

KC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kc")


def kc_imports(path):
    """The kc modules a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "kc":
                out |= {a.name for a in node.names}
            elif node.module.startswith("kc."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kc.")}
    return out


def test_no_import_cycles_in_kc():
    graph = {f[:-3]: kc_imports(os.path.join(KC, f)) for f in os.listdir(KC) if f.endswith(".py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    assert "wordnet" not in graph["taxonomy"] and "taxonomy" in graph["wordnet"]
    assert "synthetic" not in graph["data"] and "data" in graph["synthetic"]
