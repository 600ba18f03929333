"""Conversation templates and the ONE prompt renderer.

Promises:
- `render(messages, template, tokenizer)` turns a conversation into `input_ids` and `labels` in one pass: the
  text is built once, tokenized once (with character offsets), and a token is a label iff its character span lies
  inside an assistant reply span (reply + end-of-turn marker). Masking is correct by construction; nothing is
  re-tokenized and counted.
- Every front end (training, CLI, web UI, worker, OpenAI server) calls `render` / `render_text`; nothing else
  formats turns.
- `to_jinja(template)` is a Hugging Face chat template that produces exactly `render(...).text`.
- `<image>` marks where an image goes; it is one token of the tokenizer, and `render` can expand it to the number
  of feature tokens each image yields (a count mismatch raises `ImageCountError`). `<video>` (a `video` /
  `video_url` part) marks a video the same way, for models with a video token (LLaVA-OneVision).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IGNORE_INDEX = -100

# Roles of the LLaVA data files ({"from": "human"|"gpt", "value": ...}) and their chat equivalents.
_ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_IMAGE_PART_TYPES = ("image", "image_url")
_VIDEO_PART_TYPES = ("video", "video_url")
# Content parts are joined with a newline, so [image, text] gives LLaVA's "<image>\nQuestion".
_PART_SEPARATOR = "\n"


class TemplateError(ValueError):
    """Unknown template, duplicate registration, or a conversation the template cannot render."""


class ImageCountError(ValueError):
    """The number of `<image>` markers differs from the number of images (or image token counts) given."""


class TokenizerError(ValueError):
    """The tokenizer cannot be used by the renderer (not a fast tokenizer, or no single `<image>` token)."""


@dataclass(frozen=True)
class Template:
    """How one model family lays out a conversation. Every string here is literal text of the prompt.

    Layout: bos + [system block] + for each exchange: user_prefix + user + user_suffix
    + assistant_prefix + reply_lead + reply + assistant_suffix. The system block is
    system_prefix + system + system_suffix, omitted when the system text is empty; with `system_in_first_user`
    it sits right after the first user_prefix (llama-2 style). Labels cover reply_lead + reply + assistant_suffix,
    so reply_lead holds the separator that BPE/sentencepiece tokenizers glue to the reply's first word
    (the " " of "ASSISTANT: A"), which keeps the reply start on a token boundary.
    """

    name: str
    system: str = ""
    bos: str = ""
    system_prefix: str = ""
    system_suffix: str = ""
    system_in_first_user: bool = False
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    reply_lead: str = ""
    assistant_suffix: str = ""
    stop_strings: tuple[str, ...] = ()
    supports_system: bool = True  # False: a system message is an error (stage-1 `plain`)
    user_images_only: bool = False  # True: a user turn renders as its `<image>` markers only (stage-1 `plain`)

    def __post_init__(self) -> None:
        if not self.name:
            raise TemplateError("a template needs a non-empty name")
        if not isinstance(self.stop_strings, tuple):
            raise TemplateError(f"template {self.name!r}: stop_strings must be a tuple, got {self.stop_strings!r}")


_REGISTRY: dict[str, Template] = {}
TEMPLATES: Mapping[str, Template] = MappingProxyType(_REGISTRY)


def register_template(t: Template) -> None:
    """Add a template under its exact name; a duplicate name is an error."""
    if t.name in _REGISTRY:
        raise TemplateError(f"template {t.name!r} is already registered")
    _REGISTRY[t.name] = t


def get_template(name: str) -> Template:
    """The template registered under exactly `name`."""
    if name not in _REGISTRY:
        raise TemplateError(f"unknown template {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _resolve(template: Template | str) -> Template:
    return get_template(template) if isinstance(template, str) else template


def _builtin_templates() -> tuple[Template, ...]:
    """The shipped templates; strings follow the original LLaVA (conversation.py of haotian-liu/LLaVA v1.2.2)."""
    vicuna = dict(
        bos="<s>", system_suffix=" ", user_prefix="USER: ", user_suffix=" ",
        assistant_prefix="ASSISTANT:", reply_lead=" ", assistant_suffix="</s>", stop_strings=("</s>",),
    )
    llama_2 = dict(
        system_prefix="<<SYS>>\n", system_suffix="\n<</SYS>>\n\n", system_in_first_user=True,
        user_suffix=" [/INST]", reply_lead=" ", assistant_suffix=" </s>", stop_strings=("</s>",),
    )
    return (
        Template("vicuna_v1", system="A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.", **vicuna),
        Template("llava_v1", system="A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.", **vicuna),
        # llama-2 opens every exchange with <s>, so the BOS lives in user_prefix rather than `bos`.
        Template("llava_llama_2", system="You are a helpful language and vision assistant. You are able to "
                 "understand the visual content that the user provides, and assist the user with a variety of tasks "
                 "using natural language.", user_prefix="<s>[INST] ", **llama_2),
        Template("mistral_instruct", bos="<s>", user_prefix="[INST] ", **llama_2),
        Template("chatml_direct", system="Answer the questions.",
                 system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>",
                 user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>",
                 assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>",
                 stop_strings=("<|im_end|>",)),
        Template("llama3", bos="<|begin_of_text|>",
                 system_prefix="<|start_header_id|>system<|end_header_id|>\n\n", system_suffix="<|eot_id|>",
                 user_prefix="<|start_header_id|>user<|end_header_id|>\n\n", user_suffix="<|eot_id|>",
                 assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
                 assistant_suffix="<|eot_id|>", stop_strings=("<|eot_id|>",)),
        # LLaVA-NeXT's conv_qwen (LLaVA-OneVision, LLaVA-NeXT-Interleave): ChatML with a newline after each turn.
        Template("qwen_1_5", system="You are a helpful assistant.",
                 system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
                 user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
                 assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n",
                 stop_strings=("<|im_end|>",)),
        # Stage 1: "<image>" + caption + "\n"; the caption and its newline are the target.
        Template("plain", assistant_suffix="\n", stop_strings=("\n",), supports_system=False,
                 user_images_only=True),
    )


for _builtin in _builtin_templates():
    register_template(_builtin)
del _builtin


# ----------------------------------------------------------------------------------------------- messages


def _content_text(content: object, where: str) -> str:
    """A message's content as one string with `<image>` markers (str passes through; parts are joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise TemplateError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in _IMAGE_PART_TYPES:
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind in _VIDEO_PART_TYPES:
            pieces.append(VIDEO_PLACEHOLDER)
        else:
            raise TemplateError(f"{where}: content part {part!r} is neither text nor image/image_url nor video/video_url")
    return _PART_SEPARATOR.join(pieces)


