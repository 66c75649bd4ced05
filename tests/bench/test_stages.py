"""``python -m bench.stages``: the classifier of py-spy's collapsed stacks into issue 26's stages,
on hand-written stacks as ``py-spy record --threads --full-filenames --format raw`` writes them
(each rule, the innermost claimed frame winning, the threads' fallbacks), and the table's
arithmetic. No server, no py-spy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import stages
from bench.stages import (
    ENCODE,
    HANDLER,
    HTTP,
    IDLE,
    LOGGING,
    LOOP,
    MODEL,
    OTHER_CODE,
    PARSE,
    POLLER,
    QUEUE,
    RULES,
    STAGES,
    TELEMETRY,
    THREADS,
    UNREAD,
    VALIDATE,
    Frame,
    breakdown,
    classify,
    read_raw,
)

PY = "/root/.pyenv/versions/3.11.7/lib/python3.11"
SITE = "/work/main/.venv/lib/python3.11/site-packages"
KSITE = "/work/main/out/kserve-venv/lib/python3.11/site-packages"
TREE = "/work/wt/x"


def frame(function: str, file: str, line: int = 1) -> str:
    return f"{function} ({file}:{line})"


def ds(function: str, module: str, line: int = 1) -> str:
    """A frame of digitserve.server."""
    return frame(function, f"{TREE}/server/digitserve/server/{module}", line)


def py(function: str, module: str, line: int = 1) -> str:
    """A frame of the standard library."""
    return frame(function, f"{PY}/{module}", line)


def site(function: str, module: str, line: int = 1) -> str:
    return frame(function, f"{SITE}/{module}", line)


def ks(function: str, module: str, line: int = 1) -> str:
    """A frame of KServe's environment."""
    return frame(function, f"{KSITE}/{module}", line)


def bench(function: str, module: str, line: int = 1) -> str:
    return frame(function, f"{TREE}/bench/{module}", line)


LITERT = f"{TREE}/core/digitserve/inference/litert.py"
LOOP_FRAMES = [py("BaseEventLoop.run_forever", "asyncio/base_events.py", 607),
               py("BaseEventLoop._run_once", "asyncio/base_events.py", 1922)]
HANDLE = py("Handle._run", "asyncio/events.py", 80)
DS_MAIN = ["thread (4242): MainThread", "_run_module_as_main (<frozen runpy>:198)",
           ds("<module>", "__main__.py", 7), ds("main", "cli.py", 66), *LOOP_FRAMES, HANDLE]
UNARY = [ds("_wrap.<locals>.unary", "calls.py", 206), ds("mapped_errors.<locals>.wrapper", "status.py", 99),
         ds("InferenceServicer.ModelInfer", "oip.py", 80), ds("model_infer", "oipcodec.py", 106)]
INFER = [*UNARY, ds("infer", "infer.py", 210)]
PREDICT = [*INFER, ds("DataPlane.predict", "dataplane.py", 156), ds("Batcher.predict", "batcher.py", 135)]
HTTP_EDGE = [site("RequestHandler._handle_request", "aiohttp/web_protocol.py", 479),
             site("Application._handle", "aiohttp/web_app.py", 569),
             ds("HttpEdge._edge", "httpserver.py", 360), ds("HttpEdge._answer", "httpserver.py", 317),
             ds("add_routes.<locals>.handle", "rest.py", 180), ds("RestApi.infer", "rest.py", 256)]
THREAD = [py("Thread._bootstrap", "threading.py", 1002), py("Thread._bootstrap_inner", "threading.py", 1045)]
POLLER_STACK = ["thread (4250): Thread-1 (_poll_wrapper)", *THREAD, py("Thread.run", "threading.py", 982)]
WORKER = [*THREAD, py("Thread.run", "threading.py", 982), py("_worker", "concurrent/futures/thread.py", 83)]
WORK_ITEM = py("_WorkItem.run", "concurrent/futures/thread.py", 58)
SELECT = py("EpollSelector.select", "selectors.py", 468)


def main_thread(*frames: str) -> str:
    return ";".join([*DS_MAIN, *frames])


def stack(*frames: str) -> str:
    return ";".join(frames)


