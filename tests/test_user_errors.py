"""The errors a new user meets first, each one line from the real scripts: a misspelled config
key on the command line, a chat template that asks for too much, a full disk as the workdir."""

import json
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from tiny_tokenizers import make_word_tokenizer  # noqa: E402

from dpo_jax.run import errors  # noqa: E402
from dpo_jax.tokenizer import Tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The scripts that take a config flag (`dpo_jax.run.cli.define_config_file`).
CONFIG_SCRIPTS = sorted(
    path.name
    for path in (ROOT / "scripts").glob("*.py")
    if "define_config_file(" in path.read_text()
)


def _script(name, *flags, timeout=120, preexec_fn=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *flags],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
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


HUGE_RANGE = "{% for i in range(10**9) %}{{ i }}{% endfor %}"
CONVERSATION = {
    "prompt": [{"role": "user", "content": "a"}],
    "chosen": [{"role": "assistant", "content": "b"}],
    "rejected": [{"role": "assistant", "content": "c"}],
}


def _tokenizer_dir(path, config, template_file=None):
    path.mkdir()
    make_word_tokenizer().backend.save(str(path / "tokenizer.json"))
    tokens = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": 1}
    (path / "tokenizer_config.json").write_text(json.dumps({**tokens, **config}))
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file)
    return path


def test_a_template_the_sandbox_refuses_is_one_line_naming_its_file(tmp_path):
    # jinja2's sandbox refuses range(10**9) with an OverflowError: a 19-frame traceback before.
    tokenizer = _tokenizer_dir(tmp_path / "tok", {"chat_template": HUGE_RANGE})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text((json.dumps(CONVERSATION) + "\n") * 16)
    process = _script(
        "train.py",
        "--config=configs/default.py:tiny",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.tokenizer={tokenizer}",
        f"--config.data.source={pairs}",
        "--config.data.eval_source=",
        timeout=300,
    )
    assert process.returncode == 1
    assert process.stderr.splitlines() == [
        f"error: {pairs}:1: the chat template (from {tokenizer}/tokenizer_config.json's "
        "chat_template) was refused while rendering: Range too big. The sandbox blocks ranges "
        "larger than MAX_RANGE (100000).",
        "(run with --verbose for the traceback)",
    ], process.stderr


@pytest.mark.parametrize("in_file", [False, True])
def test_a_template_error_names_the_file_it_came_from(tmp_path, in_file):
    if in_file:  # chat_template.jinja: used when tokenizer_config.json has no template
        path = _tokenizer_dir(tmp_path / "tok", {}, "{{ range(10**6) | list }}")
        expected = (
            f"the chat template (from {path}/chat_template.jinja) was refused while rendering: "
            "Range too big"
        )
    else:
        path = _tokenizer_dir(tmp_path / "tok", {"chat_template": "{{ messages[0].content }"})
        expected = (
            f"the chat template (from {path}/tokenizer_config.json's chat_template) has a "
            "syntax error at line 1"
        )
    with pytest.raises(ValueError, match=re.escape(expected)):
        Tokenizer.from_dir(path).apply_chat_template(CONVERSATION["prompt"])


def _cap_file_size(limit_bytes):
    """For the child: files over `limit_bytes` refused (EFBIG, SIGXFSZ ignored), for every
    library that writes, as a full disk refuses them (ENOSPC)."""

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return cap


@pytest.fixture
def small_filesystem(tmp_path):
    """(directory, mounted): a 192 KiB tmpfs mounted there where this process may mount (root:
    CI, the sandbox), else a plain directory, to be written under `_cap_file_size`."""
    directory = tmp_path / "small"
    directory.mkdir()
    try:
        mount = ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(directory)]
        mounted = subprocess.run(mount, capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    yield directory, mounted
    if mounted:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_as_the_workdir_is_one_line_naming_it(small_filesystem):
    # Before: orbax's RESOURCE_EXHAUSTED (or an OSError naming no file), after 70-127 frames of
    # tracebacks from orbax's threads, tensorstore's callbacks and tensorboardX's exit hook.
    directory, mounted = small_filesystem
    workdir = directory / "run"
    process = _script(
        "train.py",
        "--config=configs/default.py:tiny",
        "--config.sft.num_steps=0",  # the DPO stage's first checkpoint fills it
        f"--workdir={workdir}",
        timeout=300,
        preexec_fn=None if mounted else _cap_file_size(16 * 1024),
    )
    assert process.returncode == 1
    reason, remedy = (
        ("no space left on the device", "free some space")
        if mounted
        else ("file too large for the file-size limit (ulimit -f)", "raise the limit")
    )
    # The checkpoint being written, or (a metrics flush, which names no file) the workdir.
    line = (
        rf"error: {re.escape(reason)}: {workdir}(/dpo/checkpoints)?; {remedy} and rerun to resume"
    )
    assert re.fullmatch(rf"{line}\n\(run with --verbose for the traceback\)\n", process.stderr), (
        process.stderr
    )


@pytest.mark.parametrize(
    "raised, message",
    [
        (OSError(28, "No space left on device"), "no space left on the device: /w; free some"),
        (  # tensorstore's, as orbax re-raises it
            ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']"),
            "no space left on the device: /w; free some",
        ),
        (OSError(122, "Disk quota exceeded"), "disk quota exceeded: /w; free some"),
        (  # a file named by the error is kept
            OSError(28, "No space left on device", "/w/run_config.json"),
            "no space left on the device: /w/run_config.json; free some",
        ),
    ],
)
def test_a_write_refused_for_room_names_the_directory(raised, message):
    with pytest.raises(OSError) as caught, errors.naming_full_disk("/w"):
        raise raised
    assert errors.user_message(caught.value).startswith(message)
    assert (
        errors.user_message(ValueError("RESOURCE_EXHAUSTED: quota")) == "RESOURCE_EXHAUSTED: quota"
    )