def normalize_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as [{"role": system|user|assistant, "content": str}], validated.

    Accepts role/content (content str with `<image>` markers, or OpenAI/HF parts) and LLaVA's from/value with
    human/gpt. Order: an optional leading system message, then user and assistant alternating from user.
    """
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TemplateError(f"message {i} must be a mapping, got {type(msg).__name__}")
        raw_role = msg.get("role", msg.get("from"))
        if raw_role not in _ROLE_ALIASES:
            raise TemplateError(f"message {i}: unknown role {raw_role!r}; valid: {', '.join(_ROLE_ALIASES)}")
        content = msg["content"] if "content" in msg else msg.get("value")
        out.append({"role": _ROLE_ALIASES[raw_role], "content": _content_text(content, f"message {i}")})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    if not turns:
        raise TemplateError("a conversation needs at least one user message")
    first = len(out) - len(turns)  # index of the first user message
    for j, msg in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise TemplateError(
                f"message {first + j} has role {msg['role']!r} but {expected!r} was expected: "
                "after an optional leading system message, user and assistant must alternate, starting with user"
            )
    return out


# ----------------------------------------------------------------------------------------------- rendering


def _build(messages: Sequence[Mapping], t: Template, add_generation_prompt: bool):
    """(text, reply spans, number of image markers). Spans are [start, end) character ranges to label."""
    msgs = normalize_messages(messages)
    system = t.system
    if msgs[0]["role"] == "system":
        if not t.supports_system:
            raise TemplateError(f"template {t.name!r} has no system prompt, but the conversation has one")
        system, msgs = msgs[0]["content"], msgs[1:]
    if add_generation_prompt and msgs[-1]["role"] != "user":
        raise TemplateError("add_generation_prompt=True needs the last message to be from the user")
    sys_block = t.system_prefix + system + t.system_suffix if system else ""

    parts = [t.bos] + ([] if t.system_in_first_user else [sys_block])
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(msgs):
        content = msg["content"]
        if msg["role"] == "user":
            if t.user_images_only:
                content = IMAGE_PLACEHOLDER * content.count(IMAGE_PLACEHOLDER)
            lead = sys_block if (t.system_in_first_user and i == 0) else ""
            parts.append(t.user_prefix + lead + content + t.user_suffix)
        else:
            parts.append(t.assistant_prefix)
            start = sum(map(len, parts))
            parts.append(t.reply_lead + content + t.assistant_suffix)
            spans.append((start, start + len(parts[-1])))
    if add_generation_prompt:
        parts.append(t.assistant_prefix)
    text = "".join(parts)
    return text, spans, text.count(IMAGE_PLACEHOLDER)


def render_text(messages: Sequence[Mapping], template: Template | str, *, add_generation_prompt: bool = False) -> str:
    """The prompt text alone (what `to_jinja` also produces); for callers that send text, not ids."""
    return _build(messages, _resolve(template), add_generation_prompt)[0]


# layouts `parse_prompt` recognises, most distinctive markers first (vicuna's "USER:" last)
_PARSE_ORDER = ("llama3", "chatml_direct", "llava_llama_2", "vicuna_v1")


def _marker(text: str, t: Template) -> str:
    return (text.removeprefix(t.bos) if t.bos else text).replace("<s>", "").strip()


def _detect(prompt: str) -> Template | None:
    for name in _PARSE_ORDER:
        t = _REGISTRY[name]
        user = _marker(t.user_prefix, t)
        answer = _marker(t.assistant_prefix, t) or _marker(t.user_suffix, t)
        if user and user in prompt and answer in prompt:
            return t
    return None


def parse_prompt(prompt: str, template: Template | str | None = None) -> list[dict[str, str]]:
    """The messages of an already rendered prompt: the inverse of `render_text(..., add_generation_prompt=True)`,
    tolerant of whitespace between blocks and of a missing BOS (prompts written by other programs). For a worker
    that forwards LLaVA's templated prompts to a chat-completions engine. Without `template` the layout is
    detected from its markers (llama3, ChatML, [INST], USER:/ASSISTANT:); a prompt in none of them is one user
    message. `<image>` markers stay where they are."""
    t = _resolve(template) if template is not None else _detect(prompt)
    if t is None or not _marker(t.user_prefix, t):
        return [{"role": "user", "content": prompt.strip()}]
    user_mark = _marker(t.user_prefix, t)
    answer = re.compile(re.escape(_marker(t.user_suffix, t)) + r"\s*" + re.escape(_marker(t.assistant_prefix, t)))
    sys_open, sys_close = t.system_prefix.strip(), t.system_suffix.strip()
    reply_end = t.assistant_suffix.strip()
    head, *turns = prompt.split(user_mark)
    messages: list[dict[str, str]] = []
    system = _marker(head, t) if not t.system_in_first_user else ""
    for i, turn in enumerate(turns):
        found = answer.search(turn)
        user, reply = (turn[: found.start()], turn[found.end() :]) if found else (turn, "")
        user = user.strip()
        if t.system_in_first_user and i == 0 and sys_open and user.startswith(sys_open):
            system, _, user = user[len(sys_open) :].partition(sys_close)
            user = user.strip()
        messages.append({"role": "user", "content": user})
        reply = reply.strip().replace("<s>", "").strip()
        if reply_end and reply.endswith(reply_end):
            reply = reply[: -len(reply_end)].rstrip()
        if reply:
            messages.append({"role": "assistant", "content": reply})
    system = system.strip()
    if sys_open and system.startswith(sys_open):
        system = system[len(sys_open) :]
    if sys_close and system.endswith(sys_close):
        system = system[: -len(sys_close)]
    if system.strip():
        messages.insert(0, {"role": "system", "content": system.strip()})
    return messages


@dataclass
class Rendered:
    """One rendered conversation; input_ids/labels are after `<image>` expansion, `text` before it."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX (-100) everywhere except assistant reply tokens
    text: str
    num_images: int
    num_videos: int = 0


