"""A grpcio client, with stubs generated from proto/ at run time by grpcio-tools, against
`moe serve` (run by tests/tests/grpc_python_client.rs).

argv: GRPC_ADDR, PROTO_DIR, EXPECTED_JSON (greedy token ids and text from `moe generate`,
and the API key the server requires).
Prints one line per check and `ALL OK` at the end; any failure raises.
"""

import importlib
import json
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

ADDR, PROTO_DIR, EXPECTED = sys.argv[1], sys.argv[2], sys.argv[3]
with open(EXPECTED) as f:
    exp = json.load(f)


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    print(f"ok {name}")


out = tempfile.mkdtemp()
rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}",
                  f"{PROTO_DIR}/moe/v1/generation.proto"])
check("stubs generated", rc, 0)
sys.path.insert(0, out)
pb = importlib.import_module("moe.v1.generation_pb2")
pb_grpc = importlib.import_module("moe.v1.generation_pb2_grpc")

ch = grpc.insecure_channel(ADDR)
gen = pb_grpc.GenerationStub(ch)
KEY = (("authorization", f"Bearer {exp['api_key']}"),)

# Streaming Generate, greedy: the same tokens as `moe generate`, for a prompt text, token
# ids, and a conversation (rendered with the model's chat template by the server).
for case in exp["cases"]:
    req = pb.GenerateRequest(max_tokens=exp["max_tokens"], ignore_eos=True,
                             sampling=pb.SamplingParameters(temperature=0.0))
    if "chat" in case:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                                 for m in case["chat"])
        case["prompt"] = f"chat of {len(case['chat'])} messages"
    elif isinstance(case["prompt"], str):
        req.prompt = case["prompt"]
    else:
        req.prompt_token_ids.extend(case["prompt"])
    msgs = list(gen.Generate(req, timeout=60, metadata=KEY))
    ids = [t.token_id for m in msgs for t in m.tokens]
    check(f"generate {case['prompt']!r} ids", ids, case["token_ids"])
    check(f"generate {case['prompt']!r} text", "".join(m.text for m in msgs), case["text"])
    check("final message has usage", msgs[-1].usage.completion_tokens, exp["max_tokens"])



def refused(name, code, fn):
    try:
        fn()
    except grpc.RpcError as e:
        check(name, e.code(), code)
        return
    raise AssertionError(f"{name}: accepted")


refused("invalid argument", grpc.StatusCode.INVALID_ARGUMENT,
        lambda: list(gen.Generate(pb.GenerateRequest(prompt="x", max_tokens=0), timeout=10, metadata=KEY)))
bad_role = pb.GenerateRequest(max_tokens=2, chat=pb.Chat(messages=[pb.ChatMessage(role="tool", content="x")]))
refused("chat with a bad role", grpc.StatusCode.INVALID_ARGUMENT,
        lambda: list(gen.Generate(bad_role, timeout=10, metadata=KEY)))
refused("no key: unauthenticated", grpc.StatusCode.UNAUTHENTICATED,
        lambda: list(gen.Generate(pb.GenerateRequest(prompt="x", max_tokens=1), timeout=10)))
refused("wrong key: unauthenticated", grpc.StatusCode.UNAUTHENTICATED,
        lambda: gen.ModelInfo(pb.ModelInfoRequest(), timeout=10,
                              metadata=(("authorization", "Bearer wrong"),)))

r = gen.Tokenize(pb.TokenizeRequest(text=exp["tokenize"]["text"], add_special_tokens=True), timeout=10,
                 metadata=KEY)
check("tokenize", list(r.token_ids), exp["tokenize"]["ids"])
info = gen.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=KEY)
check("model info", (info.architecture, list(info.served_model_names)),
      ("DeepseekV3ForCausalLM", exp["served_model_names"]))

# grpc.health.v1 and reflection need no key (probes and tools carry no secrets).
# grpc.health.v1 through grpcio-health-checking.
health = health_pb2_grpc.HealthStub(ch)
for svc in ("", "moe.v1.Generation"):
    r = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10)
    check(f"health {svc!r}", r.status, health_pb2.HealthCheckResponse.SERVING)

# Server reflection through grpcio-reflection (which asks v1alpha).
refl = reflection_pb2_grpc.ServerReflectionStub(ch)
resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                      timeout=10))
names = sorted(s.name for s in resp.list_services_response.service)
for want in ("grpc.health.v1.Health", "moe.v1.Generation"):
    check(f"reflection lists {want}", want in names, True)

print("ALL OK")