DIGITSERVE = [
    # model: the interpreter under LiteRTRunner, under the batcher (the innermost wins over queue)
    ("litert interpreter", main_thread(
        *PREDICT, frame("LiteRTModel.predict", LITERT, 103), frame("LiteRTRunner.__call__", LITERT, 72),
        site("Interpreter.invoke", "ai_edge_litert/interpreter.py", 941)), MODEL),
    ("LiteRTRunner's own lines", main_thread(*PREDICT, frame("LiteRTRunner.__call__", LITERT, 70)), MODEL),
    # receive and parse
    ("deserializer", main_thread(ds("tolerant_deserializer.<locals>.parse", "calls.py", 60)), PARSE),
    ("packed Predict reader", main_thread(
        ds("tolerant_deserializer.<locals>.parse", "calls.py", 60), ds("parse_predict_request", "wire.py"),
        ds("_packed", "wire.py", 130)), PARSE),
    ("to_request's comprehension", main_thread(
        *UNARY, ds("to_request", "oipcodec.py", 51), ds("to_request.<locals>.<listcomp>", "oipcodec.py", 51)),
     PARSE),
    ("oipcodec._input", main_thread(*UNARY, ds("to_request", "oipcodec.py"), ds("_input", "oipcodec.py")),
     PARSE),
    ("REST body read by aiohttp", main_thread(
        *HTTP_EDGE, ds("read_body", "rest.py", 97), site("BaseRequest.read", "aiohttp/web_request.py")),
     PARSE),
    ("REST JSON document", main_thread(
        *HTTP_EDGE, ds("read_infer", "restcodec.py", 230), ds("_document", "restcodec.py", 180)), PARSE),
    # validate and convert
    ("infer.read", main_thread(*INFER, ds("read", "infer.py", 155)), VALIDATE),
    ("pixels under infer.read", main_thread(
        *INFER, ds("read", "infer.py", 158), ds("tensor_pixels", "pixels.py", 120),
        ds("check_pixels", "pixels.py", 80), site("_amax", "numpy/_core/_methods.py", 44)), VALIDATE),
    # queue and batch
    ("batcher's own lines", main_thread(*PREDICT), QUEUE),
    ("batch loop", main_thread(ds("Batcher._loop", "batcher.py"), ds("Batcher._compute", "batcher.py")),
     QUEUE),
    # encode
    ("to_response", main_thread(*UNARY, ds("to_response", "oipcodec.py", 60)), ENCODE),
    ("output tensor bytes", main_thread(
        *UNARY, ds("to_response", "oipcodec.py", 64), ds("InferResponse.tensors", "infertypes.py", 136),
        ds("OutputTensor.raw", "infertypes.py", 108)), ENCODE),
    ("ModelInfer's answer written as bytes", main_thread(
        ds("_wrap.<locals>.unary", "calls.py"), ds("model_infer", "oipcodec.py"),
        ds("to_response_bytes", "oipcodec.py"), ds("encode_infer_response", "oipcodec.py"),
        ds("varint", "protowire.py")), ENCODE),
    ("ModelInfer's raw outputs", main_thread(
        ds("model_infer", "oipcodec.py"), ds("to_response_bytes", "oipcodec.py"),
        ds("InferResponse.raw_outputs", "infertypes.py"), ds("_raw_numbers", "infertypes.py")), ENCODE),
    ("labels encoded", main_thread(
        ds("model_infer", "oipcodec.py"), ds("to_response_bytes", "oipcodec.py"),
        ds("_encoded_labels", "infertypes.py")), ENCODE),
    ("response serializer", main_thread(ds("_serializer.<locals>.serialize", "calls.py", 72)), ENCODE),
    ("Predict's encoder", main_thread(
        ds("_wrap.<locals>.unary", "calls.py"), ds("predict", "v1codec.py"),
        ds("PredictionEncoder.encode", "wire.py")), ENCODE),
    ("REST answer", main_thread(*HTTP_EDGE, ds("infer_body", "restcodec.py", 295)), ENCODE),
    # telemetry, and logging inside it (the innermost wins)
    ("Call.finish", main_thread(ds("_wrap.<locals>.unary", "calls.py"), ds("Call.finish", "calls.py", 350)),
     TELEMETRY),
    ("prometheus under Call.__init__", main_thread(
        ds("_wrap.<locals>.unary", "calls.py"), ds("Call.__init__", "calls.py", 341),
        site("Gauge.inc", "prometheus_client/metrics.py", 419)), TELEMETRY),
    ("access line inside Call.finish", main_thread(
        ds("_wrap.<locals>.unary", "calls.py"), ds("Call.finish", "calls.py", 353),
        ds("AccessLog.write", "logs.py", 98)), LOGGING),
    ("batch accounting inside the batcher", main_thread(
        *PREDICT, ds("Batcher._account", "batcher.py", 155), ds("Telemetry.on_batch", "telemetry.py")),
     TELEMETRY),
    ("version statistics", main_thread(*INFER, ds("VersionStatistics.answered", "statistics.py")), TELEMETRY),
    ("HTTP metrics", main_thread(
        *HTTP_EDGE[:3], ds("HttpEdge.observe", "httpserver.py"), ds("HttpMetrics.observe", "httpserver.py")),
     TELEMETRY),
    # logging
    ("access lines flushed", main_thread(ds("AccessLog.flush", "logs.py", 125)), LOGGING),
    ("stdlib logging", main_thread(*UNARY, py("Logger.info", "logging/__init__.py", 1489)), LOGGING),
    # the rest of the handler
    ("call wrapper's own lines", main_thread(ds("_wrap.<locals>.unary", "calls.py", 206)), HANDLER),
    ("servicer and router", main_thread(*INFER, ds("ModelVersions.resolve", "registry.py")), HANDLER),
    ("HTTP middleware", main_thread(*HTTP_EDGE[:3]), HANDLER),
    ("other server code", main_thread(ds("ConfigWatch.poll", "configwatch.py")), OTHER_CODE),
    # no project frame
    ("aiohttp outside the handler", main_thread(*HTTP_EDGE[:2]), HTTP),
    ("gRPC's Cython under a loop callback", main_thread(), LOOP),
    ("the loop itself", stack(*DS_MAIN[:-1]), LOOP),
    ("poller thread", stack(*POLLER_STACK), POLLER),
    ("a thread pool's work", stack("thread (4260): asyncio_0", *WORKER, WORK_ITEM,
                                   ds("read_infer", "restcodec.py")), PARSE),
    ("a thread pool's unclaimed work", stack("thread (4260): model_0", *WORKER, WORK_ITEM), THREADS),
    # idle: only as the innermost frame
    ("epoll wait", stack(*DS_MAIN[:-1], SELECT), IDLE),
    ("a pool's worker waiting", stack("thread (4260): model_0", *WORKER), IDLE),
    ("stack not read", "thread (4242): MainThread", UNREAD),
    # without --threads' root frame, the thread is told by its frames
    ("poller, no thread frame", stack(*POLLER_STACK[1:]), POLLER),
    ("main, no thread frame", stack(*DS_MAIN[1:]), LOOP),
    ("torn stack (no root)", stack(ds("model_infer", "oipcodec.py"), ds("to_response", "oipcodec.py")),
     ENCODE),
]


