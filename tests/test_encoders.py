"""Which graphs the service runs: fp32 or the fp16 variant, chosen from the provider and settings."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from runtime.encoders import Encoders, choose_precision


def test_precision_choice():
    card = {"name": "m", "files": {"image": "i", "text": "t", "image_fp16": "i16", "text_fp16": "t16"}}
    assert choose_precision(card, "auto", "CUDAExecutionProvider") == "fp16"
    assert choose_precision(card, "auto", "CPUExecutionProvider") == "fp32"
    assert choose_precision(card, "fp32", "CUDAExecutionProvider") == "fp32"
    assert choose_precision(card, "fp16", "CPUExecutionProvider") == "fp16"
    plain = {"name": "m", "files": {"image": "i", "text": "t"}}
    assert choose_precision(plain, "auto", "CUDAExecutionProvider") == "fp32"
    with pytest.raises(ValueError, match="no fp16 variant"):
        choose_precision(plain, "fp16", "CUDAExecutionProvider")
    # CPU: the export's choice (model.json cpu.precision), if its files are there
    both = {
        **card,
        "files": {**card["files"], "image_int8": "i8", "text_int8": "t8"},
        "cpu": {"precision": "int8", "int8_weights": "u8"},
    }
    assert choose_precision(both, "auto", "CPUExecutionProvider") == "int8"
    assert choose_precision(both, "auto", "CUDAExecutionProvider") == "fp16"
    assert choose_precision(both, "fp32", "CPUExecutionProvider") == "fp32"
    missing = {**card, "cpu": {"precision": "int8"}}  # files gone: fp32, never a missing graph
    assert choose_precision(missing, "auto", "CPUExecutionProvider") == "fp32"
    with pytest.raises(ValueError, match="no int8 variant"):
        choose_precision(missing, "int8", "CPUExecutionProvider")


def test_int8_graphs_whose_weights_saturate_on_this_cpu_are_not_picked(monkeypatch):
    import runtime.cpu

    card = {
        "name": "m",
        "files": {"image": "i", "text": "t", "image_int8": "i8", "text_int8": "t8"},
        "cpu": {"precision": "int8", "int8_weights": "s8"},
    }
    monkeypatch.setattr(runtime.cpu, "is_x86", lambda: True)
    monkeypatch.setattr(runtime.cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # no VNNI
    assert runtime.cpu.int8_weights_for_this_cpu() == "u8"
    assert choose_precision(card, "auto", "CPUExecutionProvider") == "fp32"
    assert choose_precision(card, "int8", "CPUExecutionProvider") == "int8"  # asked for: served, with a warning
    u8 = {**card, "cpu": {"precision": "int8", "int8_weights": "u8"}}
    assert choose_precision(u8, "auto", "CPUExecutionProvider") == "int8"
    monkeypatch.setattr(runtime.cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert runtime.cpu.int8_weights_for_this_cpu() == "s8"
    assert choose_precision(card, "auto", "CPUExecutionProvider") == "int8"
    monkeypatch.setattr(runtime.cpu, "is_x86", lambda: False)  # ARM: int32 dot products
    monkeypatch.setattr(runtime.cpu, "cpu_flags", lambda: frozenset())
    assert runtime.cpu.int8_weights_for_this_cpu() == "s8"


def test_bf16_autocast_only_where_the_cpu_has_bf16_units():
    from runtime.cpu import has_native_bf16

    assert not has_native_bf16(frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    assert has_native_bf16(frozenset({"avx512f", "avx512_bf16"})) and has_native_bf16(frozenset({"amx_bf16"}))


@pytest.mark.parametrize("weights", ["s8", "u8"])
def test_the_saturation_rule_matches_onnx_runtime_on_this_cpu(tmp_path, weights):
    """runtime/cpu.py's claim, checked on the real kernels of whatever CPU runs the tests: a MatMul
    whose uint8 activations and int8 weights are both at full scale (255 x 127 per product) comes out
    exact where int8_exact says so and about halved (int16 pairs saturated) where it does not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import runtime.cpu
    from runtime.encoders import open_session

    k = 256
    weight = numpy_helper.from_array(np.ones((k, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    weight_type = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}[weights]
    quantize_dynamic(str(src), str(dst), weight_type=weight_type, per_channel=True)
    x = np.ones((1, k), dtype=np.float32)
    x[0, 0] = 0.0  # the activation range includes 0, so the ones quantise to 255
    (y,) = open_session(dst, ["CPUExecutionProvider"]).run(None, {"x": x})
    exact = np.allclose(y, k - 1, rtol=0.02)
    assert exact == runtime.cpu.int8_exact(weights), (
        weights,
        y,
        sorted(runtime.cpu.cpu_flags() & {"avx2", "avx512_vnni", "avx_vnni"}),
    )


def test_the_export_machine_picks_the_fastest_graph_that_passed_parity():
    from training.quantize import choose_cpu_precision

    assert choose_cpu_precision({"fp32": 10.0, "int8": 25.0}, {"fp32": True, "int8": True}) == "int8"
    assert choose_cpu_precision({"fp32": 10.0, "int8": 25.0}, {"fp32": True, "int8": False}) == "fp32"
    assert choose_cpu_precision({"fp32": 30.0, "int8": 25.0}, {"fp32": True, "int8": True}) == "fp32"


def test_the_export_times_its_candidates_in_turns_so_a_drift_falls_on_both():
    """training/quantize.interleaved_seconds: one warm-up each, then rounds in alternating order (a b,
    b a, ...), medians per candidate. The machine here slows down as it goes (each call sleeps a
    little longer than the one before): timed one block after the other, the faster candidate timed
    last would look slower; in turns it does not."""
    from training.quantize import interleaved_seconds

    order: list[str] = []

    def call(name: str, base: float):
        def run() -> None:
            order.append(name)
            time.sleep(base + 0.004 * len(order))  # the drift: every call a little slower

        return run

    medians = interleaved_seconds({"slow": call("slow", 0.05), "fast": call("fast", 0.02)}, rounds=8)
    assert order[:2] == ["slow", "fast"]  # the warm-ups
    assert order[2:] == ["slow", "fast", "fast", "slow"] * 4
    assert medians["fast"] < medians["slow"] - 0.02, medians


def test_int8_encoders_agree_with_fp32_and_a_refused_int8_is_left_out(tiny_model_dir, tmp_path):
    from training.export import export

    card = json.loads((tiny_model_dir / "model.json").read_text())
    assert card["files"]["image_int8"] == "image.int8.onnx" and card["cpu"]["precision"] in ("fp32", "int8")
    errors, tolerances = card["export"]["parity_relative_error_int8"], card["cpu"]["tolerances_int8"]
    assert all(v <= tolerances[k.split(".")[0]] for k, v in errors.items())
    rng = np.random.default_rng(2)
    pixels = [rng.standard_normal((3, 32, 32)).astype(np.float32) for _ in range(3)]
    out = {}
    for precision in ("fp32", "int8"):
        enc = Encoders(tiny_model_dir, card, providers="cpu", precision=precision)
        try:
            out[precision] = enc.embed_images_now(pixels)
        finally:
            enc.close()
    for a, b in zip(out["fp32"], out["int8"], strict=True):
        assert float(a.cls @ b.cls) > 0.98 and not np.array_equal(a.cls, b.cls)
    # a tolerance only the image graph meets: the int8 variant keeps the fp32 text graph, and says why
    ckpt = tiny_model_dir.parent / "tiny.safetensors"
    part = export(ckpt, tmp_path / "part", fp16=False, int8_text_tolerance=1e-9)
    assert part["files"]["image_int8"] == "image.int8.onnx" and part["files"]["text_int8"] == "text.onnx"
    assert "beyond 1e-09" in part["cpu"]["int8_refused"]["text"] and "image" not in part["cpu"]["int8_refused"]
    assert not (tmp_path / "part" / "text.int8.onnx").exists()
    # a tolerance no int8 graph meets: the export still succeeds, without an int8 variant
    strict = export(ckpt, tmp_path / "strict", fp16=False, int8_tolerance=1e-9, int8_text_tolerance=1e-9)
    assert "image_int8" not in strict["files"] and not (tmp_path / "strict" / "image.int8.onnx").exists()
    assert strict["cpu"]["precision"] == "fp32" and set(strict["cpu"]["int8_refused"]) == {"image", "text"}
    with pytest.raises(ValueError, match="no int8 variant"):
        Encoders(tmp_path / "strict", strict, providers="cpu", precision="int8")


def test_int8_vectors_do_not_depend_on_their_batch_mates(tiny_model_dir):
    """The int8 graphs quantise activations from the whole call's range, so `Encoders` runs them one
    input per call: an image or a query gets the same vectors alone and beside a loud batch-mate
    (here 20x the pixels), which the int8 graph called once on the whole batch would not give."""
    card = json.loads((tiny_model_dir / "model.json").read_text())
    rng = np.random.default_rng(3)
    quiet = rng.standard_normal((3, 32, 32)).astype(np.float32)
    loud = 20 * rng.standard_normal((3, 32, 32)).astype(np.float32)
    ids = [np.array([101, 2000, 3000, 102]), np.array([101, *rng.integers(1000, 20000, 30), 102])]
    rows = [(i, np.ones(len(i), np.int64)) for i in ids]
    enc = Encoders(tiny_model_dir, card, providers="cpu", precision="int8")
    try:
        assert enc.precision == "int8" and enc.one_per_call
        alone = enc.embed_images_now([quiet])[0]
        beside = enc.embed_images_now([quiet, loud])[0]
        np.testing.assert_array_equal(alone.cls, beside.cls)
        np.testing.assert_array_equal(alone.patches, beside.patches)
        one_call, _ = enc.image_session.run(None, {"pixels": np.stack([quiet, loud])})
        assert not np.array_equal(one_call[0], alone.cls)  # what one call on the batch would give
        text_alone = enc.embed_tokens_now(rows[:1])[0]
        text_beside = enc.embed_tokens_now(rows)[0]
        np.testing.assert_array_equal(text_alone.cls, text_beside.cls)
        np.testing.assert_array_equal(text_alone.tokens, text_beside.tokens)
    finally:
        enc.close()
    fp32 = Encoders(tiny_model_dir, card, providers="cpu", precision="fp32")
    assert not fp32.one_per_call  # fp32 is batch-independent: it keeps its batched calls
    fp32.close()


def test_fp16_encoders_agree_with_fp32(tiny_model_dir):
    card = json.loads((tiny_model_dir / "model.json").read_text())
    rng = np.random.default_rng(1)
    pixels = [rng.standard_normal((3, 32, 32)).astype(np.float32) for _ in range(3)]
    ids = np.array([101, 2000, 3000, 4000, 102])
    results = {}
    for precision in ("fp32", "fp16"):
        enc = Encoders(tiny_model_dir, card, providers="cpu", precision=precision)
        try:
            assert enc.precision == precision
            results[precision] = (enc.embed_images_now(pixels), enc.embed_tokens_now([(ids, np.ones(5, np.int64))]))
        finally:
            enc.close()
    (img32, txt32), (img16, txt16) = results["fp32"], results["fp16"]
    for a, b in zip(img32, img16, strict=True):
        assert float(a.cls @ b.cls) > 0.999 and not np.array_equal(a.cls, b.cls)
        np.testing.assert_allclose(b.patches, a.patches, atol=5e-3)
    assert float(txt32[0].cls @ txt16[0].cls) > 0.999
    np.testing.assert_array_equal(txt32[0].mask, txt16[0].mask)


@pytest.mark.parametrize("company", [True, False])
def test_batcher_waits_for_company_only_when_there_is_some(company):
    """With other requests in progress a lone input waits (up to max_wait) for more to batch with;
    with none, it runs at once: B, sent while A would still be waiting, lands in A's batch only
    in the first case."""
    import threading
    import time

    from service.batching import MicroBatcher

    batches: list[list[str]] = []
    started = threading.Event()

    def run(items: list[str]) -> list[str]:
        batches.append(items)
        started.set()
        return items

    batcher = MicroBatcher("t", run, max_batch=8, max_wait_ms=1500, queue_size=8, company=lambda: company)
    try:
        a = batcher.submit("a")
        if not company:
            assert started.wait(10)  # alone: A runs without waiting out max_wait
        time.sleep(0.1)
        b = batcher.submit("b")  # with company, A is still waiting (1.5 s) and B joins it
        assert (a.result(10), b.result(10)) == ("a", "b")
    finally:
        batcher.close()
    assert batches == ([["a", "b"]] if company else [["a"], ["b"]])


def test_batcher_sheds_inputs_that_waited_past_the_bound_and_then_refuses_at_once():
    """Issue #15 defect 7: the queue only refused when full, so latency grew without limit."""
    import threading

    from service.batching import MicroBatcher
    from service.deadline import Shed

    release = threading.Event()

    def run(batch):
        release.wait(5)  # the first batch holds the worker while the others queue
        return [x * 2 for x in batch]

    batcher = MicroBatcher("t", run, max_batch=1, max_wait_ms=0, queue_size=64, max_queue_wait_ms=100)
    try:
        first = batcher.submit(1)
        time.sleep(0.05)  # the worker has taken `first`
        queued = [batcher.submit(i) for i in range(2, 6)]
        time.sleep(0.3)  # they wait past the 100 ms bound
        release.set()
        assert first.result(5) == 2
        outcomes = [type(f.exception(5)) if f.exception(5) else f.result() for f in queued]
        assert outcomes == [Shed] * 4  # none was run late
        assert batcher.last_wait > 0.1
        fresh = batcher.submit(7)  # the queue is empty again: accepted, and run at once
        assert fresh.result(5) == 14
    finally:
        release.set()
        batcher.close()


def test_bounded_wait_refuses_work_that_sat_in_a_pool_too_long():
    from concurrent.futures import ThreadPoolExecutor

    from service.deadline import Shed, bounded_wait

    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(time.sleep, 0.3)
        late = pool.submit(bounded_wait("search", 0.1, lambda: "ran"))
        prompt = bounded_wait("search", 10.0, lambda: "ran")
        blocker.result()
        assert isinstance(late.exception(5), Shed) and "search" in str(late.exception())
        assert pool.submit(prompt).result(5) == "ran"


def test_a_text_query_is_its_words_with_their_tokens_and_the_same_in_every_batch(tiny_model_dir):
    """runtime/query.py, the one way a text becomes a query (the route, `emkum search`, `emkum eval`):
    the words take part and [CLS]/[SEP] do not, each vector keeps its token's label, and a text's
    query does not depend on the texts batched or chunked with it."""
    from runtime.query import embed_text_queries, text_queries
    from runtime.tokenizer import TextTokenizer

    card = json.loads((tiny_model_dir / "model.json").read_text())
    enc = Encoders(tiny_model_dir, card, providers="cpu", precision="fp32")
    tokenizer = TextTokenizer(tiny_model_dir / card["files"]["tokenizer"], card["text"]["max_length"])
    texts = ["a dog", "two brown dogs run across the wet sand", "a red car"]
    alone = embed_text_queries(tokenizer, enc.embed_tokens_now, texts, chunk=1)
    together = embed_text_queries(tokenizer, enc.embed_tokens_now, texts)
    for q1, q3 in zip(alone, together, strict=True):
        np.testing.assert_allclose(q1.cls, q3.cls, atol=1e-5)
        np.testing.assert_allclose(q1.vectors, q3.vectors, atol=1e-5)
    vectors, words = together[1].words()
    assert words == ["two", "brown", "dogs", "run", "across", "the", "wet", "sand"]
    assert together[1].labels[0] == "[CLS]" and together[1].labels[-1] == "[SEP]"
    np.testing.assert_allclose(vectors, together[1].vectors[1:-1])
    batch = tokenizer(texts[:1])
    with pytest.raises(ValueError):  # an embedding for each text, or none
        text_queries(batch, enc.embed_tokens_now(tokenizer(texts[:2]).rows()))
