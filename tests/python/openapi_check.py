"""The OpenAPI document of `moe serve` (run by tests/tests/openapi_document.rs): it is a
valid OpenAPI document (openapi-spec-validator), it describes every route, and real
answers of the server (a completion, a stream's chunks, a chat answer, a chat stream's
chunks, the model list, an error) validate against the schemas it names (jsonschema).

argv: BASE_URL. Prints one line per check and `ALL OK` at the end; any failure raises.
"""

import json
import sys
import urllib.error
import urllib.request

import jsonschema
from openapi_spec_validator import validate

BASE = sys.argv[1]


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    print(f"ok {name}")


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


status, text = call("GET", "/openapi.json")
check("GET /openapi.json", status, 200)
doc = json.loads(text)
validate(doc)
print("ok the document is valid OpenAPI")
for path, method in (("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")):
    check(f"{method.upper()} {path} described", method in doc["paths"].get(path, {}), True)


def conforms(name, value, schema):
    validator = jsonschema.Draft202012Validator(
        {"components": doc["components"], "$ref": f"#/components/schemas/{schema}"})
    errors = sorted(validator.iter_errors(value), key=str)
    if errors:
        raise AssertionError(f"{name} does not fit {schema}: {errors[0]}\n{json.dumps(value)[:2000]}")
    print(f"ok {name} fits {schema}")


def events(text):
    lines = [l[len("data: "):] for l in text.splitlines() if l.startswith("data: ")]
    check("stream ends with [DONE]", lines[-1], "[DONE]")
    return [json.loads(l) for l in lines[:-1]]


greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
chat = {"messages": [{"role": "user", "content": "Hello"}], **greedy}

status, text = call("POST", "/v1/completions", {"prompt": "The café", "logprobs": 2, "n": 2, **greedy})
check("completion status", status, 200)
conforms("a completion", json.loads(text), "Completion")
status, text = call("POST", "/v1/completions", {"prompt": ["a", "b"], "echo": True, "stream": True,
                                                 "stream_options": {"include_usage": True}, **greedy})
for i, chunk in enumerate(events(text)):
    conforms(f"completion chunk {i}", chunk, "Completion")
status, text = call("POST", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2})
check("chat status", status, 200)
conforms("a chat answer", json.loads(text), "ChatCompletion")
status, text = call("POST", "/v1/chat/completions", {**chat, "stream": True, "logprobs": True,
                                                      "stream_options": {"include_usage": True}})
for i, chunk in enumerate(events(text)):
    conforms(f"chat chunk {i}", chunk, "ChatChunk")
status, text = call("GET", "/v1/models")
conforms("the model list", json.loads(text), "ModelList")
status, text = call("POST", "/v1/completions", {"prompt": "x", "temperature": -1})
check("bad request status", status, 400)
conforms("an error", json.loads(text), "ErrorResponse")
# A schema that could not fail would prove nothing: a wrong answer must not fit.
try:
    conforms("a completion without choices", {"id": "x", "object": "text_completion", "created": 0,
                                               "model": "m"}, "Completion")
    raise AssertionError("a completion without choices fits the schema")
except AssertionError as e:
    if "fits the schema" in str(e):
        raise
    print("ok a completion without choices does not fit")
print("ALL OK")
