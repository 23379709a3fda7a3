"""The docs: README stays the front door, the site builds strictly, and what the pages say runs.

The site (mkdocs.yml, docs/) is built once per module with `mkdocs build --strict`, its two
notebooks executed, and the built pages are read back. The commands in README.md and the docs
pages are parsed, not run: each `python scripts/...` must name a script that exists, flags that
script defines, and config files, variants and `--config.<key>` overrides that exist.
"""

import ast
import glob
import html
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MAX_README_LINES = 220
# ml_collections loads config files with importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _pages() -> list[str]:
    """README.md and every Markdown page of the site."""
    return [README, *sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))]


# ---- README ----


def test_readme_is_short_and_its_test_command_is_the_one_ci_runs():
    text = _read(README)
    assert text.count("\n") < MAX_README_LINES, (
        f"README.md has {text.count(chr(10))} lines; keep it under {MAX_README_LINES} and move "
        "the detail to a page under docs/"
    )
    ci_command = _read(os.path.join(ROOT, ".ci", "run")).strip().splitlines()[-1]
    assert f"\n    {ci_command}\n" in text, "README's test command must be .ci/run's, verbatim"
    assert "\n    pip install -e . && python scripts/train.py\n" in text


def test_every_code_fence_on_the_pages_is_closed():
    for page in _pages():
        fences = [line for line in _read(page).splitlines() if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{page}: an unclosed ``` code fence"


def test_readme_links_name_files_that_exist():
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(README)):
        if "://" in target:
            continue
        path = target.split("#", 1)[0]
        assert os.path.exists(os.path.join(ROOT, path)), f"README.md links {target}: no such file"


# ---- Commands: scripts, flags, configs ----


def _commands(text: str) -> list[list[str]]:
    """The argv after `python` of every `python scripts/<name>.py ...` command in Markdown text.

    A command inside an inline code span runs to the closing backtick (it may wrap a line);
    elsewhere (a code block) to the end of its line, after joining `\\` continuations. Shell
    comments and anything after `&&`, `|` or `;` are left out.
    """
    text = re.sub(r"\\\n", " ", text)
    commands = []
    for match in re.finditer(r"python (scripts/[\w/]+\.py)", text):
        start = match.start(1)
        if text[match.start() - 1] == "`":
            end = text.index("`", start)
        else:
            end = text.find("\n", start)
            end = len(text) if end == -1 else end
        argv = shlex.split(text[start:end].replace("\n", " "), comments=True)
        for stop in ("&&", "|", ";"):
            argv = argv[: argv.index(stop)] if stop in argv else argv
        commands.append(argv)
    return commands


# Run in a fresh interpreter (the scripts define absl flags globally): imports each absl script
# as a module and prints {script: [flag names it accepts, its default --config]}.
_FLAG_PROBE = r"""
import importlib.util, json, sys
from absl import flags
result = {}
for path in sys.argv[1:]:
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location("docs_probe_" + str(len(result)), path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    names = set(flags.FLAGS)
    bools = [n for n in names if isinstance(flags.FLAGS[n], flags.BooleanFlag)]
    default = flags.FLAGS["config"].default_unparsed if "config" in names - before else None
    result[path] = {"flags": sorted(names | {"no" + n for n in bools}), "config": default}
    for name in names - before:
        delattr(flags.FLAGS, name)
print(json.dumps(result))
"""


def _argparse_flags(path: str) -> list[str]:
    """The `--name`s a script passes to argparse's `add_argument`."""
    names = []
    for node in ast.walk(ast.parse(_read(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names += [a.value[2:] for a in node.args if isinstance(a, ast.Constant)]
    return names + ["help", "h"]


@pytest.fixture(scope="module")
def script_flags() -> dict:
    """script path (relative) -> {"flags": names, "config": default config spec or None}."""
    scripts = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    argparse_scripts = [s for s in scripts if "argparse" in _read(s)]
    absl_scripts = [s for s in scripts if s not in argparse_scripts]
    probe = subprocess.run(
        [sys.executable, "-c", _FLAG_PROBE, *absl_scripts],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    found.update({s: {"flags": _argparse_flags(s), "config": None} for s in argparse_scripts})
    return {os.path.relpath(path, ROOT): value for path, value in found.items()}


def _load_config(spec: str):
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return ConfigFileFlagParser(name="config", lock_config=False).parse(os.path.join(ROOT, spec))


def _command_problems(argv: list[str], script_flags: dict) -> list[str]:
    script, args = argv[0], argv[1:]
    if script not in script_flags:
        return [f"{script}: no such script"]
    known, problems = set(script_flags[script]["flags"]), []
    config_spec, overrides, index = script_flags[script]["config"], [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-"):
            problems.append(f"{script}: positional argument {arg!r}")
        name, has_value, value = arg.lstrip("-").partition("=")
        if name.startswith("config."):
            overrides.append(arg)
        elif name not in known:
            problems.append(f"{script}: no flag --{name}")
        if name == "config":
            config_spec = value
        if not has_value and index + 1 < len(args) and not args[index + 1].startswith("-"):
            index += 1  # `--flag value`
        index += 1
    if overrides and config_spec is None:
        problems.append(f"{script}: --config.<key> overrides, but the script has no --config")
    if config_spec is not None:
        if not os.path.exists(os.path.join(ROOT, config_spec.split(":")[0])):
            return problems + [f"{script}: no config file {config_spec}"]
        try:
            config = _load_config(config_spec)
        except Exception as error:  # noqa: BLE001 - any failure to load is the finding
            return problems + [f"{script}: --config={config_spec} does not load: {error!r}"]
        from dpo_jax.run import cli

        message = cli.unknown_key_message("config", config, overrides)
        problems += [f"{script}: {message}"] if message else []
    return problems


def test_every_script_command_names_a_script_and_flags_that_exist(script_flags):
    problems, count = [], 0
    for page in _pages():
        for argv in _commands(_read(page)):
            count += 1
            where = os.path.relpath(page, ROOT)
            problems += [
                f"{where}: {p}: {' '.join(argv)}" for p in _command_problems(argv, script_flags)
            ]
    assert count >= 30, f"only {count} commands found: is the parser still finding them?"
    assert not problems, "\n".join(problems)


def test_every_scripts_path_on_the_pages_exists():
    for page in _pages():
        for path in re.findall(r"\bscripts/[\w./-]*\w", _read(page)):
            assert os.path.exists(os.path.join(ROOT, path)), f"{page} names {path}: no such file"


def test_the_command_parser_on_hand_built_text(script_flags):
    text = (
        "Run (`python scripts/train.py\n--config.dpo.beta=0.3`, today) or\n\n"
        "    python scripts/sample.py --model=runs/default \\\n"
        '        --prompt="sort 3 1 2 =" --top_p=0.9   # a comment\n'
        "    pip install -e . && python scripts/train.py --nope=1 && pytest\n"
    )
    commands = _commands(text)
    assert commands == [
        ["scripts/train.py", "--config.dpo.beta=0.3"],
        ["scripts/sample.py", "--model=runs/default", "--prompt=sort 3 1 2 =", "--top_p=0.9"],
        ["scripts/train.py", "--nope=1"],
    ]
    assert [_command_problems(argv, script_flags) for argv in commands] == [
        [],
        [],
        ["scripts/train.py: no flag --nope"],
    ]
    (misspelled,) = _command_problems(["scripts/train.py", "--config.dpo.betta=1"], script_flags)
    assert misspelled.startswith("scripts/train.py: --config.dpo.betta: no such config key")
    assert _command_problems(["scripts/train.py", "--config=configs/nope.py"], script_flags) == [
        "scripts/train.py: no config file configs/nope.py"
    ]


# ---- The architecture page: its parts and arrows are the package's ----


def _module_imports() -> dict[str, set[str]]:
    """dpo_jax module (dotted) -> the dpo_jax modules it imports, anywhere in its code."""
    files = glob.glob(os.path.join(ROOT, "dpo_jax", "**", "*.py"), recursive=True)
    names = {
        os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"): f
        for f in files
    }

    def resolve(name: str) -> str:
        while name not in names and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    imports = {}
    for module, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(_read(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        imports[module] = {resolve(n) for n in found if n.startswith("dpo_jax")} - {module}
    return imports


def test_the_architecture_page_has_every_module_and_every_import_between_its_parts():
    text = _read(os.path.join(DOCS, "architecture.md"))
    table = text.split("| part | modules | job |", 1)[1].split("\n\n", 1)[0]
    parts = {}
    for row in table.strip().splitlines()[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        parts[cells[0]] = re.findall(r"`([\w/]+)`", cells[1])
    arrows = set(re.findall(r"^\s*(\w+) --> (\w+)\s*$", text.split("```mermaid", 1)[1], re.M))

    def part_of(module: str) -> list[str]:
        rel = module.removeprefix("dpo_jax").lstrip(".").replace(".", "/")
        return [
            part
            for part, items in parts.items()
            for item in items
            if rel == item or (item.endswith("/") and (rel + "/").startswith(item))
        ]

    imports = _module_imports()
    for module in imports:
        if module != "dpo_jax":
            assert len(part_of(module)) == 1, f"{module} is in parts {part_of(module)}: need one"
    edges = {}
    for module, targets in imports.items():
        for target in targets - {"dpo_jax"}:
            if module != "dpo_jax" and part_of(module) != part_of(target):
                edges.setdefault((part_of(module)[0], part_of(target)[0]), f"{module} -> {target}")
    missing = [
        f"{a} --> {b} ({why})" for (a, b), why in sorted(edges.items()) if (a, b) not in arrows
    ]
    assert not missing, "docs/architecture.md's diagram lacks these arrows:\n" + "\n".join(missing)
    stale = sorted(arrows - set(edges))
    assert not stale, f"docs/architecture.md draws imports that no module makes: {stale}"


# ---- The site, built strictly, with the notebooks executed ----


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """The built site's directory; the build fails the tests if mkdocs warns at all."""
    site_dir = str(tmp_path_factory.mktemp("site"))
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, DPO_JAX_DOCS_EXECUTE="true", NO_MKDOCS_2_WARNING="1"),
        timeout=1800,
    )
    log = build.stdout + build.stderr
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    return site_dir


def _page_text(site: str, page: str) -> str:
    return html.unescape(_read(os.path.join(site, page, "index.html")))


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, names",
    [
        ("losses", ["dpo_loss_fn", "policy_chosen_logps", "LOSS_VARIANTS"]),
        ("logprobs", ["logprob_fn", "next_token_targets"]),
        ("step", ["update_fn", "eval_fn", "TrainState"]),
        ("reference", ["reference_logps", "FrozenReference", "AdaptersOffReference"]),
        ("sampling", ["generate", "SamplingOptions"]),
        ("evaluation", ["sequence_kl", "exact_match_rate", "win_rate"]),
    ],
)
def test_the_api_pages_render_the_docstrings(site, module, names):
    text = _page_text(site, f"api/{module}")
    for name in names:
        assert name in text, f"api/{module}: {name} is not on the page"


@pytest.mark.slow
def test_the_notebook_pages_show_their_plots_and_printed_results(site):
    for page, printed in [
        ("notebooks/derivation", ["KL(π_θ ‖ π*) with infinite data:"]),
        (
            "notebooks/quickstart",
            ["before: ", "after: ", "held-out rewards/accuracies before -> after:"],
        ),
    ]:
        text = _page_text(site, page)
        plots = re.findall(
            r'<div class="jp-RenderedImage[^>]*>\s*<img[^>]*src="data:image/png', text
        )
        assert plots, f"{page}: no plot among the cells' outputs"
        for line in printed:
            assert line in text, f"{page}: {line!r} is not in the executed output"


@pytest.mark.slow
def test_readme_anchors_into_the_docs_exist(site):
    for target in re.findall(r"\]\(docs/([^)\s#]+)\.md#([^)\s]+)\)", _read(README)):
        page, anchor = target
        page_dir = "" if page == "index" else page
        assert f'id="{anchor}"' in _page_text(site, page_dir), f"README: docs/{page}.md#{anchor}"