def image_token_id(tokenizer) -> int:
    """The id the tokenizer gives `<image>`: `tokenizer.image_token_id`, else `<image>` in the vocab."""
    tid = getattr(tokenizer, "image_token_id", None)
    if tid is None and IMAGE_PLACEHOLDER in tokenizer.get_vocab():
        tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if tid is None:
        raise TokenizerError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token (no image_token_id, not in vocab)")
    return tid


def video_token_id(tokenizer) -> int:
    """The id the tokenizer gives `<video>`: `tokenizer.video_token_id`, else `<video>` in the vocab."""
    tid = getattr(tokenizer, "video_token_id", None)
    if tid is None and VIDEO_PLACEHOLDER in tokenizer.get_vocab():
        tid = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
    if tid is None:
        raise TokenizerError(f"the tokenizer has no {VIDEO_PLACEHOLDER} token: this model takes videos as frames "
                             f"(images)")
    return tid


def media_order(text: str) -> list[str]:
    """"image" / "video" for each marker of a rendered text, in prompt order."""
    return ["image" if m == IMAGE_PLACEHOLDER else "video"
            for m in re.findall(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}", text)]


def videos_as_images(messages: Sequence[Mapping], frame_counts: Sequence[int]) -> list[dict]:
    """Messages (normalized) with the i-th `<video>` marker replaced by frame_counts[i] `<image>` markers: how a
    model without a video token reads a video (its frames as images, in order)."""
    msgs = normalize_messages(messages)
    counts = iter(frame_counts)
    total = sum(m["content"].count(VIDEO_PLACEHOLDER) for m in msgs)
    if total != len(frame_counts):
        raise ImageCountError(f"the conversation has {total} {VIDEO_PLACEHOLDER} marker(s) but {len(frame_counts)} "
                              f"video(s) were given")
    for m in msgs:
        pieces = m["content"].split(VIDEO_PLACEHOLDER)
        m["content"] = pieces[0] + "".join(IMAGE_PLACEHOLDER * next(counts) + p for p in pieces[1:])
    return msgs


def render(
    messages: Sequence[Mapping],
    template: Template | str,
    tokenizer,
    *,
    image_token_counts: Sequence[int] | None = None,
    video_token_counts: Sequence[int] | None = None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Token ids and labels of a conversation; see the module docstring for the contract.

    With `image_token_counts`, the i-th `<image>` token is repeated counts[i] times (the number of feature
    tokens image i yields); labels there are -100. `video_token_counts` does the same for `<video>`.
    """
    t = _resolve(template)
    text, spans, num_images = _build(messages, t, add_generation_prompt)
    num_videos = text.count(VIDEO_PLACEHOLDER)
    for marker, n, counts, what in ((IMAGE_PLACEHOLDER, num_images, image_token_counts, "image"),
                                     (VIDEO_PLACEHOLDER, num_videos, video_token_counts, "video")):
        if counts is not None and len(counts) != n:
            raise ImageCountError(
                f"the conversation has {n} {marker} marker(s) but {len(counts)} {what}(s)/token count(s) were given"
            )
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"render() needs a fast tokenizer (character offsets), got {type(tokenizer).__name__}"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [tid if _inside(off, spans) else IGNORE_INDEX for tid, off in zip(ids, offsets)]
    if num_images == 0 and num_videos == 0:
        return Rendered(ids, labels, text, 0)

    counts_by_id = {}
    for marker, n, counts, token_of in ((IMAGE_PLACEHOLDER, num_images, image_token_counts, image_token_id),
                                        (VIDEO_PLACEHOLDER, num_videos, video_token_counts, video_token_id)):
        if not n:
            continue
        tid = token_of(tokenizer)
        found = sum(1 for i in ids if i == tid)
        if found != n:
            raise TokenizerError(
                f"{n} {marker} marker(s) in the text became {found} token(s) (id {tid}); the tokenizer must "
                f"encode {marker} as one special token"
            )
        counts_by_id[tid] = iter(counts if counts is not None else [1] * n)
    positions = [i for i, tid in enumerate(ids) if tid in counts_by_id]
    counts = [next(counts_by_id[ids[p]]) for p in positions]
    return Rendered(*_expand_images(ids, labels, positions, counts), text, num_images, num_videos)


def _inside(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    # A token straddling a span start (e.g. "ASSISTANT:" + " A" merged) is not a label: its start is before it.
    start, end = offset
    return any(s <= start and end <= e for s, e in spans)


def _expand_images(ids: list[int], labels: list[int], positions: list[int], counts: Sequence[int]):
    """Repeat the image token at each position counts[i] times (labels -100)."""
    new_ids: list[int] = []
    new_labels: list[int] = []
    prev = 0
    for pos, n in zip(positions, counts):
        if n < 1:
            raise ImageCountError(f"an image must yield at least one token, got a count of {n}")
        new_ids += ids[prev:pos] + [ids[pos]] * n
        new_labels += labels[prev:pos] + [IGNORE_INDEX] * n
        prev = pos + 1
    return new_ids + ids[prev:], new_labels + labels[prev:]


def stop_token_ids(template: Template | str, tokenizer) -> list[int]:
    """Ids that end generation: the tokenizer's EOS plus each stop string that is a single token."""
    t = _resolve(template)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for s in t.stop_strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) == 1:
            ids.append(enc[0])
    return list(dict.fromkeys(ids))


# ----------------------------------------------------------------------------------------------- Jinja export

# The body mirrors `_build` line for line; `to_jinja` prepends the template's strings as constants.
_JINJA_BODY = """
{%- macro content(c) -%}
  {%- if c is string -%}{{ c }}
  {%- else -%}
    {%- for p in c -%}
      {%- if not loop.first -%}{{ PART_SEP }}{%- endif -%}
      {%- if p['type'] == 'text' -%}{{ p['text'] }}
      {%- elif p['type'] in ['image', 'image_url'] -%}{{ IMAGE }}
      {%- elif p['type'] in ['video', 'video_url'] -%}{{ VIDEO }}
      {%- else -%}{{ raise_exception('content part type must be text, image, image_url, video or video_url') }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- if not SUPPORTS_SYSTEM -%}{{ raise_exception('this template has no system prompt') }}{%- endif -%}
  {%- set system = content(messages[0]['content']) -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = SYSTEM -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- set sys_block = SYSTEM_PREFIX ~ system ~ SYSTEM_SUFFIX if system else '' -%}
{{- BOS -}}
{%- if not SYSTEM_IN_FIRST_USER -%}{{ sys_block }}{%- endif -%}
{%- for m in turns -%}
  {%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
    {{- raise_exception('after an optional system message, user and assistant must alternate from user') -}}
  {%- endif -%}
  {%- set text = content(m['content']) -%}
  {%- if m['role'] == 'user' -%}
    {%- if USER_IMAGES_ONLY -%}{%- set text = IMAGE * (text.split(IMAGE) | length - 1) -%}{%- endif -%}
    {{- USER_PREFIX -}}
    {%- if SYSTEM_IN_FIRST_USER and loop.first -%}{{ sys_block }}{%- endif -%}
    {{- text ~ USER_SUFFIX -}}
  {%- else -%}
    {{- ASSISTANT_PREFIX ~ REPLY_LEAD ~ text ~ ASSISTANT_SUFFIX -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ ASSISTANT_PREFIX }}{%- endif -%}
"""


def to_jinja(template: Template | str) -> str:
    """A Hugging Face chat template (messages, add_generation_prompt) that renders exactly `render(...).text`."""
    t = _resolve(template)
    constants = {
        "IMAGE": IMAGE_PLACEHOLDER, "VIDEO": VIDEO_PLACEHOLDER, "PART_SEP": _PART_SEPARATOR, "SYSTEM": t.system, "BOS": t.bos,
        "SYSTEM_PREFIX": t.system_prefix, "SYSTEM_SUFFIX": t.system_suffix,
        "SYSTEM_IN_FIRST_USER": t.system_in_first_user, "SUPPORTS_SYSTEM": t.supports_system,
        "USER_IMAGES_ONLY": t.user_images_only, "USER_PREFIX": t.user_prefix, "USER_SUFFIX": t.user_suffix,
        "ASSISTANT_PREFIX": t.assistant_prefix, "REPLY_LEAD": t.reply_lead, "ASSISTANT_SUFFIX": t.assistant_suffix,
    }
    # JSON string literals are valid Jinja literals (Jinja decodes the same backslash escapes); booleans are not.
    lines = [f"{{#- llava template {t.name!r} (generated by llava.templates.to_jinja) -#}}"]
    for key, value in constants.items():
        literal = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{{%- set {key} = {literal} -%}}")
    return "\n".join(lines) + _JINJA_BODY
