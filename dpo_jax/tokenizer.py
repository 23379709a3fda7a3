"""Text <-> token ids through `tokenizers`; chat templates rendered as transformers renders them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The roles chat templates render (transformers' and the model families' templates).
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "ipython", "function"})
_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Newer transformers versions save the chat template beside tokenizer_config.json.
_CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a model was trained with.

    Attributes:
      bos_id: id of the beginning-of-sequence token, or None if the tokenizer has none.
      eos_id: id of the end-of-sequence token, or None if the tokenizer has none.
      pad_id: id used for padding: the pad token, else the eos token, else 0. Padding is also
        marked by `segment_ids == 0`, so its value never reaches the loss.
      add_bos: whether a sequence should start with `bos_id` (the data pipeline adds it; `encode`
        never does).
      vocab_size: number of ids the tokenizer can produce (added tokens included).
      chat_template: the jinja2 chat template, or None.
      chat_template_source: where the template came from (a file and its key), for errors.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        chat_template_source: str = "Tokenizer(chat_template=...)",
    ):
        """Wraps `backend`.

        Args:
          backend: the `tokenizers.Tokenizer` that maps text to ids.
          bos_token, eos_token, pad_token, unk_token: special token strings (each must be in the
            vocabulary) or None.
          add_bos: whether sequences start with the bos token.
          chat_template: a jinja2 chat template, or None.
          chat_template_source: where it came from, as its errors name it (e.g.
            "/m/tokenizer_config.json's chat_template").

        Raises:
          ValueError: a special token is not in the vocabulary, or add_bos without a bos token.
        """
        self.backend = backend
        self.special_tokens = {
            name: token
            for name, token in (
                ("bos_token", bos_token),
                ("eos_token", eos_token),
                ("pad_token", pad_token),
                ("unk_token", unk_token),
            )
            if token is not None
        }
        ids = {}
        for name, token in self.special_tokens.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{name}={token!r} is not in the tokenizer's vocabulary")
            ids[name] = token_id
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.unk_id: int | None = ids.get("unk_token")
        self.pad_id: int = ids.get("pad_token", self.eos_id if self.eos_id is not None else 0)
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos token")
        self.add_bos = bool(add_bos)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        self._compiled_template: jinja2.Template | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added (no bos, no eos)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept unless `skip_special_tokens`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **extra: Any,
    ) -> str:
        """Renders a conversation with the chat template, as transformers' `apply_chat_template`
        with `tokenize=False` does.

        The template sees `messages`, `add_generation_prompt`, `tools=None`, `documents=None`,
        the special token strings (`bos_token`, `eos_token`, ...) and `extra`, which overrides
        them.

        Args:
          messages: a list of dicts, each with at least 'role' and 'content'.
          add_generation_prompt: whether to append the prompt that opens the assistant's turn.
          **extra: further variables for the template.

        Returns:
          The rendered text; tokenise it with `encode` (it usually already holds the bos token).

        Raises:
          ValueError: no chat template, a message without 'role' or 'content' or with a role
            outside CHAT_ROLES, a template syntax error, a template that recursed forever, or
            one that asked for more than the sandbox allows (a range over 100000 items) or than
            memory holds; each names the template's source.
          jinja2.TemplateError: the template raised (e.g. through `raise_exception`).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        _check_messages(messages)
        template = f"the chat template (from {self.chat_template_source})"
        if self._compiled_template is None:
            try:
                self._compiled_template = _compile_chat_template(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(
                    f"{template} has a syntax error at line {e.lineno}: {e.message}"
                ) from None
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except RecursionError:
            raise ValueError(
                f"{template} recursed without end while rendering (a macro that calls itself?)"
            ) from None
        # The sandbox refuses a range over MAX_RANGE items with OverflowError; a string or list
        # repeated past memory is a MemoryError. Neither is the data's fault: name the template.
        except OverflowError as e:
            raise ValueError(f"{template} was refused while rendering: {e}") from None
        except MemoryError:
            raise ValueError(
                f"{template} asked for more memory than there is while rendering"
            ) from None

    @classmethod
    def from_transformers(cls, hf_tokenizer: Any) -> Tokenizer:
        """Wraps a transformers fast tokenizer (as TRL users hold one), with no files written.

        The backend is a copy of `hf_tokenizer.backend_tokenizer` (padding and truncation
        settings that transformers keeps on it do not carry over); the special tokens and the
        chat template are the tokenizer's own. add_bos is what the tokenizer itself does: whether
        its `encode` (with special tokens) starts with bos; without `encode`, its
        `add_bos_token`, else whether its post-processor adds bos (as `from_dir` decides).
        transformers is not imported here: any object with these attributes works.

        Raises:
          TypeError: `hf_tokenizer` is not a fast (`tokenizers`-backed) tokenizer.
          ValueError: a special token is not in the vocabulary.
        """
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                f"Tokenizer.from_transformers needs a fast tokenizer with a `backend_tokenizer`, "
                f"found {type(hf_tokenizer).__name__} (load it with use_fast=True)"
            )
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        tokens = {
            name: getattr(hf_tokenizer, name, None)
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        template = getattr(hf_tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: transformers uses "default"
            template = template.get("default")
        source = f"the {type(hf_tokenizer).__name__}'s chat_template"
        tokenizer = cls(
            backend, **tokens, add_bos=False, chat_template=template, chat_template_source=source
        )
        add_bos = _adds_bos(hf_tokenizer, backend, tokenizer.bos_id)
        if add_bos and tokenizer.bos_id is None:
            raise ValueError("add_bos_token is true but the tokenizer has no bos_token")
        tokenizer.add_bos = bool(add_bos)
        return tokenizer

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads `tokenizer.json` and `tokenizer_config.json` from a Hugging Face model directory.

        Special tokens, `add_bos_token` and `chat_template` come from `tokenizer_config.json`
        (`chat_template.jinja` is used when the config has no template). When the config does not
        say `add_bos_token`, it is taken from whether `tokenizer.json`'s post-processor adds bos,
        which is what transformers' fast tokenizers do.

        Raises:
          FileNotFoundError: a file is missing (the error names its path).
          ValueError: the config is malformed or names a token not in the vocabulary.
        """
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, _TOKENIZER_FILE)
        config_file = os.path.join(path, _TOKENIZER_CONFIG_FILE)
        for file in (tokenizer_file, config_file):
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{file}: no such file (a tokenizer directory needs both "
                    f"{_TOKENIZER_FILE} and {_TOKENIZER_CONFIG_FILE})"
                )
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(
                f"{config_file}: expected a JSON object, found {type(config).__name__}"
            )
        tokens = {
            name: _token_content(config.get(name), f"{config_file}: {name}")
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        chat_template, source = _read_chat_template(config, config_file, path)
        tokenizer = cls(
            backend,
            **tokens,
            add_bos=False,
            chat_template=chat_template,
            chat_template_source=source,
        )
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            with_special = backend.encode("", add_special_tokens=True).ids
            add_bos = tokenizer.bos_id is not None and with_special[:1] == [tokenizer.bos_id]
        if add_bos and tokenizer.bos_id is None:
            raise ValueError(f"{config_file}: add_bos_token is true but there is no bos_token")
        tokenizer.add_bos = add_bos
        return tokenizer


def check_tokenizer_fits(tokenizer: Tokenizer, config: Any) -> None:
    """Checks that every id the tokenizer can produce has a row in the model's embedding.

    Models may have more embedding rows than the tokenizer has tokens (padded vocabularies);
    never fewer.

    Args:
      tokenizer: the tokenizer.
      config: the model config (anything with an int `vocab_size`).

    Raises:
      ValueError: the tokenizer's vocabulary is larger than the model's (both sizes named).
    """
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer vocabulary size {tokenizer.vocab_size} does not fit the model's "
            f"vocab_size {config.vocab_size} (ids >= {config.vocab_size} would have no embedding)"
        )


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, found {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', "
                f"found {type(message).__name__}"
            )
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(
                f"messages[{index}] has no {' or '.join(repr(k) for k in missing)} "
                f"(found keys: {sorted(message)})"
            )
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"messages[{index}] has role {message['role']!r}; chat templates know "
                f"{sorted(CHAT_ROLES)}"
            )


def _token_content(value: Any, where: str) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a string or {{'content': str}}, found {value!r}")


def _read_chat_template(config: dict, config_file: str, path: str) -> tuple[str | None, str]:
    """(the template or None, where it came from: the file and key, as errors name it)."""
    template = config.get("chat_template")
    source = f"{config_file}'s chat_template"
    if template is None:
        template_file = os.path.join(path, _CHAT_TEMPLATE_FILE)
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                return f.read(), template_file
        return None, source
    if isinstance(template, str):
        return template, source
    # A list of named templates; transformers uses the one named "default".
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], f"{source} named 'default'"
        raise ValueError(
            f"{config_file}: chat_template is a list without a 'default' entry "
            f"(found names: {sorted(map(str, named))})"
        )
    raise ValueError(f"{config_file}: chat_template must be a string or a list, found {template!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used to mark assistant text for masks)
    and renders its body unchanged, as transformers does when it is not tracking indices."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _compile_chat_template(chat_template: str) -> jinja2.Template:
    """Compiles a template in the environment transformers uses: sandboxed (a template from a
    model file cannot reach Python), trim_blocks and lstrip_blocks, loop controls, and the same
    `raise_exception`, `strftime_now` and `tojson` helpers."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(chat_template)


def _adds_bos(hf_tokenizer: Any, backend: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether `hf_tokenizer` starts a sequence with bos, as it does it rather than as it says:
    transformers 5's TokenizersBackend reports `add_bos_token=False` for a tokenizer.json whose
    post-processor adds bos, and its own `encode` adds it (4.57's PreTrainedTokenizerFast has no
    such attribute; its Llama tokenizer keeps the attribute and the post-processor in step)."""
    encode = getattr(hf_tokenizer, "encode", None)
    if callable(encode):
        with_special = list(encode("", add_special_tokens=True))
    elif getattr(hf_tokenizer, "add_bos_token", None) is not None:
        return bool(hf_tokenizer.add_bos_token)
    else:
        with_special = backend.encode("", add_special_tokens=True).ids
    return bos_id is not None and with_special[:1] == [bos_id]