@pytest.mark.parametrize(("text", "stage"), [pytest.param(t, s, id=name) for name, t, s in DIGITSERVE])
def test_digitserve_stacks_go_to_their_stage(text: str, stage: str) -> None:
    assert classify(text, RULES["digitserve"]) == stage


K_MAIN = ["thread (7): MainThread", bench("<module>", "kserve_server.py", 147),
          bench("main", "kserve_server.py", 142), ks("ModelServer.start", "kserve/model_server.py", 410),
          *LOOP_FRAMES, HANDLE]
K_INFER = [ks("AsyncServerInterceptor.intercept_service.<locals>.invoke_intercept_method",
              "grpc_interceptor/server.py", 165),
           ks("InferenceServicer.ModelInfer", "kserve/protocol/grpc/servicer.py", 121),
           ks("DataPlane.infer", "kserve/protocol/dataplane.py", 473),
           ks("Model.__call__", "kserve/model.py", 255)]
K_PREDICT = [*K_INFER, bench("main.<locals>.Digits.predict", "kserve_server.py", 130)]
INFER_TYPE = "kserve/protocol/infer_type.py"

KSERVE = [
    ("model", [*K_PREDICT, bench("_litert.<locals>.run", "kserve_server.py", 80),
               ks("Interpreter.invoke", "ai_edge_litert/interpreter.py", 941)], MODEL),
    ("pixels to numpy", [*K_PREDICT, ks("InferInput.as_numpy", INFER_TYPE, 255)], VALIDATE),
    ("request from gRPC", [*K_INFER[:2], ks("InferRequest.from_grpc", INFER_TYPE, 560)], PARSE),
    ("REST body validated by pydantic", [ks("serve", "fastapi/routing.py"),
                                         ks("BaseModel.model_validate", "pydantic/main.py")], PARSE),
    ("response to gRPC", [*K_INFER[:2], ks("InferResponse.to_grpc", INFER_TYPE, 1458)], ENCODE),
    ("logging interceptor", [ks("LoggingInterceptor.intercept_service",
                                "kserve/protocol/grpc/interceptors.py"),
                             py("Logger.info", "logging/__init__.py", 1489)], LOGGING),
    ("prometheus timer", [*K_INFER, ks("Timer.__exit__", "prometheus_client/context_managers.py")],
     TELEMETRY),
    ("KServe's own lines", K_INFER, HANDLER),
    ("uvicorn outside the handler", [ks("HttpToolsProtocol.data_received",
                                        "uvicorn/protocols/http/httptools_impl.py")], HTTP),
    ("the loop, under KServe's start-up frames", [], LOOP),
]


