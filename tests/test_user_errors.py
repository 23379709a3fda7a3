"""The errors a new user meets first, each one line from the real scripts: a misspelled config
key on the command line, a chat template that asks for too much, a full disk as the workdir."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The scripts that take a config flag (`dpo_jax.cli.define_config_file`).
CONFIG_SCRIPTS = sorted(
    path.name
    for path in (ROOT / "scripts").glob("*.py")
    if "define_config_file(" in path.read_text()
)


def _script(name, *flags, timeout=120):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *flags],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_config_script_parses_its_flags_through_the_one_line_handler():
    texts = {name: (ROOT / "scripts" / name).read_text() for name in CONFIG_SCRIPTS}
    bypassing = [n for n, text in texts.items() if "config_flags" in text or "app.run(" in text]
    assert "train.py" in CONFIG_SCRIPTS and bypassing == []
    assert all("cli.run(main)" in text for text in texts.values())
    others = [p for p in (ROOT / "scripts").glob("*.py") if p.name not in CONFIG_SCRIPTS]
    assert not [p.name for p in others if "config_flags" in p.read_text()]


@pytest.mark.parametrize("script", CONFIG_SCRIPTS)
def test_an_unknown_config_key_is_one_line_naming_it_and_the_nearest(script):
    # No --config: ml_collections raises while the flag is defined, as the script is imported
    # (plan.py has no default config: given one, it raises while absl parses the flags).
    given = ["--config=configs/default.py"] if script == "plan.py" else []
    process = _script(script, *given, "--config.no_such_key=1")
    assert process.returncode == 1
    assert len(process.stderr.splitlines()) == 1, process.stderr
    assert process.stderr.startswith(
        "error: --config.no_such_key: no such config key; nearest: --config."
    ), process.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        (  # --config given: raised while absl parses the flags
            "--config.dpo.bta=1",
            "error: --config.dpo.bta: no such config key; nearest: --config.dpo.beta, ",
        ),
        (
            "--config.beta=0.3",
            "error: --config.beta: no such config key; nearest: --config.dpo.beta",
        ),
        (  # a bad value was one line already (absl's), and stays so
            "--config.dpo.beta=abc",
            "FATAL Flags parsing error: flag --config.dpo.beta=abc: could not convert string to "
            "float: 'abc'",
        ),
    ],
)
def test_a_bad_override_of_a_given_config_is_one_line(override, message):
    process = _script("train.py", "--config=configs/default.py:tiny", override)
    assert process.returncode == 1
    assert process.stderr.splitlines()[0].startswith(message), process.stderr
    assert "Traceback" not in process.stderr
