"""The results layout (varkd/layout.py) is the one place that spells paths under results/: the rules call it with
wildcard placeholders, the study with values, and both get the same paths."""
import ast
import inspect
import io
import tokenize

import pytest

from tests.helpers import REPO
from varkd import layout

# a value and a placeholder for each parameter name of the layout's functions
VALUES = {"study": "embedded", "backbone": "tiny", "method": "fkl", "seed": 0, "split": "val", "shard": 1, "k": 16,
          "model": "student_init", "relative": "tiny/fkl/seed0", "job": "tiny/fkl/seed0/config", "name": "main",
          "key": "0123abcd", "stage": 1, "table": "ablations", "figure": "sweeps", "ext": "md"}
DIRECTORIES = {"directory": ("results/{study}/{backbone}/{method}/seed{seed}", "results/embedded/tiny/fkl/seed0"),
               "pool": ("results/{study}/{backbone}/teacher/pool_{key}", "results/embedded/tiny/teacher/pool_0123abcd"),
               "path": ("results/{study}/data/index/{split}.npz", "results/embedded/data/index/val.npz")}
FUNCTIONS = [f for name, f in vars(layout).items() if inspect.isfunction(f) and f.__module__ == layout.__name__
             and not name.startswith("_")]


def workflow_strings():
    """Every string literal of the Snakefile and the rules, with its file and line (comments are not strings)."""
    for path in [REPO / "workflow" / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.STRING or token.type == getattr(tokenize, "FSTRING_MIDDLE", None):
                yield path.relative_to(REPO), token.start[0], token.string


def test_no_rule_spells_a_results_path():
    strings = list(workflow_strings())
    assert len(strings) > 100  # the tokenizer read the rules
    spelt = [f"{path}:{line}: {text}" for path, line, text in strings if f"{layout.RESULTS}/" in text]
    assert not spelt, "paths under results/ come from varkd.layout (through common.smk):\n" + "\n".join(spelt)


def test_study_spells_no_results_path():
    source = (REPO / "varkd" / "study.py").read_text()
    assert f'"{layout.RESULTS}/' not in source and f"'{layout.RESULTS}/" not in source


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_a_pattern_formatted_with_values_is_the_path_of_those_values(function):
    """What makes the rules' patterns and the study's paths one layout: every function called with "{name}"
    placeholders gives the pattern that, formatted with values, is the function called with those values."""
    pattern_args, value_args = [], []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.default is not inspect.Parameter.empty:
            continue
        if parameter.name in DIRECTORIES:
            pattern, value = DIRECTORIES[parameter.name]
        else:
            pattern, value = f"{{{parameter.name}}}", VALUES[parameter.name]
        pattern_args.append(pattern)
        value_args.append(value)
    assert function(*pattern_args).format(**VALUES) == function(*value_args)


def test_the_layout_of_the_embedded_study():
    """Where the README says each file is."""
    study, run = "embedded", layout.run_dir("embedded", "tiny", "fkl", 0)
    assert run == "results/embedded/tiny/fkl/seed0"
    assert layout.teacher(study, "tiny") == "results/embedded/tiny/teacher/teacher.pt"
    assert layout.student(layout.student_init_dir(study, "tiny")) == "results/embedded/tiny/student_init/student.pt"
    assert layout.codes(study, "train") == "results/embedded/data/codes/train"
    assert layout.clusters(layout.codebook_clusters_dir(study), 16) == "results/embedded/data/clusters/k16.npy"
    assert layout.config(run) == "results/embedded/tiny/fkl/seed0/config.yaml"
    assert layout.config_of(layout.sample_shard(run, 2)) == "results/embedded/tiny/fkl/seed0/samples/shard2.yaml"
    assert layout.log(run, "train") == "results/logs/embedded/tiny/fkl/seed0/train.log"
    assert layout.log(layout.study_dir(study), "prepare_data") == "results/logs/embedded/prepare_data.log"
    assert layout.table(study, "main", "_summary.csv") == "results/embedded/tables/main_summary.csv"
    assert layout.figure(study, "main", "metrics", "png") == "results/embedded/plots/main_metrics.png"
    assert layout.search_stage(study, 0) == "results/embedded/search/stage0.csv"
    with pytest.raises(ValueError, match="not under results/"):
        layout.log("elsewhere/run", "train")


def varkd_imports() -> dict[str, set[str]]:
    """module -> the varkd modules it imports, at module level or inside functions (the package imports lazily)."""
    package = REPO / "varkd"
    modules = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
               for path in sorted(package.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from varkd.steps import train` imports varkd.steps.train; `from varkd.config import X` varkd.config
                imported = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                            for alias in node.names]
            else:
                continue
            graph[name] |= {m for m in imported if m in modules and m != name}
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports as [a, b, ..., a], or [] if the graph runs downhill."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return []


def test_the_imports_run_downhill_with_the_cli_on_top():
    graph = varkd_imports()
    assert {"varkd.cli", "varkd.config", "varkd.models.gpt"} <= graph.keys() and "varkd.config" in graph["varkd.cli"]
    cycle = a_cycle(graph)
    assert not cycle, "an import circle: " + " -> ".join(cycle)
    assert not [m for m, imported in graph.items() if "varkd.cli" in imported], "nothing imports the CLI back"


def test_the_steps_sit_between_the_library_and_the_cli():
    """varkd.steps holds what each workflow job does: the CLI runs a step for every command, and no library module
    imports a step."""
    from varkd.cli import COMMANDS

    graph = varkd_imports()
    steps = {m for m in graph if m == "varkd.steps" or m.startswith("varkd.steps.")}
    assert {target.split(":")[0] for _, target in COMMANDS.values()} <= steps
    library = graph.keys() - steps - {"varkd.cli"}
    importing = {m: sorted(graph[m] & steps) for m in sorted(library) if graph[m] & steps}
    assert not importing, f"library modules import steps: {importing}"


def test_the_cycle_finder_finds_a_circle():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
