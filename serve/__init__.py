"""Serving: thin HTTP layers over `llava` (the core never imports this package).

- `serve.controller`: worker registry, heartbeats, dispatch (shortest_queue / lottery), streaming proxy.
- `serve.model_worker`: a loaded model + the engine behind the LLaVA worker protocol (+ a structured messages
  endpoint); `ServingModel` is its HTTP-free core, also used in-process by the CLI.
- `serve.openai_api_server`: OpenAI-compatible /v1/models and /v1/chat/completions over the controller.
- `serve.cli`: terminal chat; `serve.protocol`: error codes and JSON schemas; `serve.common`: framing, parsing,
  allowlist helpers.

Stream protocol for other front ends (e.g. the web UI): POST `{controller}/worker_generate_messages` with
`{"model", "messages": [{"role", "content" with <image> markers}], "images": [base64...], "temperature", "top_p",
"max_new_tokens", ...}`; read NUL-delimited JSON chunks `{"text", "delta", "error_code", "finish_reason",
"usage"?}` until a chunk has `finish_reason` or a non-zero `error_code` (then `error.message` says why). Model list:
POST `{controller}/list_models`; refresh: POST `{controller}/refresh_all_workers`. Conversation state:
`llava.chat.ChatSession`.
"""
