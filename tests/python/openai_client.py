"""The official `openai` client against `moe serve` (run by tests/tests/openai_client.rs).

argv: BASE_URL (`moe serve`), ROUTER_URL (a router with a worker process, an API key, and
room for one running and one waiting request, for 429), EXPECTED_JSON (greedy outputs of
`moe generate` for the same requests, and the router's key).
Prints one line per check and `ALL OK` at the end; any failure raises.
"""

import asyncio
import json
import sys

import openai

BASE, ROUTER, EXPECTED = sys.argv[1], sys.argv[2], sys.argv[3]
with open(EXPECTED) as f:
    exp = json.load(f)
N = exp["max_tokens"]
GREEDY = dict(max_tokens=N, temperature=0, extra_body={"ignore_eos": True})


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    print(f"ok {name}")


def close(name, got, want, tol=1e-4):
    if len(got) != len(want) or any(abs(a - b) > tol for a, b in zip(got, want)):
        raise AssertionError(f"{name}: got {got!r}, want {want!r} (tolerance {tol})")
    print(f"ok {name}")


def raises(name, cls, fn):
    try:
        fn()
    except cls as e:
        body = e.body if isinstance(e.body, dict) else {}
        print(f"ok {name}: {cls.__name__} ({body.get('message', '')})")
        return e
    raise AssertionError(f"{name}: no {cls.__name__}")


c = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)

# Models.
ids = [m.id for m in c.models.list().data]
check("models", ids, exp["models"])
model = ids[0]

# Completions: text, list, token ids.
r = c.completions.create(model=model, prompt=exp["text"]["prompt"], **GREEDY)
check("completion text", r.choices[0].text, exp["text"]["want"]["text"])
check("completion finish_reason", r.choices[0].finish_reason, "length")
check("completion usage", r.usage.completion_tokens, N)
r = c.completions.create(model="alias", prompt=[exp["text"]["prompt"], exp["text2"]["prompt"]], **GREEDY)
check("completion list", [(x.index, x.text) for x in r.choices],
      [(0, exp["text"]["want"]["text"]), (1, exp["text2"]["want"]["text"])])
r = c.completions.create(model=model, prompt=exp["ids"]["prompt"], **GREEDY)
check("completion token ids", r.choices[0].text, exp["ids"]["want"]["text"])
r = c.completions.create(model=model, prompt=[exp["ids"]["prompt"], exp["ids"]["prompt"]], **GREEDY)
check("completion token id lists", [x.text for x in r.choices], [exp["ids"]["want"]["text"]] * 2)

# n: greedy samples agree; seeded samples repeat.
r = c.completions.create(model=model, prompt=exp["text"]["prompt"], n=3, **GREEDY)
check("n greedy", [(x.index, x.text) for x in r.choices], [(i, exp["text"]["want"]["text"]) for i in range(3)])
seeded = dict(model=model, prompt=exp["text"]["prompt"], n=3, max_tokens=N, temperature=1.0, seed=42)
a = [x.text for x in c.completions.create(**seeded).choices]
b = [x.text for x in c.completions.create(**seeded).choices]
check("n seeded repeats", a, b)

