"""The import structure stays as built: every top-level module has a layer and imports only from its own layer or
below, no import circle, no stage script imports another, and at most MAX_LAZY project imports sit inside
functions (each with a comment saying why: an optional path's start-up stays cheap)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 0: the leaf; 1: the model, the tokenizer, the generated world; 2: what is built on them; 3: the training plumbing;
# 4: stage scripts and tools, which never import each other
LAYERS = {
    "common": 0,
    "model": 1, "tokenizer": 1, "world": 1,
    "quantize": 2, "lora": 2, "prepare": 2, "engine": 2,
    "evaluation": 3, "trainer": 3, "rl": 3,
    "pretrain": 4, "sft": 4, "dpo": 4, "reward_model": 4, "ppo": 4, "generate": 4, "pipeline": 4, "bench": 4,
    "serve": 4, "convert": 4,
}
TOP = max(LAYERS.values())
MAX_LAZY = 3


def project_imports(source, known):
    """Imports of `known` modules in a module's source, wherever they are: [(target, line, in_function,
    commented)]. `commented`: the import's line carries a # comment."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            for name in names:
                if name in known:
                    found.append((name, child.lineno, inside, "#" in lines[child.lineno - 1]))
            visit(child, inside)
    visit(tree, False)
    return found


def check_layers(layers, imports, top=TOP, max_lazy=MAX_LAZY):
    """Problems with a module table: layers {module: layer}, imports {module: project_imports(...)}. Returns a
    list of one-line messages; empty when the structure holds."""
    problems = []
    for mod in sorted(imports):
        if mod not in layers:
            problems.append(f"{mod}.py has no layer in the table")
    lazy = []
    for mod, found in sorted(imports.items()):
        for target, line, in_function, commented in found:
            if target == mod or mod not in layers:
                continue
            if layers[target] > layers[mod]:
                problems.append(f"{mod}.py:{line} imports {target} from a higher layer "
                                f"({layers[target]} > {layers[mod]})")
            elif layers[target] == layers[mod] == top:
                problems.append(f"{mod}.py:{line}: a stage imports a stage ({target})")
            if in_function:
                lazy.append(f"{mod}.py:{line}")
                if not commented:
                    problems.append(f"{mod}.py:{line} imports {target} inside a function without a comment saying why")
    if len(lazy) > max_lazy:
        problems.append(f"{len(lazy)} project imports inside functions (at most {max_lazy}): {', '.join(lazy)}")
    # circles, over every import (inside functions too)
    graph = {mod: sorted({t for t, *_ in found if t != mod}) for mod, found in imports.items()}
    state = {}

    def walk(mod, path):
        state[mod] = "open"
        for nxt in graph.get(mod, ()):
            if state.get(nxt) == "open":
                problems.append("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[mod] = "done"
    for mod in sorted(graph):
        if mod not in state:
            walk(mod, [mod])
    return problems


def tree_imports():
    mods = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    imports = {}
    for mod in mods:
        with open(os.path.join(ROOT, mod + ".py"), encoding="utf-8") as f:
            imports[mod] = project_imports(f.read(), set(mods))
    return imports


def test_every_module_keeps_its_layer_no_circle_no_stage_imports_a_stage():
    assert check_layers(LAYERS, tree_imports()) == []


def test_model_imports_nothing_of_the_project_but_the_leaf():
    # model.py is meant to be copied out on its own (as gpt-fast's is)
    assert {t for t, *_ in tree_imports()["model"]} <= {"common"}


def test_the_checker_finds_each_kind_of_fault():
    layers = {"leaf": 0, "mid": 1, "stage_a": 2, "stage_b": 2}

    def imports_of(**sources):
        known = set(layers) | {"newmod", "mid2"}
        return {m: project_imports(src, known) for m, src in sources.items()}

    good = imports_of(leaf="import os\n", mid="import leaf\n", stage_a="import mid\nfrom leaf import x\n",
                      stage_b="import mid\n")
    assert check_layers(layers, good, top=2) == []

    up = imports_of(leaf="import mid\n", mid="import os\n")
    assert any("higher layer" in p for p in check_layers(layers, up, top=2))

    # an import inside a function still counts, for layers and circles alike
    up_lazy = imports_of(leaf="def f():\n    import mid  # cheap start-up\n", mid="import leaf\n")
    problems = check_layers(layers, up_lazy, top=2)
    assert any("higher layer" in p for p in problems) and any("import circle" in p for p in problems)

    stage = imports_of(stage_a="import stage_b\n", stage_b="import mid\n")
    assert any("a stage imports a stage" in p for p in check_layers(layers, stage, top=2))

    circle = imports_of(mid="import mid2\n", mid2="import mid\n")
    assert any("import circle: mid -> mid2 -> mid" in p
               for p in check_layers({**layers, "mid2": 1}, circle, top=2))

    uncommented = imports_of(stage_a="def f():\n    import mid\n")
    assert any("without a comment" in p for p in check_layers(layers, uncommented, top=2))

    many = imports_of(stage_a="".join(f"def f{i}():\n    import mid  # cheap\n" for i in range(4)))
    assert any("4 project imports inside functions" in p for p in check_layers(layers, many, top=2))

    unknown = imports_of(newmod="import leaf\n")
    assert any("newmod.py has no layer" in p for p in check_layers(layers, unknown, top=2))