@pytest.mark.parametrize(("frames", "stage"), [pytest.param(f, s, id=name) for name, f, s in KSERVE])
def test_kserve_stacks_go_to_their_coarser_stage(frames: list[str], stage: str) -> None:
    assert classify(stack(*K_MAIN, *frames), RULES["kserve"]) == stage


def test_null_server_stacks() -> None:
    main = ["thread (9): MainThread", "_run_module_as_main (<frozen runpy>:198)",
            bench("<module>", "null_server.py", 120), bench("main", "null_server.py", 110),
            *LOOP_FRAMES, HANDLE]
    rules = RULES["null"]
    assert classify(stack(*main, bench("NullService.predict", "null_server.py", 48)), rules) == HANDLER
    assert classify(stack(*main, bench("NullService.predict", "null_server.py", 51),
                          bench("reply", "null_server.py", 33)), rules) == ENCODE
    assert classify(stack(*main), rules) == LOOP
    assert classify(stack(*POLLER_STACK), rules) == POLLER


def test_a_nested_function_is_its_enclosing_functions_unless_a_rule_names_it() -> None:
    genexpr = main_thread(ds("OutputTensor.raw.<locals>.<genexpr>", "infertypes.py", 110))
    assert classify(genexpr, RULES["digitserve"]) == ENCODE
    # tolerant_deserializer's parse is named (receive and parse); _wrap's unary is the handler
    assert classify(main_thread(ds("tolerant_deserializer.<locals>.parse", "calls.py")),
                    RULES["digitserve"]) == PARSE
    assert Frame.parse("to_request.<locals>.<listcomp> (/a/b.py:51)") == Frame(
        "to_request.<locals>.<listcomp>", "/a/b.py")
    assert Frame.parse("<module> (<frozen runpy>)") == Frame("<module>", "<frozen runpy>")


def test_every_rule_names_a_known_stage() -> None:
    for rules in RULES.values():
        for rule in rules:
            assert rule.stage is None or rule.stage in (*STAGES, IDLE)


def test_raw_output_is_read_with_its_empty_stacks() -> None:
    text = "a (x.py:1);b (y.py:2) 3\n 5\nthread (1): MainThread 2\n\n"
    assert read_raw(text) == [("a (x.py:1);b (y.py:2)", 3), ("", 5), ("thread (1): MainThread", 2)]
    assert classify("", RULES["digitserve"]) == UNREAD


def test_breakdown_leaves_idle_out_and_shares_the_cpu_time_per_request() -> None:
    rows = {r["stage"]: r for r in breakdown({MODEL: 30, LOOP: 60, POLLER: 10, IDLE: 100},
                                             cpu_seconds=2.0, requests=1000)}
    assert IDLE not in rows
    assert rows[MODEL]["share"] == 0.3 and rows[MODEL]["us_per_request"] == 600.0
    assert rows[LOOP]["us_per_request"] == 1200.0 and rows[POLLER]["us_per_request"] == 200.0
    assert rows[PARSE]["samples"] == 0 and rows[PARSE]["us_per_request"] == 0.0
    assert sum(r["us_per_request"] for r in rows.values()) == pytest.approx(2000.0)
    assert "us_per_request" not in breakdown({MODEL: 1})[0]  # shares only, without a run's figures


def test_a_raw_file_is_classified_again_without_a_server(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "py-spy.txt"
    raw.write_text(f"{main_thread(ds('Call.finish', 'calls.py', 350))} 3\n{stack(*POLLER_STACK)} 1\n"
                   f"{stack(*DS_MAIN[:-1], SELECT)} 6\n")
    assert stages.main(["--raw", str(raw), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["busy_samples"], result["idle_samples"]) == (4, 6)
    shares = {r["stage"]: r["share"] for r in result["stages"]}
    assert shares[TELEMETRY] == 0.75 and shares[POLLER] == 0.25


def test_a_server_that_does_not_serve_the_edge_is_refused() -> None:
    with pytest.raises(SystemExit, match="does not serve it"):
        stages.main(["--server", "null", "--edge", "v2-grpc"])