# echo, logprobs, stop.
r = c.completions.create(model=model, prompt=exp["text"]["prompt"], echo=True, **GREEDY)
check("echo", r.choices[0].text, exp["text"]["prompt"] + exp["text"]["want"]["text"])
r = c.completions.create(model=model, prompt=exp["text"]["prompt"], logprobs=2, **GREEDY)
lp = r.choices[0].logprobs
close("logprobs", lp.token_logprobs, exp["text"]["want"]["logprobs"])
check("logprobs tokens", len(lp.tokens), N)
check("logprobs top", all(1 <= len(t) <= 2 for t in lp.top_logprobs), True)
check("logprobs text_offset", lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, True)
want = exp["text"]["want"]["text"]
stop = want[len(want) // 2:len(want) // 2 + 2]
r = c.completions.create(model=model, prompt=exp["text"]["prompt"], stop=[stop], **GREEDY)
check("stop text", r.choices[0].text, want.split(stop)[0])
check("stop finish_reason", r.choices[0].finish_reason, "stop")

# Streaming with usage.
chunks = list(c.completions.create(model=model, prompt=exp["text"]["prompt"], stream=True,
                                   stream_options={"include_usage": True}, **GREEDY))
check("stream text", "".join(ch.choices[0].text for ch in chunks if ch.choices), want)
check("stream usage chunk", (chunks[-1].choices, chunks[-1].usage.completion_tokens), ([], N))

# Chat: plain, streaming, logprobs, multi-turn.
r = c.chat.completions.create(model=model, messages=exp["chat"]["messages"], **GREEDY)
check("chat", (r.choices[0].message.role, r.choices[0].message.content),
      ("assistant", exp["chat"]["want"]["text"]))
check("chat usage", r.usage.completion_tokens, N)
chunks = list(c.chat.completions.create(model=model, messages=exp["chat"]["messages"], stream=True,
                                        stream_options={"include_usage": True}, **GREEDY))
check("chat stream role first", chunks[0].choices[0].delta.role, "assistant")
check("chat stream text", "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
      exp["chat"]["want"]["text"])
check("chat stream finish", [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1], "length")
check("chat stream usage", chunks[-1].usage.completion_tokens, N)
r = c.chat.completions.create(model=model, messages=exp["chat"]["messages"], logprobs=True, top_logprobs=2,
                              **GREEDY)
content = r.choices[0].logprobs.content
close("chat logprobs", [t.logprob for t in content], exp["chat"]["want"]["logprobs"])
check("chat top_logprobs", all(1 <= len(t.top_logprobs) <= 2 and t.bytes is not None for t in content), True)
r = c.chat.completions.create(model=model, messages=exp["multi"]["messages"], max_completion_tokens=N,
                              temperature=0, extra_body={"ignore_eos": True})
check("chat multi-turn", r.choices[0].message.content, exp["multi"]["want"]["text"])

# Error classes.
raises("unknown model", openai.NotFoundError,
       lambda: c.completions.create(model="no-such-model", prompt="x", max_tokens=1))
raises("unsupported field", openai.BadRequestError,
       lambda: c.completions.create(model=model, prompt="x", suffix="y", max_tokens=1))
raises("unknown field", openai.BadRequestError,
       lambda: c.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"bogus": 1}))
raises("bad value", openai.BadRequestError,
       lambda: c.chat.completions.create(model=model, messages=exp["chat"]["messages"], temperature=-1))
raises("tools refused", openai.BadRequestError,
       lambda: c.chat.completions.create(model=model, messages=exp["chat"]["messages"],
                                         tools=[{"type": "function", "function": {"name": "f"}}]))
e = raises("unknown route", openai.NotFoundError, lambda: c.embeddings.create(model=model, input="x"))


async def main():
    ac = openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)
    rs = await asyncio.gather(*[ac.completions.create(model=model, prompt=exp[k]["prompt"], **GREEDY)
                                for k in ("text", "text2", "ids")])
    check("async completions", [r.choices[0].text for r in rs],
          [exp[k]["want"]["text"] for k in ("text", "text2", "ids")])
    text = ""
    async for ch in await ac.chat.completions.create(model=model, messages=exp["chat"]["messages"],
                                                      stream=True, **GREEDY):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
    check("async chat stream", text, exp["chat"]["want"]["text"])

    # The router with a worker process: the same greedy tokens, behind its key.
    rc = openai.AsyncOpenAI(base_url=ROUTER + "/v1", api_key=exp["api_key"], max_retries=0)
    # Without --served-model-name the name is the checkpoint folder's.
    check("router default model name", [m.id async for m in rc.models.list()], ["dsv3"])
    r = await rc.completions.create(model="dsv3", prompt=exp["text"]["prompt"], **GREEDY)
    check("router completion", r.choices[0].text, exp["text"]["want"]["text"])
    r = await rc.chat.completions.create(model="dsv3", messages=exp["chat"]["messages"], **GREEDY)
    check("router chat", r.choices[0].message.content, exp["chat"]["want"]["text"])
    wrong = openai.AsyncOpenAI(base_url=ROUTER + "/v1", api_key="sk-wrong", max_retries=0)
    try:
        await wrong.completions.create(model="dsv3", prompt="x", max_tokens=1)
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        check("wrong key raises AuthenticationError", e.status_code, 401)

    # 429: one running, one waiting; a burst must be refused in part.
    outcomes = await asyncio.gather(*[rc.completions.create(model="dsv3", prompt="x", max_tokens=200, temperature=0,
                                                            extra_body={"ignore_eos": True})
                                      for _ in range(12)], return_exceptions=True)
    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    other = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, openai.RateLimitError)]
    if other:
        raise other[0]
    check("rate limit raises RateLimitError", len(limited) > 0, True)


asyncio.run(main())
print("ALL OK")
